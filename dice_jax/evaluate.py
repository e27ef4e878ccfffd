"""Evaluation: responses to instruction prompts, judged by the verifiable judge.

    python -m dice_jax.evaluate --config=configs/X.py --checkpoint=SRC [--out=DIR]
        [--prompts=SPEC] [--name=NAME] [--config.KEY=VALUE ...]

For each prompt the policy answers greedily and/or once with the config's sampling
settings (`eval.greedy`, `eval.sampled`; `eval.max_new_tokens`). Prompts with IFEval
instructions are scored strictly (`dice_jax.judge.score`): prompt-level and
instruction-level accuracy, plus mean response length in characters for every prompt. An
output folder holds

- `metrics.json`: `{"greedy": {...}, "sampled": {...}, "prompts": {...}}`, each mode with
  `prompt_level_strict`, `instruction_level_strict` (fractions; absent when no prompt has
  instructions), `mean_length` (characters) and counts: the shape `dice_jax.report` reads;
- `responses.jsonl`: one row per (prompt, mode) with the response, its finish reason and
  which instructions it followed;
- `model_outputs.json`: AlpacaEval's format (`instruction`, `output`, `generator`,
  `dataset`), greedy outputs (sampled when greedy is off), for any prompt set, so a user
  with judge access can run AlpacaEval 2 on it.

Prompt sets (`eval.prompts` or `--prompts`): `builtin:eval` / `builtin:train` (the judge's
generated splits, `eval.num_prompts` of them, seed `eval.seed`), a JSONL / JSON file with
`prompt` or `instruction` per row (optional `instruction_ids` / `instruction_id_list` and
`kwargs`, `id` / `key`, `dataset`), or a hub data set such as `google/IFEval` (network
needed). Errors print one line and exit with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from dice_jax.errors import DiceError
from dice_jax.sampling.sampler import Sampler, SamplingConfig

MODES = ("greedy", "sampled")
GB = 1 << 30


def _prompt_row(row: Any, index: int, source: str) -> dict[str, Any]:
    """One prompt row of a file or hub data set in the judge's shape."""
    where = f"{source}: row {index}"
    if not isinstance(row, Mapping):
        raise DiceError(f"{where}: expected an object, got {type(row).__name__}")
    text = row.get("prompt", row.get("instruction"))
    if not isinstance(text, str) or not text.strip():
        raise DiceError(f"{where}: needs a non-empty string 'prompt' or 'instruction'")
    ids = row.get("instruction_ids", row.get("instruction_id_list"))
    kwargs = row.get("kwargs")
    out: dict[str, Any] = {"id": str(row.get("id", row.get("key", index))), "prompt": text}
    if ids:
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise DiceError(f"{where}: 'instruction_ids' must be a list of strings")
        kwargs = [{} for _ in ids] if kwargs is None else kwargs
        if not isinstance(kwargs, list) or len(kwargs) != len(ids) or not all(
                isinstance(k, Mapping) or k is None for k in kwargs):
            raise DiceError(f"{where}: 'kwargs' must be a list of {len(ids)} objects, one per "
                            "instruction")
        # Hub rows carry every argument of the column's struct; unused ones are None.
        out["instruction_ids"] = list(ids)
        out["kwargs"] = [{k: v for k, v in (a or {}).items() if v is not None} for a in kwargs]
    if isinstance(row.get("dataset"), str):
        out["dataset"] = row["dataset"]
    return out


def _read_prompt_file(path: str) -> list[Any]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.endswith(".json") or text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DiceError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(rows, list):
            raise DiceError(f"{path}: expected a JSON list of prompt objects")
        return rows
    rows = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DiceError(f"{path}:{line_no}: not valid JSON ({e})") from None
    return rows


