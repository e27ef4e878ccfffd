"""`python -m dice_jax.report RUN_DIR ... [--out report.md]`: the paper's Table 1 shape.

Reads the evaluation each run folder holds (`start/eval/metrics.json` for the policy a
run started from, `round_N/eval/metrics.json` after round N) and the run's `config.json`
(its method and loss), and writes a Markdown table with one row per (method, iteration):
base, offline DPO, offline DPO with a new reference, LLM-as-a-judge, DICE iter 1, 2, ...
plus two PNGs: accuracy and mean length per round for every run.

Metrics (from the verifiable judge, `dice_jax.judge`): prompt-level and instruction-level
strict accuracy (%) and mean response length in characters, for greedy decoding and, when
present, for the config's sampling settings.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any

from dice_jax.errors import DiceError
from dice_jax.fileio import atomic_write_text, read_json

METHOD_NAMES = {
    "dice": "DICE",
    "offline_dpo": "Offline DPO",
    "offline_dpo_new_ref": "Offline DPO (new reference)",
    "llm_judge": "LLM-as-a-judge",
}
METRIC_KEYS = ("prompt_level_strict", "instruction_level_strict", "mean_length")


def collect_run(run_dir: str) -> dict[str, Any]:
    """A run's label and its evaluations by stage: {"label", "evals": {round: metrics}}."""
    config = read_json(os.path.join(run_dir, "config.json"))
    method = config.get("method", "dice")
    label = METHOD_NAMES.get(method, method)
    loss = config.get("train", {}).get("loss_type", "sigmoid")
    if loss != "sigmoid":
        label += f" ({loss.upper()})"
    evals: dict[int, dict[str, Any]] = {}
    health: dict[int, dict[str, Any]] = {}
    for name in sorted(os.listdir(run_dir)):
        match = re.fullmatch(r"round_(\d+)", name)
        stage = -1 if name == "start" else int(match.group(1)) if match else None
        path = os.path.join(run_dir, name, "eval", "metrics.json")
        if stage is not None and os.path.isfile(path):
            metrics = read_json(path)
            missing = [k for k in METRIC_KEYS if k not in metrics.get("greedy", {})]
            if missing:
                raise DiceError(f"{path}: greedy metrics lack {missing}")
            evals[stage] = metrics
        stats_path = os.path.join(run_dir, name, "data", "stats.json")
        if match and os.path.isfile(stats_path):
            stats = read_json(stats_path)
            health[int(match.group(1))] = dict(stats.get("reward_health", {}),
                                               guard=stats.get("guard", {}).get("action"))
    if not evals:
        raise DiceError(f"{run_dir}: no evaluations found (expected start/eval/metrics.json "
                        "or round_N/eval/metrics.json; run `python -m dice_jax.evaluate`)")
    return {"label": label, "dir": run_dir, "round0": bool(config.get("round0")),
            "evals": evals, "health": health}


def _fmt(metrics: dict[str, Any] | None) -> list[str]:
    if not metrics:
        return ["-", "-", "-"]
    return [f"{100 * metrics['prompt_level_strict']:.1f}",
            f"{100 * metrics['instruction_level_strict']:.1f}",
            f"{metrics['mean_length']:.0f}"]


def table_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of [method, iteration, greedy P, I, len, sampled P, I, len]."""
    rows: list[list[str]] = []
    base = None
    start = None
    for run in runs:  # the policy entering round 1 is the base of Table 1
        entry = run["evals"].get(0 if run["round0"] else -1)
        if entry is not None:
            base = entry
            # With a round 0, the model it started from is a row of its own (the SFT /
            # instruct model, before any DPO), as the paper's tables list the SFT model.
            start = run["evals"].get(-1) if run["round0"] else None
            break
    if start is not None:
        rows.append(["Start model (before round 0)", "-",
                     *_fmt(start["greedy"]), *_fmt(start.get("sampled"))])
    if base is not None:
        rows.append(["Base (policy entering round 1)", "-",
                     *_fmt(base["greedy"]), *_fmt(base.get("sampled"))])
    for run in runs:
        for stage in sorted(s for s in run["evals"] if s >= 1):
            m = run["evals"][stage]
            rows.append([run["label"], str(stage), *_fmt(m["greedy"]), *_fmt(m.get("sampled"))])
    return rows


def _num(value: Any, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def health_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of [method, iter, held-out acc., margin, judge tau, judge pair agree /
    disagree / tie, length corr. raw -> shaped, guard] for every round with a data stage."""
    rows = []
    for run in runs:
        for t in sorted(run["health"]):
            h = run["health"][t]
            pairs = h.get("judge_pair_agreement") or {}
            verdicts = ("-" if pairs.get("agree") is None else
                        f"{pairs['agree']:.2f} / {pairs['disagree']:.2f} / {pairs['tie']:.2f}")
            rows.append([run["label"], str(t), _num(h.get("heldout_implicit_accuracy")),
                         _num(h.get("heldout_margin"), ".4g"),
                         _num((h.get("judge_rank_agreement") or {}).get("kendall_tau")),
                         verdicts,
                         f"{_num(h.get('length_correlation_raw'), '.2f')} -> "
                         f"{_num(h.get('length_correlation_shaped'), '.2f')}",
                         h.get("guard") or "-"])
    return rows


