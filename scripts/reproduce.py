"""Every paper table in one command, resumable: `make reproduce SCALE=smoke|paper`.

    python scripts/reproduce.py --scale smoke [--only phantom,lm] [--dry] [--args "..."]

Tables are the presets configs/table/<name>_<scale>.yaml. For each selected table:
- finished (its newest sweep under outputs/tables/<name>-<scale>/ has table.md from deqrun-report
  and every expected run completed): skipped;
- started but unfinished: run again into the same sweep folder with trainer.resume=true, so
  completed runs are only re-summarised and interrupted ones continue from their checkpoints;
- never started: a new sweep folder.
Then deqrun-report writes the table's table.md, and outputs/tables/index-<scale>.md links every
table.md and figure. --dry prints each table's sweep and every job's config without running.
--args passes overrides to every job (e.g. "launcher=slurm hydra.launcher.partition=gpu").
Exit status: 0 when every selected table is finished, 1 otherwise, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from deqrun.report import COMPLETED, expected_runs, job_folders, load_run, table_meta  # noqa: E402

FIGURES = ("*.png", "*.svg", "*.pdf")


class ReproduceError(Exception):
    """Bad arguments (an unknown table, no table at the scale); one readable line."""


@dataclass
class TableState:
    """Where one table stands: its newest sweep, runs completed of expected, table.md, figures."""

    name: str
    sweep: Path | None = None
    completed: int = 0
    expected: int = 0
    report: Path | None = None
    figures: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        """finished, unfinished or not started."""
        if self.sweep is None:
            return "not started"
        finished = self.report is not None and self.completed >= max(self.expected, 1) \
            and not self.problems
        return "finished" if finished else "unfinished"


def discover_tables(configs: Path, scale: str) -> list[str]:
    """Names of the tables with a preset at `scale` (configs/table/<name>_<scale>.yaml)."""
    suffix = f"_{scale}"
    return sorted(p.stem[: -len(suffix)] for p in (configs / "table").glob(f"*{suffix}.yaml"))


def select(tables: list[str], only: str | None) -> list[str]:
    """The tables named in --only (comma-separated), in the order given; all without it."""
    if not only:
        return tables
    chosen = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in tables]
    if unknown:
        raise ReproduceError(f"no table {', '.join(unknown)} at this scale; "
                             f"tables: {', '.join(tables) or 'none'}")
    return chosen


def newest_sweep(root: Path) -> Path | None:
    """The newest sweep folder (timestamped names sort by time) holding job folders."""
    if not root.is_dir():
        return None
    sweeps = [p for p in sorted(root.iterdir()) if p.is_dir() and job_folders(p)]
    return sweeps[-1] if sweeps else None


def table_state(name: str, root: Path) -> TableState:
    """Inspect the table's newest sweep: runs completed of those its report metadata expects."""
    state = TableState(name, newest_sweep(root))
    if state.sweep is None:
        return state
    folders = job_folders(state.sweep)
    meta = table_meta(state.sweep, folders)
    runs = [load_run(folder, meta) for folder in folders]
    state.completed = sum(run.status == COMPLETED for run in runs)
    state.expected = expected_runs(meta) or len(runs)
    state.problems = [f"{run.folder}: {run.status}" for run in runs if run.status != COMPLETED]
    report = state.sweep / "table.md"
    state.report = report if report.is_file() else None
    state.figures = sorted(p for pattern in FIGURES for p in state.sweep.glob(pattern))
    return state