def load_eval_prompts(spec: str, num: int | None = None, seed: int = 0) -> list[dict[str, Any]]:
    """Prompt rows `{"id", "prompt"[, "instruction_ids", "kwargs", "dataset"]}`.

    `spec`: `builtin:eval` / `builtin:train` (`num` generated prompts of that split with
    `seed`; `num` required), a `.jsonl` / `.json` file, or a hub data set id (its `train`
    split, e.g. `google/IFEval`). Files and hub sets give their first `num` rows (all when
    `num` is None).
    """
    from dice_jax.judge.prompts import generate_prompts

    if num is not None and num < 1:
        raise DiceError(f"number of eval prompts must be >= 1, not {num}")
    if spec.startswith("builtin:"):
        split = spec.split(":", 1)[1]
        if split not in ("eval", "train"):
            raise DiceError(f"{spec}: unknown built-in prompt set; use builtin:eval or "
                            "builtin:train")
        if num is None:
            raise DiceError(f"{spec}: the number of prompts to generate is required")
        return generate_prompts(split, num, seed)
    if os.path.isfile(spec):
        raw = _read_prompt_file(spec)
    elif os.path.exists(spec) or spec.endswith((".jsonl", ".json")) or not re.fullmatch(
            r"[\w.-]+/[\w.-]+", spec):
        raise DiceError(f"{spec}: prompt file not found (expected builtin:eval, a JSONL/JSON "
                        "file or a hub data set id such as google/IFEval)")
    else:
        try:
            from datasets import load_dataset

            raw = list(load_dataset(spec, split="train"))
        except Exception as e:  # datasets raises many types; all mean "not available"
            raise DiceError(f"{spec}: cannot load the hub data set (network access to the "
                            f"Hugging Face hub is needed; {type(e).__name__}: "
                            f"{str(e).strip()[:200]})") from None
    rows = [_prompt_row(r, i, spec) for i, r in enumerate(raw[:num] if num else raw)]
    if not rows:
        raise DiceError(f"{spec}: no prompts")
    seen: set[str] = set()
    for i, row in enumerate(rows):
        if row["id"] in seen:
            row["id"] = f"{row['id']}#{i}"
        seen.add(row["id"])
    return rows


def eval_kwargs(config: Any) -> dict[str, Any]:
    """`evaluate_policy`'s mode settings from a run config, as the run loop passes them:
    the sampled mode uses the `sampling` section's temperature / top-p / top-k and prompt
    limit (over-long prompts left-truncated, and counted) with `eval.seed`."""
    s, e = config.sampling, config.eval
    sampled = SamplingConfig(
        num_samples=1, max_new_tokens=e.max_new_tokens, temperature=s.temperature,
        top_p=s.top_p, top_k=s.top_k, seed=e.seed, max_prompt_tokens=s.max_prompt_tokens,
        truncate_prompts=True, cache_budget_bytes=int(s.cache_budget_gb * GB))
    return {"greedy": bool(e.greedy), "sampled": sampled if e.sampled else None,
            "max_new_tokens": int(e.max_new_tokens),
            "cache_budget_bytes": int(s.cache_budget_gb * GB)}


def mode_settings(greedy: bool, sampled: SamplingConfig | None, max_new_tokens: int,
                  cache_budget_bytes: int | None = None) -> dict[str, SamplingConfig]:
    """The SamplingConfig of each mode: one response per prompt, `max_new_tokens`.

    Greedy takes its prompt limits and progress setting from `sampled`, else from
    SamplingConfig's defaults; `sampled` keeps its distribution and seed (its
    `num_samples`, e.g. a run's K, becomes 1). `cache_budget_bytes` (None: keep) bounds
    the KV cache of a batch in both modes.
    """
    if not greedy and sampled is None:
        raise DiceError("evaluation needs greedy=True or a sampled SamplingConfig")
    budget = {} if cache_budget_bytes is None else {"cache_budget_bytes": cache_budget_bytes}
    try:
        out = {}
        if greedy:
            out["greedy"] = dataclasses.replace(
                sampled or SamplingConfig(), num_samples=1, temperature=0.0, top_p=1.0,
                top_k=0, max_new_tokens=max_new_tokens, **budget)
        if sampled is not None:
            if sampled.temperature == 0:
                raise DiceError("the sampled evaluation has temperature 0 (that is greedy)")
            out["sampled"] = dataclasses.replace(sampled, num_samples=1,
                                                 max_new_tokens=max_new_tokens, **budget)
    except ValueError as e:
        raise DiceError(f"evaluation settings: {e}") from None
    return out


