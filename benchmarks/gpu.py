"""One command for a single GPU (H100 / H200): bf16 parity, DPO train step, decode, scoring.

    python benchmarks/gpu.py --out DIR [--budget 400] [--sections parity,train,...]
    python benchmarks/gpu.py --smoke --out DIR      # every section at tiny size, on CPU

Writes `DIR/results.md` (one Markdown table) and `DIR/results.json`, and prints every row as
it comes. Each part of a section runs in its own Python process (so JAX and PyTorch never
share the GPU's memory, and a crash or an out-of-memory error ends one part only) under a
time limit taken from `--budget` seconds for the whole command; a part that fails or runs
out of time records its error and the rest still run. The exit code is 1 when any part
failed, after everything is written.

Sections (random weights of real model shapes; nothing is downloaded):

1. parity: Llama-3.2-1B-shaped model (`presets.llama3p2_1b`, weights rounded to bfloat16
   so both dtypes see the same model), logits of 2 x 512 tokens (one row left-padded) in
   bfloat16 compute against float32, for dice-jax and for transformers on the same device
   (weights copied across with `checkpoints.placement.iter_hf_tensors`). Passes when
   dice-jax's bf16-vs-fp32 error is at most 2x transformers' own.
2. train: DPO step, bf16 compute, float32 master weights, AdamW, 8 pairs x 1024 tokens
   (64-token prompt) on Llama-3-8B's shape with 8 of its 32 layers (2.75B parameters: the
   PyTorch peer's float32 weights, gradients, AdamW state, float32 logits and activations
   fit one 141 GB H200 at this depth, not at 16). dice-jax: the trainer's jitted step
   (`benchmarks/train_step.JaxSide`, chosen and rejected as full sequences, as the peer
   runs them); PyTorch: TRL's concatenated-forward math (`benchmarks/train_step.TorchSide`)
   under `torch.autocast(bfloat16)`. Model FLOPs per step: 6 x tokens x matmul parameters
   (lm_head included, embedding lookup not) + causal attention 6 x layers x heads x
   head_dim x sum of squared sequence lengths; utilisation against the bf16 dense peak
   (989 TFLOP/s for H100 SXM and H200).
3. decode: Llama-3.2-1B shape, bf16 weights and KV cache, 1024-token prompts, 128 new
   tokens sampled (temperature 1): decode tokens/s at batch 1, 64, 256 and the share of
   the HBM roofline (bytes per step = all weights once + the KV cache of 1024 + 64 slots
   per row, at 4.8 TB/s H200, 3.35 TB/s H100). Then the K=16 workload: 16 prompts of
   100-250 tokens, 16 samples each, 256 new tokens, temperature 0.7, top-p 0.9, with the
   dice-jax `Sampler` and with transformers `generate` (defaults: dynamic cache, SDPA).
4. scoring: reference log-probs (`training.scoring.sequence_scores`, the DICE scorer) of
   64 prompts x 16 responses of 136-264 tokens (`benchmarks/scoring.make_rows`), 1B shape.

Imports: only `dice_jax.models`, `.sharding`, `.checkpoints.placement`, `.training` (step,
state, scoring, loop, data), `.sampling` and the two benchmark modules, each inside the
part that uses it; none needs ml-collections, scikit-optimize, gguf, tensorboardX,
if-verifiable or datasets, which the device image lacks (tests/test_gpu_benchmark.py runs
the smoke run with those packages made unimportable). No wheels need carrying.

On a lent H200 (the `device` tool), one call:

    run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --out $OUT 2>&1 | tee $OUT/log.txt",
        timeout_s=540)

then copy `results.md` into BENCHMARKS.md with the date and device.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
for _path in (BENCH, ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

# (name pattern, dense bf16 FLOP/s, HBM bytes/s): vendor datasheet figures.
DEVICES = (("H200", 989e12, 4.8e12), ("H100 PCIe", 756e12, 2.0e12),
           ("H100", 989e12, 3.35e12))
SECTIONS = {"parity": ("parity",), "train": ("train_jax", "train_torch"),
            "decode": ("decode_jax", "generate_torch"), "scoring": ("scoring",)}
# The most seconds each part may take (compilation included) before the budget decides.
PART_LIMITS = {"parity": 75, "train_jax": 140, "train_torch": 80, "decode_jax": 130,
               "generate_torch": 60, "scoring": 80}
Row = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Every size the sections use; `FULL` for a GPU, `SMOKE` for a CPU check."""

    small: str            # preset of the parity / decode / scoring model
    small_kw: tuple        # overrides of that preset
    train: str            # preset of the train-step model
    train_kw: tuple
    parity_rows: int
    parity_length: int
    pairs: int
    pair_length: int
    train_steps: int
    decode_batches: tuple[int, ...]
    context: int
    new_tokens: int
    k_prompts: int
    k: int
    k_prompt_range: tuple[int, int]
    k_new_tokens: int
    score_prompts: int
    score_k: int
    score_batch: int


