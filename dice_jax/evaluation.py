"""Evaluation: responses to instruction prompts, judged by the verifiable judge.

For each prompt the policy answers greedily and/or once with the sampling settings
(`EvalConfig.greedy`, `.sampled`; `.max_new_tokens`). Prompts with IFEval instructions are
scored strictly (`dice_jax.judge.score`): prompt-level and instruction-level accuracy, plus
mean response length in characters for every prompt. An output folder holds

- `metrics.json`: `{"greedy": {...}, "sampled": {...}, "prompts": {...}}`, each mode with
  `prompt_level_strict`, `instruction_level_strict` (fractions; absent when no prompt has
  instructions), `mean_length` (characters) and counts: the shape `dice_jax.report` reads;
- `responses.jsonl`: one row per (prompt, mode) with the response, its finish reason and
  which instructions it followed;
- `model_outputs.json`: AlpacaEval's format (`instruction`, `output`, `generator`,
  `dataset`), greedy outputs (sampled when greedy is off), for any prompt set, so a user
  with judge access can run AlpacaEval 2 on it.

Prompt sets are read by `dice_jax.data.load_eval_prompts`. The command line is
`python -m dice_jax.evaluate`; the run loop evaluates as a stage (`dice_jax.run.stages`).
"""

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from dice_jax.errors import ConfigError, DiceError
from dice_jax.fileio import atomic_write_text, write_json, write_jsonl
from dice_jax.sampling.config import SamplingConfig
from dice_jax.sampling.sampler import Sampler
from dice_jax.settings import check_settings, section, setting

MODES = ("greedy", "sampled")


@section
class EvalConfig:
    """Held-out evaluation with the verifiable judge (the run config's `eval` section).

    The sampled mode draws with the run's `sampling` distribution (temperature, top-p,
    top-k) and prompt limit, one response per prompt, seeded by `seed`."""

    enabled: bool = setting(True, "evaluate the start model and every round")
    prompts: str = setting("builtin:eval", "builtin:eval | builtin:train | toy:eval | a "
                           "JSONL/JSON file | a hub data set id (e.g. google/IFEval)")
    num_prompts: int = setting(256, "prompts evaluated (files and hub sets: the first N)",
                               min=1)
    seed: int = setting(0, "prompt generation and sampled-mode seed")
    max_new_tokens: int = setting(1024, "tokens per response at most", min=1)
    greedy: bool = setting(True, "a greedy response per prompt")
    sampled: bool = setting(True, "one response per prompt with the sampling settings")

    def __post_init__(self) -> None:
        check_settings(self, "eval.")

    def check(self) -> None:
        if self.enabled and not (self.greedy or self.sampled):
            raise ConfigError("config.eval.greedy: eval is enabled but neither greedy nor "
                              "sampled is on")


def mode_settings(evaluation: EvalConfig, sampling: SamplingConfig
                  ) -> dict[str, SamplingConfig]:
    """The SamplingConfig of each mode: one response per prompt, `max_new_tokens`.

    Both modes keep `sampling`'s prompt limit (over-long prompts left-truncated and
    counted) and cache budget; greedy sets temperature 0, top-p 1, top-k 0; sampled keeps
    the distribution with `evaluation.seed`.
    """
    if not evaluation.greedy and not evaluation.sampled:
        raise DiceError("evaluation needs greedy=True or sampled=True")
    common = dict(num_samples=1, max_new_tokens=evaluation.max_new_tokens,
                  truncate_prompts=True, seed=evaluation.seed)
    out = {}
    try:
        if evaluation.greedy:
            out["greedy"] = dataclasses.replace(sampling, temperature=0.0, top_p=1.0, top_k=0,
                                                **common)
        if evaluation.sampled:
            if sampling.temperature == 0:
                raise DiceError("the sampled evaluation has temperature 0 (that is greedy)")
            out["sampled"] = dataclasses.replace(sampling, **common)
    except ValueError as e:
        raise DiceError(f"evaluation settings: {e}") from None
    return out


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
                    evaluation: EvalConfig, sampling: SamplingConfig, mesh: Any = None,
                    generator_name: str = "dice-jax", dataset_name: str = "dice-jax-eval",
                    sampler: Sampler | None = None) -> dict[str, Any]:
    """Answers every prompt greedily and/or once sampled, judges, writes `out_dir`; returns
    the metrics (also written to `out_dir/metrics.json`).

    `prompt_rows`: rows of `load_eval_prompts` (`prompt`, optional `id`, `instruction_ids`,
    `kwargs`, `dataset`). `mode_settings(evaluation, sampling)` sets the modes. A
    `sampler` built for the same params may be passed to reuse its placement. Each file is
    written under a temporary name and renamed; `out_dir` is created if missing.
    """
    from dice_jax.judge.score import score_response

    settings = mode_settings(evaluation, sampling)
    if not prompt_rows:
        raise DiceError("no evaluation prompts")
    if tokenizer is None:
        raise DiceError("the model has no tokenizer; evaluation needs one to read prompts")
    sampler = sampler or Sampler(params, model_config, tokenizer, mesh)
    os.makedirs(out_dir, exist_ok=True)
    texts = [str(r["prompt"]) for r in prompt_rows]
    metrics: dict[str, Any] = {}
    records: dict[str, list[dict[str, Any]]] = {}
    for mode, mode_setting in settings.items():
        try:
            result = sampler.sample(texts, mode_setting)
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
        metrics[mode] = _mode_metrics(records[mode], golds, result, mode_setting)
    metrics["prompts"] = {"num": len(prompt_rows), "dataset": dataset_name,
                          "with_instructions": sum(bool(r.get("instruction_ids"))
                                                   for r in prompt_rows)}
    metrics["generator"] = generator_name
    write_jsonl(os.path.join(out_dir, "responses.jsonl"),
                [r for mode in records for r in records[mode]])
    shown = "greedy" if "greedy" in records else "sampled"
    outputs = [{"instruction": row["prompt"], "output": rec["response"],
                "generator": generator_name, "dataset": row.get("dataset", dataset_name)}
               for row, rec in zip(prompt_rows, records[shown], strict=True)]
    atomic_write_text(os.path.join(out_dir, "model_outputs.json"),
                      json.dumps(outputs, indent=2, ensure_ascii=False) + "\n")
    write_json(os.path.join(out_dir, "metrics.json"), metrics)
    return metrics