def _atomic_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _mode_metrics(records: Sequence[Mapping[str, Any]], golds: Sequence[Any],
                  result: Any, settings: SamplingConfig) -> dict[str, Any]:
    """One mode's metrics: length and counts for all responses, accuracy for the judged."""
    from dice_jax.judge.score import aggregate

    n = len(records)
    metrics: dict[str, Any] = {
        "mean_length": sum(len(r["response"]) for r in records) / n,
        "mean_tokens": sum(r["num_tokens"] for r in records) / n,
        "num_prompts": n, "num_scored": len(golds),
        "finished_by_length": sum(r["finish_reason"] == "length" for r in records),
        "prompts_truncated": result.num_truncated, "seconds": round(result.seconds, 3),
        "settings": {"temperature": settings.temperature, "top_p": settings.top_p,
                     "top_k": settings.top_k, "max_new_tokens": settings.max_new_tokens,
                     "seed": settings.seed}}
    if golds:
        agg = aggregate(golds)
        metrics.update({"prompt_level_strict": agg["prompt_level_strict_acc"],
                        "instruction_level_strict": agg["instruction_level_strict_acc"],
                        "mean_score": agg["mean_score"],
                        "num_instructions": agg["num_instructions"],
                        "checker_errors": agg["checker_errors"],
                        "empty_responses": agg["empty_responses"]})
    return metrics