FULL = Sizes("llama3p2_1b", (), "llama3_8b", (("num_layers", 8),), 2, 512, 8, 1024, 3,
             (1, 64, 256), 1024, 128, 16, 16, (100, 250), 256, 64, 16, 64)
SMOKE = Sizes("tiny", (("tie_word_embeddings", True),), "tiny", (), 2, 48, 2, 128, 2,
              (1, 4, 8), 32, 8, 2, 4, (5, 12), 8, 4, 2, 4)


def device_peaks(name: str) -> tuple[float | None, float | None]:
    """(bf16 dense FLOP/s, HBM bytes/s) of a device by its name, or (None, None)."""
    for pattern, flops, bandwidth in DEVICES:
        if all(word in name for word in pattern.split()):
            return flops, bandwidth
    return None, None


def matmul_params(config: Any) -> int:
    """Parameters that take part in a matmul per token: every projection and the lm_head
    (the input embedding is a lookup)."""
    e, m, h, kv, d = (config.hidden_size, config.intermediate_size, config.num_heads,
                      config.num_kv_heads, config.head_dim)
    return config.num_layers * (e * d * (2 * h + 2 * kv) + 3 * e * m) + config.vocab_size * e


def train_flops(config: Any, lengths: list[int]) -> float:
    """Model FLOPs of one forward + backward over sequences of `lengths` real tokens."""
    dense = 6 * matmul_params(config) * sum(lengths)
    attention = 6 * config.num_layers * config.num_heads * config.head_dim * sum(
        n * n for n in lengths)
    return float(dense + attention)


def decode_step_bytes(config: Any, batch: int, slots: int, itemsize: int = 2) -> int:
    """HBM bytes one decode step must read: every weight once and each row's KV cache."""
    kv = 2 * config.num_layers * config.num_kv_heads * config.head_dim * slots * batch
    return (config.num_params + kv) * itemsize


# ---------------------------------------------------------------- helpers of the parts
def _config(name: str, overrides: tuple, **kw: Any) -> Any:
    from dice_jax.models.presets import preset

    return preset(name, **dict(overrides), **kw)


def _init_params(config: Any, seed: int = 0) -> Any:
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from dice_jax.models.decoder import Decoder

    ids = jnp.zeros((1, 1), jnp.int32)
    init = jax.jit(lambda key: nn.unbox(Decoder(config).init(key, ids, ids, ids))["params"])
    return init(jax.random.key(seed))


def _device_name() -> str:
    import jax

    return str(jax.devices()[0].device_kind)


def _hf_model(config: Any, params: Any, device: str, dtype: Any) -> Any:
    """A transformers model of `config` on `device` in `dtype`, with `params` copied in
    (or its own random init when `params` is None)."""
    import numpy as np
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = config.to_hf_dict()
    hf_config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    if params is not None:
        from dice_jax.checkpoints.placement import iter_hf_tensors

        state = {name: torch.from_numpy(np.ascontiguousarray(a, np.float32))
                 for name, a in iter_hf_tensors(params, config)}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise RuntimeError(f"weights do not map: missing {missing}, unexpected {unexpected}")
        if config.tie_word_embeddings:
            model.tie_weights()
    return model.eval()


