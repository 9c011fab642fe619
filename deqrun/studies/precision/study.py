"""The study: run the parts the options ask for, write CSV, PNG and summary.md into one folder."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import plots
from .checkpoint import (
    CHECKPOINT_BATCH_SIZE,
    CHECKPOINT_BATCHES,
    CHECKPOINT_FIELDS,
    checkpoint_study,
)
from .methods import KS, LAMBDAS, Method, method_grid
from .report import checkpoint_summary, dynamic_summary, synthetic_summary, write_csv
from .runfolder import RunFolder, open_run
from .stats import focus_norm, medians
from .synthetic import (
    SEEDS,
    SPECTRAL_NORMS,
    SYNTHETIC_BATCH,
    SYNTHETIC_FIELDS,
    WIDTHS,
    synthetic_study,
)

PROG = "deqrun.studies.precision"


@dataclass
class StudyOptions:
    """What to compute and where to write it (mdeq_*: the trained-checkpoint part's sizes)."""

    out: Path
    run: Path | None = None
    widths: list[int] = field(default_factory=lambda: list(WIDTHS))
    spectral_norms: list[float] = field(default_factory=lambda: list(SPECTRAL_NORMS))
    seeds: int = SEEDS
    batch: int = SYNTHETIC_BATCH
    mdeq_batches: int = CHECKPOINT_BATCHES
    mdeq_batch_size: int = CHECKPOINT_BATCH_SIZE
    ks: list[int] = field(default_factory=lambda: list(KS))
    lambdas: list[float] = field(default_factory=lambda: list(LAMBDAS))
    threads: int | None = None


def say(message: str) -> None:
    """A progress line on stderr."""
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` intra-op threads (small matmuls are faster on one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_synthetic(options: StudyOptions, methods: list[Method]) -> str:
    """Part 1: CSV, three plots; returns its summary section."""
    start = time.perf_counter()
    with torch_threads(1):
        rows = synthetic_study(options.widths, options.spectral_norms, options.seeds, methods,
                               options.batch)
    write_csv(options.out / "synthetic.csv", rows, SYNTHETIC_FIELDS)
    norm = focus_norm(options.spectral_norms)
    table = medians(rows, spectral_norm=norm)
    title = f"(synthetic, spectral norm {norm:g})"
    plots.plot_vs_k(table, options.ks, options.lambdas, title, options.out / "synthetic_vs_k.png")
    plots.plot_heatmap(table, options.ks, options.lambdas, title,
                       options.out / "synthetic_heatmap.png")
    plots.plot_vs_spectral_norm(rows, options.out / "synthetic_vs_spectral_norm.png")
    say(f"synthetic: {len(rows)} rows in {time.perf_counter() - start:.0f} s")
    return synthetic_summary(rows, options.ks, options.lambdas)


def run_checkpoint(run: RunFolder, options: StudyOptions, methods: list[Method]) -> str:
    """Part 2: CSV and plot for the run's checkpoint; returns its summary section."""
    start = time.perf_counter()
    with torch_threads(options.threads or torch.get_num_threads()):
        rows, info = checkpoint_study(run, methods, options.mdeq_batches, options.mdeq_batch_size)
    write_csv(options.out / "mdeq.csv", rows, CHECKPOINT_FIELDS)
    plots.plot_vs_k(medians(rows), options.ks, options.lambdas, f"({info['model']} checkpoint)",
                    options.out / "mdeq_vs_k.png")
    say(f"checkpoint: {len(rows)} rows in {time.perf_counter() - start:.0f} s")
    return checkpoint_summary(rows, info, options.ks, options.lambdas, options.mdeq_batch_size)


def run_dynamic(run: RunFolder, options: StudyOptions) -> str:
    """Part 3: the logged grad_cosine values as CSV and PNG; returns its summary section."""
    rows = [dict(step=step, grad_cosine=value) for step, value in run.cosines]
    write_csv(options.out / "dynamic_precision.csv", rows, ["step", "grad_cosine"])
    plots.plot_dynamic(run.cosines, options.out / "dynamic_precision.png")
    return dynamic_summary(run.cosines)


def run_study(options: StudyOptions) -> Path:
    """Run every part that the options ask for; return the path of summary.md."""
    run = open_run(options.run) if options.run is not None else None
    options.out.mkdir(parents=True, exist_ok=True)
    methods = method_grid(options.ks, options.lambdas)
    sections = ["# Gradient precision study (Geng et al. 2021, Figs. 1 and 3)", "",
                run_synthetic(options, methods)]
    if run is not None:
        sections += [run_checkpoint(run, options, methods), run_dynamic(run, options)]
    summary = options.out / "summary.md"
    summary.write_text("\n".join(sections))
    say(f"wrote {summary}")
    return summary
