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
    if not evals:
        raise DiceError(f"{run_dir}: no evaluations found (expected start/eval/metrics.json "
                        "or round_N/eval/metrics.json; run `python -m dice_jax.evaluate`)")
    return {"label": label, "dir": run_dir, "round0": bool(config.get("round0")),
            "evals": evals}


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
    lines += ["", "Runs: " + ", ".join(f"`{r['dir']}` ({r['label']})" for r in runs), ""]
    stem = os.path.splitext(out)[0]
    for key, ylabel, suffix in (("prompt_level_strict", "prompt-level strict accuracy",
                                 "accuracy"), ("mean_length", "mean length (chars)", "length")):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for run in runs:
            stages = sorted(run["evals"])
            ax.plot([max(s, 0) if s >= 0 else -0.5 for s in stages],
                    [run["evals"][s]["greedy"][key] for s in stages], marker="o",
                    label=run["label"])
        ax.set_xlabel("round (-0.5: start model, 0: after round-0 offline DPO)")
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