def _torch_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _k_prompts(sizes: Sizes, vocab: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(1)
    return [rng.integers(3, vocab, int(rng.integers(*sizes.k_prompt_range))).tolist()
            for _ in range(sizes.k_prompts)]


# ---------------------------------------------------------------- the parts
def part_parity(sizes: Sizes, emit: Callable[[Row], None]) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from dice_jax.models.decoder import Decoder, positions_from_mask

    config = _config(sizes.small, sizes.small_kw)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(jnp.float32),
                          _init_params(config))
    rng = np.random.default_rng(0)
    n, t = sizes.parity_rows, sizes.parity_length
    ids = rng.integers(3, config.vocab_size, (n, t)).astype(np.int32)
    mask = np.ones((n, t), np.int32)
    mask[0, :t // 4] = 0  # a left-padded row
    real = mask.astype(bool)

    def ours(dtype: str) -> np.ndarray:
        with jax.default_matmul_precision("highest"):  # float32 really float32 (no TF32)
            out = jax.jit(lambda p: Decoder(config.replace(dtype=dtype)).apply(
                {"params": p}, jnp.asarray(ids), positions_from_mask(jnp.asarray(mask)),
                jnp.asarray(mask)))(params)
            return np.asarray(out.astype(jnp.float32))[real]

    jax32, jax16 = ours("float32"), ours("bfloat16")
    device = _torch_device()
    model = _hf_model(config, params, device, torch.float32)
    tids, tmask = torch.tensor(ids, device=device).long(), torch.tensor(mask, device=device)
    positions = torch.clamp(tmask.cumsum(-1) - 1, min=0)

    def theirs() -> np.ndarray:
        with torch.no_grad():
            out = model(input_ids=tids, attention_mask=tmask, position_ids=positions).logits
        return out.float().cpu().numpy()[real]

    hf32 = theirs()
    model.to(torch.bfloat16)
    hf16 = theirs()
    ours_err = float(np.max(np.abs(jax16 - jax32)))
    hf_err = float(np.max(np.abs(hf16 - hf32)))
    emit({"row": f"logits bf16, {sizes.small} shape, {n} x {t} tokens",
          "dice_bf16_vs_fp32": ours_err, "hf_bf16_vs_fp32": hf_err,
          "fp32_dice_vs_hf": float(np.max(np.abs(jax32 - hf32))),
          "logit_scale": float(np.max(np.abs(hf32))),
          "argmax_agree": float(np.mean(np.argmax(jax16, -1) == np.argmax(hf16, -1))),
          "pass": bool(ours_err <= 2 * hf_err)})


def _train_setup(sizes: Sizes) -> tuple[Any, Any, Any, Any]:
    from train_step import make_data

    from dice_jax.training.config import TrainConfig

    config = _config(sizes.train, sizes.train_kw, dtype="bfloat16")
    cfg = TrainConfig(learning_rate=5e-7, batch_size=sizes.pairs, max_length=sizes.pair_length,
                      max_prompt_length=64, shared_prompt=False)
    data = make_data(sizes.pairs, sizes.pair_length, config.vocab_size)
    args = argparse.Namespace(steps=sizes.train_steps)
    return config, cfg, data, args


def _time_steps(side: Any, steps: int) -> tuple[float, float, list[float]]:
    """(first-step seconds, median of the next `steps`, those steps)."""
    t0 = time.perf_counter()
    side.run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        side.run()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), times


def _train_row(name: str, config: Any, data: Any, first: float, median: float,
               peak_flops: float | None, extra: Row) -> Row:
    lengths = [int(x) for x in data.attention_mask.reshape(-1, data.attention_mask.shape[-1]
                                                           ).sum(-1)]
    flops = train_flops(config, lengths)
    return {"row": name, "step_ms": 1e3 * median, "tokens_per_s": sum(lengths) / median,
            "tflops": flops / median / 1e12,
            "mfu": None if peak_flops is None else flops / median / peak_flops,
            "first_call_s": first, "params_b": config.num_params / 1e9, **extra}


def part_train_jax(sizes: Sizes, emit: Callable[[Row], None]) -> None:
    import jax
    from train_step import JaxSide

    config, cfg, data, args = _train_setup(sizes)
    loaded = argparse.Namespace(params=_init_params(config), config=config)
    t0 = time.perf_counter()
    side = JaxSide(loaded, data, cfg)
    setup = time.perf_counter() - t0
    del loaded
    first, median, times = _time_steps(side, args.steps)
    stats = jax.devices()[0].memory_stats() or {}
    emit(_train_row(f"dice-jax DPO step, {sizes.train} x{config.num_layers} layers",
                    config, data, first, median, device_peaks(_device_name())[0],
                    {"setup_s": setup, "steps_s": times,
                     "peak_gib": stats.get("peak_bytes_in_use", 0) / 2**30}))


