"""Which sampling engine should `engine="auto"` pick? Static batches vs continuous batching.

The embedded default's sampling workload: SmolLM2-135M-Instruct float32, the first 40
prompts of the built-in preference data (`builtin:smollm2`, seed 0), K=4, temperature 0.7,
top-p 0.9, `cache_budget_gb=1` (160 requests: more than the continuous engine's slots, so
before this check `auto` chose continuous). For each `--max-new-tokens` limit both engines
run the same call, each in a fresh process (its compilation and peak memory its own):
`Sampler.compile` (timed apart), then the timed `Sampler.sample`. Both produce the same
tokens (the sampler's contract), so tokens/s compare directly; the last column is the
ratio static / continuous. `dice_jax.sampling.sampler.STATIC_MAX_NEW_TOKENS` comes from
this table.

Usage: python benchmarks/engine_choice.py [--max-new-tokens 128,256] [--prompts 40]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)


def side(engine: str, max_new_tokens: int, num_prompts: int) -> dict:
    """One engine on the workload, in this process."""
    import resource
    import time

    from dice_jax.checkpoints import load_model
    from dice_jax.data import load_preference_data
    from dice_jax.run.stages import unique_prompts
    from dice_jax.sampling.config import SamplingConfig
    from dice_jax.sampling.sampler import Sampler

    rows = load_preference_data("builtin:smollm2", max_rows=num_prompts, seed=0)
    prompts = unique_prompts(rows)
    model = load_model("embedded:smollm2")
    sampler = Sampler(model.params, model.config, model.tokenizer, mesh=None)
    cfg = SamplingConfig(num_samples=4, temperature=0.7, top_p=0.9,
                         max_new_tokens=max_new_tokens, max_prompt_tokens=256,
                         cache_budget_gb=1.0, seed=1, progress=False)
    compile_seconds = sampler.compile(prompts, cfg, engine=engine)
    start = time.perf_counter()
    result = sampler.sample(prompts, cfg, engine=engine)
    seconds = time.perf_counter() - start
    return {"engine": result.engine, "max_new_tokens": max_new_tokens,
            "prompts": len(prompts), "compile_s": compile_seconds, "sample_s": seconds,
            "tokens": result.num_generated_tokens,
            "tok_s": result.num_generated_tokens / seconds,
            "utilisation": result.utilisation,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-new-tokens", default="128,256")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--side", help=argparse.SUPPRESS)  # ENGINE:LIMIT, in a child
    args = parser.parse_args()
    if args.side:
        engine, limit = args.side.split(":")
        print(json.dumps(side(engine, int(limit), args.prompts)))
        return
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    env.pop("XLA_FLAGS", None)
    print(f"# {datetime.date.today()}  {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; {args.prompts} prompts x K=4, cache_budget_gb=1")
    print("| max new tokens | static tok/s | continuous tok/s | compile static / "
          "continuous (s) | continuous utilisation | same tokens | static / continuous |")
    print("|---|---|---|---|---|---|---|")
    for limit in (int(x) for x in args.max_new_tokens.split(",")):
        runs = {}
        for engine in ("static", "continuous"):
            out = subprocess.run([sys.executable, __file__, f"--side={engine}:{limit}",
                                  f"--prompts={args.prompts}"], cwd=REPO, env=env,
                                 capture_output=True, text=True, check=True)
            runs[engine] = json.loads(out.stdout.strip().splitlines()[-1])
        s, c = runs["static"], runs["continuous"]
        print(f"| {limit} | {s['tok_s']:.1f} | {c['tok_s']:.1f} | {s['compile_s']:.0f} / "
              f"{c['compile_s']:.0f} | {100 * c['utilisation']:.1f}% | "
              f"{s['tokens'] == c['tokens']} ({s['tokens']}) | "
              f"{s['tok_s'] / c['tok_s']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
