"""The paper's Figure 2 (length gap of pairs before/after shaping) and Figure 5 (objective
vs alpha with the searched points), as self-explanatory PNGs."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_length_gap(before: np.ndarray, after: np.ndarray, alpha: float, unit: str,
                    path: str) -> None:
    """Histogram of |y_w| - |y_l| over pairs at alpha = 0 and at alpha*."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    both = np.concatenate([before, after]) if len(before) + len(after) else np.zeros(1)
    bins = np.linspace(both.min() - 0.5, both.max() + 0.5, 41)
    ax.hist(before, bins=bins, alpha=0.55, label=f"alpha = 0 (mean {np.mean(before):+.1f})")
    ax.hist(after, bins=bins, alpha=0.55,
            label=f"alpha* = {alpha:.4g} (mean {np.mean(after):+.1f})")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_xlabel(f"length of chosen - length of rejected ({unit})")
    ax.set_ylabel("number of pairs")
    ax.set_title("DICE preference pairs: length gap before and after length-regularised "
                 "reward shaping", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_alpha_landscape(objective: Callable[[float], float], trace: list[tuple[float, float]],
                         alpha_star: float, objective_name: str, method: str, path: str,
                         points: int = 200) -> None:
    """The objective on a dense grid (line) with the search's evaluations (dots)."""
    plt = _pyplot()
    alphas = np.array([a for a, _ in trace])
    hi = max(float(alphas.max()), alpha_star) * 1.1 or 1.0
    grid = np.linspace(0.0, hi, points)
    values = np.array([objective(float(a)) for a in grid])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(grid, values, color="0.6", lw=1, label="objective (dense grid)")
    finite = [(a, v) for a, v in trace if np.isfinite(v)]
    ax.scatter([a for a, _ in finite], [v for _, v in finite], s=14, color="C0", zorder=3,
               label=f"{method} search: {len(trace)} evaluations")
    ax.axvline(alpha_star, color="C3", ls="--", lw=1, label=f"alpha* = {alpha_star:.4g}")
    label = {"mean_abs": "mean | |y_w| - |y_l| |  (Eq. 9)",
             "abs_mean": "| mean (|y_w| - |y_l|) |  (official code)"}[objective_name]
    ax.set_xlabel("alpha (length penalty in r_LR = r - alpha |y|)")
    ax.set_ylabel(label)
    ax.set_title("Search for alpha*: length gap of D(alpha) as a function of alpha", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