def evaluate_policy(params: Any, model_config: Any, tokenizer: Any,
                    prompt_rows: Sequence[Mapping[str, Any]], out_dir: str, *,
                    greedy: bool = True, sampled: SamplingConfig | None = None,
                    max_new_tokens: int = 1024, mesh: Any = None,
                    generator_name: str = "dice-jax", dataset_name: str = "dice-jax-eval",
                    cache_budget_bytes: int | None = None, sampler: Sampler | None = None
                    ) -> dict[str, Any]:
    """Answers every prompt greedily and/or once sampled, judges, writes `out_dir`; returns
    the metrics (also written to `out_dir/metrics.json`).

    `prompt_rows`: rows of `load_eval_prompts` (`prompt`, optional `id`, `instruction_ids`,
    `kwargs`, `dataset`). `sampled`: the distribution and seed of the sampled mode (None:
    off); see `mode_settings` for how the modes are set. `eval_kwargs(config)` gives
    `greedy`, `sampled`, `max_new_tokens` and `cache_budget_bytes` from a run config. A
    `sampler` built for the same params may be passed to reuse its placement. Each file is
    written under a temporary name and renamed; `out_dir` is created if missing.
    """
    from dice_jax.judge.score import score_response

    settings = mode_settings(greedy, sampled, max_new_tokens, cache_budget_bytes)
    if not prompt_rows:
        raise DiceError("no evaluation prompts")
    if tokenizer is None:
        raise DiceError("the model has no tokenizer; evaluation needs one to read prompts")
    sampler = sampler or Sampler(params, model_config, tokenizer, mesh)
    os.makedirs(out_dir, exist_ok=True)
    texts = [str(r["prompt"]) for r in prompt_rows]
    metrics: dict[str, Any] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    for mode, setting in settings.items():
        try:
            result = sampler.sample(texts, setting)
        except ValueError as e:
            raise DiceError(f"evaluation prompts: {e}") from None
        records[mode], golds = [], []
        for row, (sample,) in zip(prompt_rows, result.samples, strict=True):
            record: dict[str, Any] = {
                "id": row.get("id"), "prompt": row["prompt"], "mode": mode,
                "instruction_ids": row.get("instruction_ids"), "kwargs": row.get("kwargs"),
                "response": sample.text, "finish_reason": sample.finish_reason,
                "num_tokens": sample.length, "followed": None, "all_followed": None,
                "score": None}
            if row.get("instruction_ids"):
                gold = score_response(row, sample.text)
                golds.append(gold)
                record.update(followed=list(gold.followed), all_followed=gold.all_followed,
                              score=gold.score)
            records[mode].append(record)
        metrics[mode] = _mode_metrics(records[mode], golds, result, setting)
    metrics["prompts"] = {"num": len(prompt_rows), "dataset": dataset_name,
                          "with_instructions": sum(bool(r.get("instruction_ids"))
                                                   for r in prompt_rows)}
    metrics["generator"] = generator_name
    lines = [json.dumps(r, ensure_ascii=False) for mode in records for r in records[mode]]
    _atomic_text(os.path.join(out_dir, "responses.jsonl"), "\n".join(lines) + "\n")
    shown = "greedy" if "greedy" in records else "sampled"
    outputs = [{"instruction": row["prompt"], "output": rec["response"],
                "generator": generator_name, "dataset": row.get("dataset", dataset_name)}
               for row, rec in zip(prompt_rows, records[shown], strict=True)]
    _atomic_text(os.path.join(out_dir, "model_outputs.json"),
                 json.dumps(outputs, indent=2, ensure_ascii=False) + "\n")
    _atomic_text(os.path.join(out_dir, "metrics.json"),
                 json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return metrics


def evaluate_with_config(params: Any, model_config: Any, tokenizer: Any, config: Any,
                         out_dir: str, *, mesh: Any = None, generator_name: str = "dice-jax",
                         prompts: str | None = None) -> dict[str, Any]:
    """`evaluate_policy` with a run config's `eval` section (prompts, counts, settings):
    the run loop's entry point. `prompts` overrides `config.eval.prompts`."""
    spec = prompts or config.eval.prompts
    rows = load_eval_prompts(spec, config.eval.num_prompts, config.eval.seed)
    return evaluate_policy(params, model_config, tokenizer, rows, out_dir, mesh=mesh,
                           generator_name=generator_name, dataset_name=spec,
                           **eval_kwargs(config))


def default_name(checkpoint: str) -> str:
    """A folder name for a checkpoint source: `embedded:smollm2` -> `embedded_smollm2`."""
    base = os.path.basename(os.path.normpath(checkpoint)) if os.path.exists(checkpoint) else (
        checkpoint)
    return re.sub(r"[^\w.-]+", "_", base).strip("._") or "model"


def run_cli(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parses the command line, loads the model, evaluates; returns (out_dir, metrics)."""
    import jax

    from dice_jax.chat_templates import apply_chat_template
    from dice_jax.checkpoints import load_model
    from dice_jax.fileio import atomic_directory
    from dice_jax.run.config import build_config, parse_config_args
    from dice_jax.sharding import make_mesh

    spec, overrides, rest = parse_config_args(argv)
    parser = argparse.ArgumentParser(prog="python -m dice_jax.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None,
                        help="any model source (default: the config's model.policy)")
    parser.add_argument("--out", default=None,
                        help="output folder, must not exist (default RUN_DIR/evaluate/NAME)")
    parser.add_argument("--prompts", default=None, help="prompt set (default eval.prompts)")
    parser.add_argument("--name", default=None,
                        help="generator name in model_outputs.json and the default folder")
    args = parser.parse_args(rest)
    config = build_config(spec, overrides, device_count=jax.device_count())
    checkpoint = args.checkpoint or config.model.policy
    name = args.name or default_name(checkpoint)
    out = args.out or os.path.join(config.run_dir, "evaluate", name)
    if os.path.lexists(out):
        raise DiceError(f"{out}: already exists; refusing to overwrite (use --out)")
    prompts = args.prompts or config.eval.prompts
    rows = load_eval_prompts(prompts, config.eval.num_prompts, config.eval.seed)
    try:
        mesh = make_mesh(dict(config.mesh))
    except ValueError as e:
        raise DiceError(f"config.mesh: {e}") from None
    model = load_model(checkpoint, dtype=config.model.dtype,
                       param_dtype=config.model.param_dtype)
    if model.tokenizer is None:
        raise DiceError(f"{checkpoint}: has no tokenizer; evaluation needs one")
    try:
        apply_chat_template(model.tokenizer, config.model.chat_template)
    except ValueError as e:
        raise DiceError(f"config.model.chat_template: {e}") from None
    with atomic_directory(out) as tmp:
        metrics = evaluate_policy(model.params, model.config, model.tokenizer, rows, tmp,
                                  mesh=mesh, generator_name=name, dataset_name=prompts,
                                  **eval_kwargs(config))
    return out, metrics


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: exit code 0, or 2 with one line on a DiceError / ConfigError."""
    try:
        out, metrics = run_cli(sys.argv[1:] if argv is None else argv)
    except DiceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for mode in MODES:
        if mode in metrics:
            m = metrics[mode]
            acc = (f"prompt-level {100 * m['prompt_level_strict']:.1f}%, instruction-level "
                   f"{100 * m['instruction_level_strict']:.1f}%, "
                   if "prompt_level_strict" in m else "")
            print(f"{mode}: {acc}mean length {m['mean_length']:.0f} chars "
                  f"({m['num_prompts']} prompts)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