def write_index(tables_dir: Path, scale: str, states: list[TableState]) -> Path:
    """outputs/tables/index-<scale>.md: each table's status, table.md and figures, linked."""
    lines = [f"# Paper tables, {scale} scale", "",
             f"Written by scripts/reproduce.py on {time.strftime('%Y-%m-%d %H:%M')}. "
             "Rerun `make reproduce SCALE=" + scale + "` to finish the unfinished ones.", "",
             "| table | status | runs completed | table | figures |", "|---|---|---|---|---|"]
    for s in states:
        link = f"[table.md]({s.report.relative_to(tables_dir)})" if s.report else "-"
        figures = ", ".join(f"[{p.stem}]({p.relative_to(tables_dir)})" for p in s.figures) or "-"
        runs = f"{s.completed}/{s.expected}" if s.sweep else "-"
        lines.append(f"| {s.name} | {s.status} | {runs} | {link} | {figures} |")
    problems = [(s.name, p) for s in states for p in s.problems]
    if problems:
        lines += ["", "Runs not completed:", ""] + [f"- {name}: {p}" for name, p in problems]
    path = tables_dir / f"index-{scale}.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def table_commands(name: str, scale: str, sweep: Path, resume: bool, args: list[str],
                   python: str = sys.executable) -> list[list[str]]:
    """The sweep command (resuming into `sweep` if it exists) and the report command."""
    run = [python, "-m", "deqrun.cli", f"table={name}_{scale}", f"hydra.sweep.dir={sweep}"]
    run += ["trainer.resume=true"] if resume else []
    return [run + args, [python, "-m", "deqrun.report", str(sweep)]]


def run_commands(commands: list[list[str]]) -> int:
    """Run the sweep, then the report whatever the sweep's status; the sweep's status wins."""
    status = 0
    for command in commands:
        print("reproduce: " + shlex.join(command), file=sys.stderr, flush=True)
        code = subprocess.run(command, cwd=ROOT).returncode
        status = status or code
    return status


def dry_run(name: str, scale: str, args: list[str], configs: Path) -> int:
    """Print the table's sweep parameters and every job's composed config."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from deqrun.config import register_configs

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(configs)):
        base = [f"table={name}_{scale}", *args]
        params = compose("config", overrides=base, return_hydra_config=True).hydra.sweeper.params
        sweep = {key: str(value).split(",") for key, value in (params or {}).items()}
        print(f"# ==== table {name}_{scale}, sweep:")
        for key, values in sweep.items():
            print(f"#   {key}: {','.join(values)}")
        jobs = [dict(zip(sweep, values)) for values in itertools.product(*sweep.values())]
        for job in jobs:
            overrides = [f"{key}={value}" for key, value in job.items()]
            print(f"# ---- job {' '.join(overrides)}")
            cfg = compose("config", overrides=base + overrides)
            print(OmegaConf.to_yaml(cfg))
    return 0


def reproduce(scale: str, only: str | None = None, dry: bool = False, args: list[str] = (),
              outputs: Path = ROOT / "outputs" / "tables", configs: Path = ROOT / "configs",
              runner: Callable[[list[list[str]]], int] = run_commands) -> int:
    """Run (or print) every selected table; write the index; 0 when all are finished."""
    names = select(discover_tables(configs, scale), only)
    if not names:
        raise ReproduceError(f"no configs/table/*_{scale}.yaml")
    if dry:
        return max(dry_run(name, scale, list(args), configs) for name in names)
    states = []
    for name in names:
        root = outputs / f"{name}-{scale}"
        state = table_state(name, root)
        if state.status == "finished":
            print(f"reproduce: {name}: finished in {state.sweep}, skipped", file=sys.stderr)
        else:
            sweep = state.sweep or root / time.strftime("%Y-%m-%d_%H-%M-%S")
            runner(table_commands(name, scale, sweep, state.sweep is not None, list(args)))
            state = table_state(name, root)
        states.append(state)
    index = write_index(outputs, scale, states)
    print(f"reproduce: wrote {index}", file=sys.stderr)
    return 0 if all(s.status == "finished" for s in states) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reproduce", description=__doc__.split("\n")[0])
    parser.add_argument("--scale", default="smoke", help="smoke (CPU) or paper (GPU cluster)")
    parser.add_argument("--only", help="comma-separated table names (default: every table)")
    parser.add_argument("--dry", action="store_true", help="print every job's config, run none")
    parser.add_argument("--args", default="", help="overrides for every job, one string")
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs" / "tables")
    options = parser.parse_args(argv)
    try:
        return reproduce(options.scale, options.only, options.dry, shlex.split(options.args),
                         options.outputs)
    except ReproduceError as error:
        print(f"reproduce: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
