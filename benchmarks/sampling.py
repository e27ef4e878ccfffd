"""Generated tokens/s: dice-jax's sampler vs transformers `generate` on the same CPU.

SmolLM2-135M-Instruct (embedded GGUF, float32 on both sides), 16 chat prompts x K=8 samples,
128 new tokens, temperature 0.7, top-p 0.9 (top-k off), stop at `<|im_end|>`. Both sides get
the same token ids (the chat template with the generation prompt) and count the same tokens:
each sample's tokens up to and including its stop token.

* transformers: `torch.set_num_threads(<cores>)`, `no_grad`, one `generate` call over all
  128 sequences (`num_return_sequences=8`), the model loaded with `gguf_file=`, float32.
* dice-jax: `Sampler.sample` in a subprocess per device count (`--devices 1,2`: N host CPU
  devices via XLA_FLAGS, batch split over a `data` mesh axis; the cores are the same).
  `Sampler.compile` first compiles every program of the run (one step per batch shape,
  timed separately); then the timed `sample` call.

Usage: python benchmarks/sampling.py [--devices 1,2] [--skip-hf] [--max-new-tokens 128]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

PROMPTS = [
    "What is the capital of France?",
    "Explain photosynthesis to a ten-year-old.",
    "Write a haiku about autumn leaves.",
    "Give me three tips for staying focused while studying.",
    "What is the difference between a list and a tuple in Python?",
    "Summarise the plot of Romeo and Juliet in two sentences.",
    "How do vaccines work?",
    "Suggest a name for a small bakery that sells sourdough bread and pastries.",
    "Why is the sky blue?",
    "Write a short, friendly email declining a meeting invitation because of a clash.",
    "List four renewable sources of energy.",
    "What does a compiler do?",
    "Describe the water cycle.",
    "Tell me a fun fact about octopuses.",
    "How can I improve my sleep? Please keep the answer brief and practical.",
    "Translate 'good morning, how are you?' into Spanish.",
]
STOP_ID = 2  # <|im_end|>


def count_tokens(rows: list[list[int]], stop: int, limit: int) -> int:
    """Tokens per sample up to and including the first stop token (at most `limit`)."""
    total = 0
    for row in rows:
        row = row[:limit]
        total += row.index(stop) + 1 if stop in row else len(row)
    return total


def other_cpu_seconds() -> float:
    """CPU seconds used so far by processes outside this benchmark's process tree (Linux
    /proc; 0 elsewhere). The difference over a measurement shows whether anything else ran."""
    try:
        tick = os.sysconf("SC_CLK_TCK")
        stats = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                stats[int(pid)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
            except (OSError, IndexError, ValueError):
                continue
    except (OSError, ValueError, AttributeError):
        return 0.0
    ours = {os.getpid()}
    changed = True
    while changed:
        children = {pid for pid, (ppid, _) in stats.items() if ppid in ours} - ours
        changed = bool(children)
        ours |= children
    return sum(t for pid, (_, t) in stats.items() if pid not in ours) / tick


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# ---------------------------------------------------------------------------- dice-jax
def jax_worker(args: argparse.Namespace) -> None:
    """Runs in a subprocess whose XLA_FLAGS fix the device count; prints one JSON line."""
    import jax

    from dice_jax.checkpoints import load_model
    from dice_jax.sampling import Sampler, SamplingConfig
    from dice_jax.sharding import make_mesh

    model = load_model("embedded:smollm2")
    devices = jax.device_count()
    mesh = make_mesh({"data": devices, "fsdp": 1, "tensor": 1}) if devices > 1 else None
    sampler = Sampler(model.params, model.config, model.tokenizer, mesh=mesh)
    cfg = SamplingConfig(num_samples=args.samples, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, top_k=0, seed=0,
                         stop_token_ids=(STOP_ID,), progress=False)
    prompts = PROMPTS[:args.prompts]
    compile_seconds = sampler.compile(prompts, cfg)  # one step per batch shape
    runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        result = sampler.sample(prompts, cfg)
        seconds = time.perf_counter() - start
        rows = [s.token_ids.tolist() for group in result.samples for s in group]
        runs.append({"seconds": seconds, "tokens": count_tokens(rows, STOP_ID,
                                                                args.max_new_tokens),
                     "steps": result.decode_steps, "shapes": result.shapes})
    ids = [sampler.encode(p, i) for i, p in enumerate(prompts)]
    print(json.dumps({"devices": devices, "compile_seconds": compile_seconds, "runs": runs,
                      "prompt_ids": ids, "example": result.samples[0][0].text[:200]}))


def run_jax(devices: int, args: argparse.Namespace) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    cmd = [sys.executable, __file__, "--worker", "--prompts", str(args.prompts),
           "--samples", str(args.samples), "--max-new-tokens", str(args.max_new_tokens),
           "--temperature", str(args.temperature), "--top-p", str(args.top_p),
           "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise RuntimeError(f"jax worker ({devices} devices) failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- transformers
def run_hf(args: argparse.Namespace, threads: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dice_jax.checkpoints import embedded_gguf_path

    torch.set_num_threads(threads)
    path = embedded_gguf_path("smollm2")
    folder, name = os.path.dirname(path), os.path.basename(path)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32").eval()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    prompts = PROMPTS[:args.prompts]
    ids = [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                       add_generation_prompt=True),
               add_special_tokens=False)["input_ids"] for p in prompts]
    total = max(map(len, ids))
    input_ids = torch.full((len(ids), total), STOP_ID, dtype=torch.long)
    mask = torch.zeros((len(ids), total), dtype=torch.long)
    for i, row in enumerate(ids):  # left padding, as generate expects for decoder-only models
        input_ids[i, total - len(row):] = torch.tensor(row)
        mask[i, total - len(row):] = 1
    kwargs = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p, top_k=0,
                  num_return_sequences=args.samples, eos_token_id=STOP_ID,
                  pad_token_id=STOP_ID)
    torch.manual_seed(0)
    with torch.no_grad():
        model.generate(input_ids=input_ids[:2], attention_mask=mask[:2], max_new_tokens=2,
                       **kwargs)  # warm-up
        start = time.perf_counter()
        out = model.generate(input_ids=input_ids, attention_mask=mask,
                             max_new_tokens=args.max_new_tokens, **kwargs)
        seconds = time.perf_counter() - start
    rows = out[:, total:].tolist()
    return {"seconds": seconds, "tokens": count_tokens(rows, STOP_ID, args.max_new_tokens),
            "prompt_ids": ids, "threads": threads, "torch": torch.__version__}


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", default="1,2", help="dice-jax host device counts")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=1, help="timed dice-jax runs (best)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        jax_worker(args)
        return
    cores = os.cpu_count() or 1
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}  cpu: {cpu_name()} "
          f"({cores} cores)  python {platform.python_version()}")
    print(f"workload: SmolLM2-135M-Instruct float32, {args.prompts} prompts x K={args.samples}, "
          f"{args.max_new_tokens} new tokens, temperature {args.temperature}, "
          f"top-p {args.top_p}\n")
    results = []
    for devices in [int(d) for d in args.devices.split(",") if d]:
        other = other_cpu_seconds()
        r = run_jax(devices, args)
        other = other_cpu_seconds() - other
        steady = min(r["runs"], key=lambda run: run["seconds"])
        results.append((f"dice-jax, {devices} CPU device(s)", steady["seconds"],
                        steady["tokens"], f"compiled beforehand in {r['compile_seconds']:.1f}s; "
                        f"{steady['steps']} decode steps, "
                        f"{1000 * steady['seconds'] / max(steady['steps'], 1):.0f} ms/step; "
                        f"other processes used {other:.0f} CPU-s meanwhile"))
        prompt_ids = r["prompt_ids"]
    hf = None
    if not args.skip_hf:
        other = other_cpu_seconds()
        hf = run_hf(args, threads=cores)
        other = other_cpu_seconds() - other
        if results and hf["prompt_ids"] != prompt_ids:
            print("WARNING: the two sides tokenised the prompts differently")
        results.append((f"transformers generate (torch {hf['torch']}, {hf['threads']} threads)",
                        hf["seconds"], hf["tokens"],
                        f"one batch of all sequences; other processes used {other:.0f} CPU-s "
                        "meanwhile"))
    header = f"| {'implementation':<45} | {'seconds':>8} | {'tokens':>7} | {'tokens/s':>8} |"
    header += " vs HF | notes"
    print(header)
    print("|" + "-" * 47 + "|" + "-" * 10 + "|" + "-" * 9 + "|" + "-" * 10 + "|-------|------")
    for name, seconds, tokens, note in results:
        ratio = "" if hf is None else f"{(tokens / seconds) / (hf['tokens'] / hf['seconds']):.2f}x"
        print(f"| {name:<45} | {seconds:8.1f} | {tokens:7d} | {tokens / seconds:8.1f} | "
              f"{ratio:>5} | {note}")


if __name__ == "__main__":
    main()