def stage_label(stage: int) -> str:
    return "start" if stage < 0 else f"round {stage}"


def write_report(run_dirs: list[str], out: str) -> str:
    """Writes the Markdown table to `out` and PNG plots beside it; returns the Markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [collect_run(d) for d in run_dirs]
    header = ("| method | iter | prompt acc. (greedy) | instr. acc. (greedy) | length "
              "(greedy) | prompt acc. (sampled) | instr. acc. (sampled) | length (sampled) |")
    lines = ["# Verifiable instruction-following: the paper's Table 1 shape", "",
             "Accuracies are IFEval-style strict accuracies (%) on the held-out eval prompts; "
             "lengths are mean characters per response.", "", header,
             "|" + "---|" * 8]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(runs)]
    health = health_rows(runs)
    if health:
        lines += ["", "## Is the implicit reward any good?", "",
                  "Measured before each round's data is built, with the reward that labels "
                  "it: accuracy and mean margin on held-out preference pairs; where the "
                  "prompts carry a verifiable judge, Kendall's tau with its scores (mean per "
                  "prompt) and its verdict on the round's pairs (chosen better / worse / "
                  "equal); the within-prompt correlation of the reward with length before "
                  "and after shaping with alpha*; what the guard did.", "",
                  "| method | iter | held-out acc. | held-out margin | judge tau | "
                  "judge on pairs | length corr. | guard |", "|" + "---|" * 8]
        lines += ["| " + " | ".join(row) + " |" for row in health]
    lines += ["", "Runs: " + ", ".join(f"`{r['dir']}` ({r['label']})" for r in runs), ""]
    stem = os.path.splitext(out)[0]
    # Rounds on a categorical axis: start, round 0, round 1, ... (each at its own tick).
    order = sorted({s for run in runs for s in run["evals"]})
    for key, ylabel, suffix in (("prompt_level_strict", "prompt-level strict accuracy",
                                 "accuracy"), ("mean_length", "mean length (chars)", "length")):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for run in runs:
            stages = sorted(run["evals"])
            ax.plot([order.index(s) for s in stages],
                    [run["evals"][s]["greedy"][key] for s in stages], marker="o",
                    label=run["label"])
        ax.set_xticks(range(len(order)), [stage_label(s) for s in order])
        ax.set_xlabel("policy")
        ax.set_ylabel(f"{ylabel}, greedy")
        ax.set_title(f"{ylabel.capitalize()} per round", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{stem}_{suffix}.png", dpi=120)
        plt.close(fig)
        lines.append(f"![{ylabel}]({os.path.basename(stem)}_{suffix}.png)")
    text = "\n".join(lines) + "\n"
    atomic_write_text(out, text)
    return text


def _define(fv: Any) -> None:
    from absl import flags

    flags.DEFINE_string("out", "report.md", "Markdown file to write", flag_values=fv)


def _run(fv: Any, run_dirs: list[str]) -> int:
    from dice_jax.errors import ConfigError

    if not run_dirs:
        raise ConfigError("give at least one RUN_DIR (a run folder with config.json)")
    print(write_report(run_dirs, fv.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m dice_jax.report RUN_DIR [RUN_DIR ...] --out=report.md`."""
    from dice_jax.cli import run_main

    return run_main(_run, argv, "python -m dice_jax.report", __doc__, _define)


if __name__ == "__main__":
    sys.exit(main())
