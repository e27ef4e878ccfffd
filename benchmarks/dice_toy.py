"""DICE against offline DPO on the controlled task, where the true reward is known.

    python benchmarks/dice_toy.py [--seeds 0,1,2,3,4] [--rounds 3] [--out runs/dice_toy]

For each seed, `configs/toy.py` (start model `toy:tiny:SEED`, D_offline `toy:128` drawn
with the seed) runs round 0 (DPO on the gold-labelled pairs) once, then `--rounds` further
rounds of each method from copies of that round 0, with the same steps and batch size:

    dice                  Algorithm 1 (implicit reward, alpha*, replay gamma = 0.5)
    offline_dpo           DPO on D_offline again, fixed reference pi_ref(0)
    offline_dpo_new_ref   DPO on D_offline again, reference pi_theta(t-1)

Every model (start, round 0, round 1, ...) then answers the held-out `toy:eval` prompts with
`--probe-samples` samples each (the run's sampling settings, one fixed seed), and
`dice_jax.toy.probe` measures the samples: mean gold reward, the implicit reward's
pairwise ranking accuracy against the gold reward (the policy against the reference it was
trained with), and mean length. For DICE rounds it also reads each data stage's own
figures of the reward that labelled D_t: its held-out accuracy and the fraction of the
round's pairs the gold reward agrees with. The guard is off (DICE as the paper runs it),
so a round below the default threshold still runs and shows what it would have done.
The script prints, per method and round, the mean and the standard deviation over seeds
of each figure, with the training pairs per round, and
writes OUT/results.json and OUT/dice_toy_gold.png (gold reward and implicit-reward
accuracy by round, rounds on a categorical axis). Everything runs in this process, so
programs compile once.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
import time
from typing import Any

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
METHODS = ("dice", "offline_dpo", "offline_dpo_new_ref")
SHARED = ("start/eval", "round_0/train", "round_0/eval")
FIGURES = ("gold", "accuracy", "length")  # of fresh samples (dice_jax.toy.probe)
LABELLING = ("heldout", "pairs_right")  # of the DICE round's own labels (its data stage)


def toy_config(seed: int, rounds: int, method: str, run_dir: str) -> Any:
    """configs/toy.py with the benchmark's changes (seed, rounds, method, no eval stages:
    the probes measure every model instead)."""
    spec = importlib.util.spec_from_file_location("toy_config", os.path.join(
        REPO, "configs", "toy.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.run_dir, c.method, c.rounds, c.seed = run_dir, method, rounds, seed
    c.model.policy = f"toy:tiny:{seed}"
    c.eval.enabled = False
    c.dice.guard.min_heldout_accuracy = 0.0  # DICE as the paper runs it; figures still kept
    return c


def labelling_figures(run_dir: str, rounds: int) -> dict[int, dict[str, float | None]]:
    """Per DICE round t, from its data stage: the held-out accuracy of the reward that
    labelled D_t and the fraction of D(alpha*)'s pairs the gold reward agrees with."""
    from dice_jax.fileio import read_json

    out = {}
    for t in range(1, rounds + 1):
        path = os.path.join(run_dir, f"round_{t}", "data", "stats.json")
        if not os.path.isfile(path):
            continue
        health = read_json(path)["reward_health"]
        out[t] = {"heldout": health.get("heldout_implicit_accuracy"),
                  "pairs_right": (health.get("judge_pair_agreement") or {}).get("agree")}
    return out


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The three methods of one seed: runs, probes, training pairs per round."""
    import jax

    from dice_jax.config import validate
    from dice_jax.fileio import read_json
    from dice_jax.run.folder import seed_stages
    from dice_jax.run.loop import DiceRun
    from dice_jax.toy.language import eval_rows
    from dice_jax.toy.probe import probe_run

    prompts = eval_rows("eval", args.probe_prompts)
    out: dict[str, Any] = {}
    shared_probes: dict[str, Any] = {}
    for method in METHODS:
        run_dir = os.path.join(args.out, f"seed{seed}", method)
        first = os.path.join(args.out, f"seed{seed}", METHODS[0])
        if method != METHODS[0] and not os.path.exists(os.path.join(run_dir, "manifest.json")):
            seed_stages(first, run_dir, SHARED)
        config = validate(toy_config(seed, args.rounds, method, run_dir), jax.device_count())
        start = time.perf_counter()
        run = DiceRun(config, progress=False)
        run.run()
        run_seconds = time.perf_counter() - start
        probes = probe_run(run, prompts, args.probe_samples, skip=shared_probes)
        shared_probes = {k: v for k, v in probes.items() if k in ("start", "round 0")}
        stages = read_json(os.path.join(run_dir, "manifest.json"))["stages"]
        pairs = {t: stages.get(f"round_{t}/train", {}).get("train_pairs")
                 for t in range(args.rounds + 1)}
        out[method] = {"probes": {k: v.as_dict() for k, v in probes.items()},
                       "train_pairs": pairs,
                       "labelling": labelling_figures(run_dir, args.rounds),
                       "seconds": round(run_seconds, 1),
                       "probe_seconds": round(time.perf_counter() - start - run_seconds, 1)}
        print(f"seed {seed} {method}: run {run_seconds:.0f} s, probes "
              f"{out[method]['probe_seconds']:.0f} s, gold "
              + " ".join(f"{p.gold:.3f}" for p in probes.values()), flush=True)
    return out


def summarise(results: dict[int, dict[str, Any]], rounds: int) -> dict[str, Any]:
    """`{method: {round name: {figure: (mean, std, n)}}}` over seeds (std with ddof=1)."""
    import numpy as np

    from dice_jax.toy.probe import round_names

    table: dict[str, Any] = {}
    for method in METHODS:
        table[method] = {}
        for name in round_names(rounds):
            row = {}
            t = None if name == "start" else int(name.split()[1])
            for figure in (*FIGURES, *LABELLING):
                if figure in FIGURES:
                    values = [results[s][method]["probes"][name][figure] for s in results]
                else:
                    values = [results[s][method]["labelling"].get(t, {}).get(figure)
                              for s in results]
                values = [v for v in values if v is not None]
                row[figure] = (float(np.mean(values)) if values else None,
                               float(np.std(values, ddof=1)) if len(values) > 1 else None,
                               len(values))
            row["train_pairs"] = sorted({results[s][method]["train_pairs"].get(
                int(name.split()[1])) for s in results} - {None}) if name != "start" else []
            table[method][name] = row
    return table


def format_table(table: dict[str, Any], num_seeds: int) -> str:
    def cell(stat: tuple[float | None, float | None, int], digits: int) -> str:
        mean, std, _ = stat
        if mean is None:
            return "-"
        return f"{mean:.{digits}f} ± {std:.{digits}f}" if std is not None else (
            f"{mean:.{digits}f}")

    lines = [f"mean ± std over {num_seeds} seeds. gold, accuracy, length: fresh samples of "
             "the round's model on held-out prompts; D_t held-out acc. / D_t pairs right: "
             "the implicit reward that labelled the DICE round's data, on D_offline's "
             "held-out pairs / judged by the gold reward on the round's own pairs",
             "| method | round | gold reward | implicit-reward accuracy | length (chars) "
             "| D_t held-out acc. | D_t pairs right | train pairs |",
             "|---|---|---|---|---|---|---|---|"]
    for method, rows in table.items():
        for name, row in rows.items():
            pairs = ",".join(str(p) for p in row["train_pairs"]) or "-"
            lines.append(f"| {method} | {name} | {cell(row['gold'], 3)} | "
                         f"{cell(row['accuracy'], 3)} | {cell(row['length'], 1)} | "
                         f"{cell(row['heldout'], 3)} | {cell(row['pairs_right'], 3)} | "
                         f"{pairs} |")
    return "\n".join(lines)


def plot(table: dict[str, Any], path: str) -> None:
    """Gold reward (left) and implicit-reward accuracy (right) by round per method, rounds
    on a categorical axis (start, round 0, round 1, ...), std over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    panels = (("gold", "mean gold reward of fresh samples"),
              ("accuracy", "implicit-reward accuracy vs gold"))
    for ax, (figure, label) in zip(axes, panels, strict=True):
        for offset, (method, rows) in zip((-0.08, 0.0, 0.08), table.items(), strict=True):
            names = [n for n in rows if rows[n][figure][0] is not None]
            positions = [list(rows).index(n) + offset for n in names]
            ax.errorbar(positions, [rows[n][figure][0] for n in names],
                        yerr=[rows[n][figure][1] or 0.0 for n in names], marker="o",
                        capsize=3, label=method)
        ax.set_xticks(range(len(rows)), list(rows))
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[1].axhline(0.5, color="grey", linestyle=":", linewidth=1)
    axes[0].legend()
    fig.suptitle("Controlled task (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (>= 3 "
                        "for a spread worth reading)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds after round 0")
    parser.add_argument("--out", default=os.path.join(REPO, "runs", "dice_toy"))
    parser.add_argument("--probe-prompts", type=int, default=64)
    parser.add_argument("--probe-samples", type=int, default=8)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    start = time.perf_counter()
    load = os.getloadavg()[0]
    results = {seed: run_seed(seed, args) for seed in seeds}
    table = summarise(results, args.rounds)
    text = format_table(table, len(seeds))
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "dice_toy_gold.png")
    plot(table, png)
    seconds = time.perf_counter() - start
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"seeds": seeds, "rounds": args.rounds, "results": results,
                   "table": table, "seconds": round(seconds, 1),
                   "load_average": [load, os.getloadavg()[0]]}, f, indent=2)
    print(text)
    print(f"\nplot: {png}\nwall time {seconds:.0f} s (load average {load:.1f} at the start, "
          f"{os.getloadavg()[0]:.1f} at the end, {os.cpu_count()} CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
