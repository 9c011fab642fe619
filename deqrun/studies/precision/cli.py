"""The study's command line: python -m deqrun.studies.precision --out DIR [--run RUN_DIR] ..."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deqrun.errors import UserError

from . import __doc__ as STUDY_DOC
from .study import PROG, StudyOptions, run_study

EXIT_USER_ERROR = 2
QUICK = dict(widths=[16], spectral_norms=[0.5, 0.9], seeds=1, batch=4, mdeq_batches=1,
             mdeq_batch_size=8)
SIZES = ("widths", "spectral_norms", "seeds", "batch", "mdeq_batches", "mdeq_batch_size")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def contraction_norm(text: str) -> float:
    """An argparse type: a spectral norm in (0, 1)."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"spectral norms must be in (0, 1), got {value}")
    return value


def make_parser() -> argparse.ArgumentParser:
    """The study's options (the trained-checkpoint part keeps its historical --mdeq-* names)."""
    parser = argparse.ArgumentParser(prog=f"python -m {PROG}", description=STUDY_DOC,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for CSV, PNG, summary.md")
    parser.add_argument("--run", type=Path, help="a deqrun run folder (checkpoint + dynamic parts)")
    parser.add_argument("--widths", type=positive_int, nargs="+")
    parser.add_argument("--spectral-norms", type=contraction_norm, nargs="+")
    parser.add_argument("--seeds", type=positive_int, help="random layers per width and norm")
    parser.add_argument("--batch", type=positive_int, help="synthetic inputs per layer")
    parser.add_argument("--mdeq-batches", type=positive_int, help="test batches of the run's model")
    parser.add_argument("--mdeq-batch-size", type=positive_int)
    parser.add_argument("--threads", type=positive_int,
                        help="torch threads for the checkpoint part")
    parser.add_argument("--quick", action="store_true", help="a tiny grid, for tests")
    return parser


def parse_args(argv: list[str] | None = None) -> StudyOptions:
    """Command-line options; unset sizes take the full-study defaults (or --quick's)."""
    args = make_parser().parse_args(argv)
    options = StudyOptions(out=args.out, run=args.run, threads=args.threads)
    if args.quick:
        for name, value in QUICK.items():
            setattr(options, name, value)
    for name in SIZES:
        if getattr(args, name) is not None:
            setattr(options, name, getattr(args, name))
    return options


def main(argv: list[str] | None = None) -> int:
    """Console entry point; a user error prints one line and returns 2."""
    options = parse_args(argv)
    try:
        run_study(options)
    except UserError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