def part_train_torch(sizes: Sizes, emit: Callable[[Row], None]) -> None:
    import torch
    from train_step import TorchSide

    config, cfg, data, args = _train_setup(sizes)
    device = _torch_device()
    t0 = time.perf_counter()
    model = _hf_model(config, None, device, torch.float32)
    side = TorchSide(data, cfg, os.cpu_count() or 1, model=model, device=device,
                     autocast=torch.bfloat16)
    setup = time.perf_counter() - t0
    first, median, times = _time_steps(side, args.steps)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0
    emit(_train_row(f"PyTorch (TRL math, autocast bf16), {sizes.train} x{config.num_layers}",
                    config, data, first, median, device_peaks(name)[0],
                    {"setup_s": setup, "steps_s": times, "peak_gib": peak}))


def part_decode_jax(sizes: Sizes, emit: Callable[[Row], None]) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from dice_jax.models.decode import init_generated
    from dice_jax.sampling import Sampler, SamplingConfig
    from dice_jax.sampling.distributions import Distribution
    from dice_jax.sampling.generate import Program, chunk_size, decode, prefill

    config = _config(sizes.small, sizes.small_kw, dtype="bfloat16", param_dtype="bfloat16")
    params = _init_params(config)
    _, bandwidth = device_peaks(_device_name())
    # No stop token can be sampled (an id past the vocabulary): every row decodes in full.
    program = Program(config, Distribution(1.0, 0, 1.0), 1, sizes.new_tokens,
                      (config.vocab_size,), chunk=chunk_size(sizes.new_tokens))
    rng = np.random.default_rng(0)
    for batch in sizes.decode_batches:
        ids = jnp.asarray(rng.integers(3, config.vocab_size, (batch, sizes.context)), jnp.int32)
        mask = jnp.ones_like(ids)
        index = jnp.arange(batch, dtype=jnp.int32)
        generated = init_generated(config, batch, sizes.new_tokens, program.chunk)

        def run(limit: int, generated: Any, ids: Any = ids, mask: Any = mask,
                index: Any = index) -> tuple[dict, Any, float, float]:
            t0 = time.perf_counter()
            segments, logits = prefill(params, ids, mask, program=program)
            jax.block_until_ready(logits)
            t1 = time.perf_counter()
            out, generated = decode(params, segments, mask, logits, index, jnp.uint32(0),
                                    generated, jnp.int32(limit), program=program)
            jax.block_until_ready(out)
            return out, generated, t1 - t0, time.perf_counter() - t1

        t0 = time.perf_counter()
        _, generated, _, _ = run(1, generated)  # compiles prefill and decode
        compile_s = time.perf_counter() - t0
        out, generated, prefill_s, decode_s = run(sizes.new_tokens, generated)
        steps = int(out["steps"])  # forward passes after the prefill's first token
        step_s = decode_s / steps
        nbytes = decode_step_bytes(config, batch, sizes.context + sizes.new_tokens // 2)
        emit({"row": f"decode batch {batch}, context {sizes.context}",
              "step_ms": 1e3 * step_s, "tokens_per_s": batch * steps / decode_s,
              "roofline": None if bandwidth is None else nbytes / bandwidth / step_s,
              "prefill_tokens_per_s": batch * sizes.context / prefill_s,
              "first_call_s": compile_s})
        del generated, out
    # The K=16 workload through the user-facing sampler.
    prompts = _k_prompts(sizes, config.vocab_size)
    sampling = SamplingConfig(num_samples=sizes.k, max_new_tokens=sizes.k_new_tokens,
                              temperature=0.7, top_p=0.9, stop_token_ids=(2,),
                              cache_budget_gb=32.0, progress=False)
    sampler = Sampler(params, config)
    compile_s = sampler.compile(prompts, sampling)
    result = sampler.sample(prompts, sampling)
    emit({"row": f"sampler K={sizes.k}, {sizes.k_prompts} prompts, {sizes.k_new_tokens} new",
          "wall_s": result.seconds, "tokens_per_s": result.num_generated_tokens / result.seconds,
          "generated": result.num_generated_tokens, "first_call_s": compile_s})


def part_generate_torch(sizes: Sizes, emit: Callable[[Row], None]) -> None:
    import torch

    config = _config(sizes.small, sizes.small_kw)
    device = _torch_device()
    model = _hf_model(config, None, device, torch.bfloat16)
    prompts = _k_prompts(sizes, config.vocab_size)
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)

    def generate(new: int) -> Any:
        with torch.no_grad():
            return model.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                  temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=new,
                                  num_return_sequences=sizes.k, eos_token_id=2,
                                  pad_token_id=0)[:, width:]

    t0 = time.perf_counter()
    generate(4)  # warm-up
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = generate(sizes.k_new_tokens).cpu()
    seconds = time.perf_counter() - t0
    stops = (out == 2).int()
    lengths = torch.where(stops.any(-1), stops.argmax(-1) + 1, out.shape[1])
    tokens = int(lengths.sum())
    emit({"row": f"transformers generate K={sizes.k}, {sizes.k_prompts} prompts",
          "wall_s": seconds, "tokens_per_s": tokens / seconds, "generated": tokens,
          "first_call_s": warm})


