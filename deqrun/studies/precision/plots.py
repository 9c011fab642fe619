"""The study's figures, drawn on the Agg canvas (no pyplot, no global state)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .methods import FOCUS_K, FOCUS_LAMBDA, REFERENCES
from .stats import Key, medians


def new_figure(width: float, height: float, panels: int = 1) -> tuple[Figure, list[Axes]]:
    """A figure with `panels` axes in a row."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(1, panels, i + 1) for i in range(panels)]


def plot_vs_k(table: dict[Key, float], ks: list[int], lambdas: list[float], title: str,
              path: Path) -> None:
    """Median cosine vs k, one line per lambda, upg and npg panels, references as h-lines."""
    figure, axes = new_figure(10, 4, 2)
    for ax, name in zip(axes, ("upg", "npg")):
        for lam in lambdas:
            ax.plot(ks, [table.get((name, k, lam), np.nan) for k in ks], "o-",
                    label=f"lambda={lam:g}")
        for method, label, color in REFERENCES:
            if (method, None, None) in table:
                ax.axhline(table[(method, None, None)], ls="--", color=color, label=label)
        ax.set(xscale="log", xlabel="k", ylabel="median cosine with exact gradient",
               title=f"{name.upper()} {title}")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    figure.savefig(path, dpi=120)


def plot_heatmap(table: dict[Key, float], ks: list[int], lambdas: list[float], title: str,
                 path: Path) -> None:
    """Median cosine over the k x lambda grid, upg and npg panels."""
    figure, axes = new_figure(10, 4, 2)
    for ax, name in zip(axes, ("upg", "npg")):
        grid = np.array([[table.get((name, k, lam), np.nan) for lam in lambdas] for k in ks])
        low = min(float(np.nanmin(grid)), 0.99)
        image = ax.imshow(grid, vmin=low, vmax=1.0, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            color = "black" if value > (low + 1.0) / 2 else "white"
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(lambdas)), [f"{lam:g}" for lam in lambdas])
        ax.set_yticks(range(len(ks)), [str(k) for k in ks])
        ax.set(xlabel="lambda", ylabel="k", title=f"{name.upper()} {title}")
        figure.colorbar(image, ax=ax)
    figure.savefig(path, dpi=120)


def plot_vs_spectral_norm(rows: list[dict[str, Any]], path: Path) -> None:
    """Median cosine of A_{5,0.5} (and JFB) vs the spectral norm of W, one line per width."""
    figure, (ax,) = new_figure(6, 4)
    norms = sorted({row["spectral_norm"] for row in rows})
    for width in sorted({row["width"] for row in rows}):
        for method, k, lam, style in (("upg", FOCUS_K, FOCUS_LAMBDA, "o-"),
                                      ("jacobian_free", None, None, "x:")):
            values = [medians(rows, width=width, spectral_norm=n).get((method, k, lam), np.nan)
                      for n in norms]
            label = f"A_{{{FOCUS_K},{FOCUS_LAMBDA:g}}}" if method == "upg" else "JFB"
            ax.plot(norms, values, style, label=f"{label}, width {width}")
    ax.set(xlabel="spectral norm of W", ylabel="median cosine with exact gradient",
           title="Synthetic tanh layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figure.savefig(path, dpi=120)


def plot_dynamic(points: list[tuple[int, float]], path: Path) -> None:
    """Histogram of the logged grad_cosine values, and their course over training."""
    figure, (hist, course) = new_figure(10, 4, 2)
    steps, values = zip(*points)
    hist.hist(values, bins=min(30, max(5, len(values) // 2)), color="tab:blue")
    hist.set(xlabel="cosine with exact gradient", ylabel="checked steps",
             title="Dynamic precision (training)")
    course.plot(steps, values, "o-", ms=3)
    course.set(xlabel="step", ylabel="cosine with exact gradient", title="Cosine vs step")
    course.grid(alpha=0.3)
    figure.savefig(path, dpi=120)
