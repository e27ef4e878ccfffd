"""The per-round Markdown report: alpha*, length statistics, training curves, evaluation.

Written into `RUN_DIR/round_N/report/` (`report.md`, `training_curves.png`) from the
artifacts the round's stages left; it reads files only, so it can be redrawn any time.
"""

from __future__ import annotations

import os
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from dice_jax.fileio import atomic_write_text, read_json
from dice_jax.run.metrics import read_metrics

CURVES = (("loss", "DPO loss"), ("rewards/accuracies", "reward accuracy"),
          ("rewards/margins", "reward margin"))


def _json(path: str) -> dict[str, Any] | None:
    return read_json(path) if os.path.isfile(path) else None


def plot_training_curves(records: list[dict[str, Any]], title: str, path: str) -> None:
    """Train (per step) and held-out (`eval/...`) curves of the TRL-named metrics."""
    fig, axes = plt.subplots(1, len(CURVES), figsize=(4.2 * len(CURVES), 3.4))
    steps = [r["step"] for r in records]
    for ax, (key, label) in zip(axes, CURVES):
        ax.plot(steps, [r.get(key) for r in records], label="train", lw=1.2)
        held = [(r["step"], r[f"eval/{key}"]) for r in records if f"eval/{key}" in r]
        if held:
            ax.plot(*zip(*held), "o-", label="held-out", ms=3)
        ax.set_xlabel("optimizer step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _eval_lines(metrics: dict[str, Any] | None, previous: dict[str, Any] | None) -> list[str]:
    if not metrics:
        return ["(evaluation disabled)"]
    lines = ["| mode | prompt-level strict | instruction-level strict | mean length (chars) |",
             "|---|---|---|---|"]
    for mode in ("greedy", "sampled"):
        m = metrics.get(mode)
        if not m:
            continue
        before = (previous or {}).get(mode) or {}

        def cell(key: str, fmt: str, m: dict = m, before: dict = before) -> str:
            value = m.get(key)
            if value is None:
                return "-"
            text = format(value, fmt)
            if before.get(key) is not None:
                text += f" ({value - before[key]:+{fmt}})"
            return text

        lines.append(f"| {mode} | {cell('prompt_level_strict', '.3f')} | "
                     f"{cell('instruction_level_strict', '.3f')} | "
                     f"{cell('mean_length', '.0f')} |")
    if previous:
        lines.append("\nIn brackets: the change from the previous round's model.")
    return lines


def _health_lines(stats: dict[str, Any]) -> list[str]:
    """The reward-health section (`dice_jax.dice.diagnostics`), when the stage measured it."""
    h = stats.get("reward_health")
    if not h:
        return []
    lines = ["## Is the implicit reward any good?", ""]
    if h.get("heldout_implicit_accuracy") is not None:
        lines.append(f"- held-out preference pairs ({h['heldout_pairs']}): the reward ranks "
                     f"{h['heldout_implicit_accuracy']:.3f} correctly, mean margin "
                     f"{h['heldout_margin']:.4g}")
    tau = (h.get("judge_rank_agreement") or {}).get("kendall_tau")
    if tau is not None:
        lines.append(f"- verifiable judge on this round's samples: Kendall tau {tau:.3f} "
                     f"(mean over {h['judge_rank_agreement']['prompts']} prompts)")
    pairs = h.get("judge_pair_agreement") or {}
    if pairs.get("agree") is not None:
        lines.append(f"- the judge on the {pairs['pairs']} pairs: chosen better "
                     f"{pairs['agree']:.2f}, worse {pairs['disagree']:.2f}, equal "
                     f"{pairs['tie']:.2f}")
    corr = [h.get("length_correlation_raw"), h.get("length_correlation_shaped")]
    lines.append("- reward vs length, within prompts: " + " before shaping, ".join(
        "-" if c is None else f"{c:.3f}" for c in corr) + " after")
    guard = stats.get("guard", {})
    if guard.get("action") == "offline":
        lines.append(f"- below dice.guard.min_heldout_accuracy="
                     f"{guard['min_heldout_accuracy']:g}: this round trained on D_offline")
    return [*lines, ""]


def write_round_report(run_dir: str, round_index: int, folder: str, method: str) -> str:
    """Writes `folder/report.md` (+ `training_curves.png`) for round `round_index`."""
    name = f"round_{round_index}"
    base = os.path.join(run_dir, name)
    stats = _json(os.path.join(base, "data", "stats.json"))
    train_info = os.path.join(base, "train")
    records = read_metrics(os.path.join(train_info, "metrics.jsonl"))
    lines = [f"# {name} ({method})", ""]
    if stats:
        drops = ", ".join(f"{k}: {v}" for k, v in stats["drops"].items()) or "none"
        lines += [
            "## Preference data", "",
            f"- prompts: {stats['num_prompts']}, K = {stats['k']}, valid responses: "
            f"{stats['num_valid_responses']}; drops: {drops}",
            f"- alpha* = {stats['alpha_star']:.6g} ({stats['alpha_search']['method']} search, "
            f"objective {stats['alpha_search']['objective']}, "
            f"{stats['alpha_search']['num_evaluations']} evaluations)",
            f"- mean length gap chosen - rejected ({stats['length_unit']}): "
            f"{stats['mean_length_gap_before']:.1f} before shaping, "
            f"{stats['mean_length_gap_after']:.1f} after",
            f"- pairs D(alpha*): {stats['num_pairs']}; replay gamma = "
            f"{stats['replay']['gamma']}: {stats['replay']['num_generated']} generated + "
            f"{stats['replay']['num_offline']} offline = {stats['replay']['num_rows']} rows",
            f"- mean implicit-reward margin of the pairs: {stats['reward_margin_mean']:.4g}",
            "", "![length gap](../data/length_gap.png)",
            "![alpha search](../data/alpha_search.png)", ""]
        lines += _health_lines(stats)
    if records:
        plot_training_curves(records, f"{name}: DPO training",
                             os.path.join(folder, "training_curves.png"))
        last = records[-1]
        lines += ["## Training", "",
                  f"- {last['step']} steps; final loss {last['loss']:.4f}, reward accuracy "
                  f"{last['rewards/accuracies']:.3f}, margin {last['rewards/margins']:.4g}",
                  "", "![training curves](training_curves.png)", ""]
    previous = _json(os.path.join(run_dir, f"round_{round_index - 1}", "eval", "metrics.json"))
    if previous is None and round_index <= 1:
        previous = _json(os.path.join(run_dir, "start", "eval", "metrics.json"))
    lines += ["## Evaluation (verifiable judge)", "",
              *_eval_lines(_json(os.path.join(base, "eval", "metrics.json")), previous), ""]
    path = os.path.join(folder, "report.md")
    atomic_write_text(path, "\n".join(lines))
    return path