def part_scoring(sizes: Sizes, emit: Callable[[Row], None]) -> None:
    from scoring import make_rows

    from dice_jax.training.scoring import sequence_scores

    config = _config(sizes.small, sizes.small_kw, dtype="bfloat16", param_dtype="bfloat16")
    params = _init_params(config)
    prompts, index, responses = make_rows(sizes.score_prompts, sizes.score_k,
                                          config.vocab_size)
    tokens = sum(len(prompts[i]) + len(r) for i, r in zip(index, responses))

    def run() -> float:
        t0 = time.perf_counter()
        logps, _ = sequence_scores(params, config, prompts, responses, index,
                                   batch_size=sizes.score_batch, progress=False)
        assert logps.dtype.name == "float32"
        return time.perf_counter() - t0

    first = run()
    seconds = run()
    emit({"row": f"scoring {len(responses)} responses, {tokens} tokens",
          "wall_s": seconds, "tokens_per_s": tokens / seconds, "first_call_s": first})


PARTS: dict[str, Callable[[Sizes, Callable[[Row], None]], None]] = {
    "parity": part_parity, "train_jax": part_train_jax, "train_torch": part_train_torch,
    "decode_jax": part_decode_jax, "generate_torch": part_generate_torch,
    "scoring": part_scoring}


# ---------------------------------------------------------------- the parent
def run_child(part: str, args: argparse.Namespace) -> int:
    """Runs one part in this process, appending its rows (or its error) to its JSONL file."""
    path = os.path.join(args.out, f"{part}.jsonl")

    def emit(row: Row) -> None:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"[{part}] {json.dumps(row)}", flush=True)

    try:
        PARTS[part](SMOKE if args.smoke else FULL, emit)
        return 0
    except Exception as e:  # a part's failure is a result, not a crash
        trace = traceback.format_exc()
        print(trace, file=sys.stderr, flush=True)
        emit({"error": f"{type(e).__name__}: {str(e)[:500]}", "trace": trace[-2000:]})
        return 1


def child_env(part: str, smoke: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, BENCH, env.get("PYTHONPATH")) if p)
    if smoke:
        env.update(JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    elif part == "train_jax":
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    return env


def run_part(part: str, args: argparse.Namespace, limit: float) -> dict:
    """One part in a child process with a time limit: its rows and error, if any."""
    path = os.path.join(args.out, f"{part}.jsonl")
    if os.path.exists(path):
        os.remove(path)
    cmd = [sys.executable, os.path.abspath(__file__), "--part", part, "--out", args.out]
    cmd += ["--smoke"] if args.smoke else []
    t0 = time.perf_counter()
    error = None
    try:
        proc = subprocess.run(cmd, env=child_env(part, args.smoke), timeout=limit,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        tail = proc.stdout[-3000:]
        print(tail if proc.returncode else "\n".join(
            line for line in proc.stdout.splitlines() if line.startswith("[")), flush=True)
        if proc.returncode:
            error = f"exit code {proc.returncode}"
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        print(out[-3000:], flush=True)
        error = f"timed out after {limit:.0f} s"
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    errors = [r["error"] for r in rows if "error" in r]
    rows = [r for r in rows if "error" not in r]
    if errors:
        error = errors[0]
    elif error is None and not rows:
        error = "no result"
    return {"rows": rows, "error": error, "seconds": time.perf_counter() - t0}


def _fmt(value: Any, spec: str = ".1f", scale: float = 1.0, suffix: str = "") -> str:
    return "" if value is None else f"{value * scale:{spec}}{suffix}"


def markdown(results: dict) -> str:
    head = ("| section | row | step (ms) | tokens/s | MFU / roofline | vs peer | first call (s) "
            "| detail |\n|---|---|---|---|---|---|---|---|\n")
    lines = []
    for section, parts in results["sections"].items():
        for part, res in parts.items():
            if res["error"]:
                lines.append(f"| {section} | {part} | | | | | | error: "
                             f"{res['error'][:150].replace('|', '/')} |")
            for r in res["rows"]:
                util = r.get("mfu", r.get("roofline"))
                detail = ""
                if section == "parity":
                    detail = (f"max abs logit error vs fp32: dice-jax "
                              f"{r['dice_bf16_vs_fp32']:.3g}, transformers "
                              f"{r['hf_bf16_vs_fp32']:.3g} (logits up to "
                              f"{r['logit_scale']:.2g}); argmax agree {r['argmax_agree']:.3f}; "
                              f"{'pass' if r['pass'] else 'FAIL'}")
                elif "peak_gib" in r:
                    detail = f"{r['tflops']:.0f} TFLOP/s, peak {r['peak_gib']:.1f} GiB"
                elif "wall_s" in r:
                    detail = f"{r['wall_s']:.2f} s"
                elif "prefill_tokens_per_s" in r:
                    detail = f"prefill {r['prefill_tokens_per_s']:.0f} tokens/s"
                lines.append(
                    f"| {section} | {r['row']} | {_fmt(r.get('step_ms'))} | "
                    f"{_fmt(r.get('tokens_per_s'), '.0f')} | {_fmt(util, '.1f', 100, '%')} | "
                    f"{_fmt(r.get('vs_peer'), '.2f', suffix='x')} | "
                    f"{_fmt(r.get('first_call_s'))} | {detail} |")
    return head + "\n".join(lines) + "\n"


def add_ratios(sections: dict) -> None:
    """dice-jax tokens/s over its peer's: the train step, and the sampler over generate."""
    pairs = (("train", "train_jax", "train_torch", 0), ("decode", "decode_jax",
                                                        "generate_torch", -1))
    for section, ours, peer, which in pairs:
        got = sections.get(section, {})
        if ours in got and peer in got and got[ours]["rows"] and got[peer]["rows"]:
            row = got[ours]["rows"][which]
            row["vs_peer"] = row["tokens_per_s"] / got[peer]["rows"][0]["tokens_per_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.md / results.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, on the CPU")
    parser.add_argument("--budget", type=float, default=400.0,
                        help="seconds for the whole command, compilation included")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {list(SECTIONS)}")
    parser.add_argument("--part", choices=sorted(PARTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.part:
        return run_child(args.part, args)
    start = time.perf_counter()
    chosen = [s for s in args.sections.split(",") if s]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; known: {list(SECTIONS)}")
    todo = [(s, p) for s in chosen for p in SECTIONS[s]]
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M:%S"),
                               "mode": "smoke" if args.smoke else "full",
                               "sizes": dataclasses.asdict(SMOKE if args.smoke else FULL),
                               "sections": {}}
    for i, (section, part) in enumerate(todo):
        left = args.budget - (time.perf_counter() - start)
        reserve = 10.0 * (len(todo) - i - 1)  # a little for each part still to come
        limit = max(5.0, min(PART_LIMITS[part], left - reserve))
        print(f"== {section}/{part} (limit {limit:.0f} s)", flush=True)
        res = run_part(part, args, limit)
        results["sections"].setdefault(section, {})[part] = res
        if res["error"]:
            print(f"== {section}/{part} FAILED: {res['error']}", flush=True)
    add_ratios(results["sections"])
    results["seconds"] = time.perf_counter() - start
    table = markdown(results)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"{results['date']}, {results['mode']}, {results['seconds']:.0f} s\n\n{table}")
    print(f"\n{table}\nwall time {results['seconds']:.0f} s", flush=True)
    failed = [p for parts in results["sections"].values() for p, r in parts.items() if r["error"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
