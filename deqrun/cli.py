"""The `deqrun` command: compose the Hydra config, check it, claim the run folder, run training.

Exit status: 0 completed (or nothing left to do), 2 a user error (bad value, missing data, a
run folder in use or holding another run, an incompatible or unreadable checkpoint, a failed
write), 3 diverged, 128+N stopped by signal N (130 SIGINT, 143 SIGTERM), 1 a bug (traceback).
Every user error is one line on stderr. Nothing is written into a run folder before the config
is checked and the folder is claimed (deqrun.runner.folder). In a sweep (`deqrun -m ...`) a job
that fails writes its metrics.json with status "failed" and the error, the other jobs go on, and
the sweep ends with a summary and a non-zero status.
"""

from __future__ import annotations

import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from deqrun.config import check_run_name, register_configs, resolve
from deqrun.errors import Abort, Diverged, Interrupted, UserError, WriteError
from deqrun.results import read_metrics, write_metrics

PACKAGE_DIR = Path(__file__).resolve().parent
EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3


def config_dir() -> Path:
    """configs/ inside the installed package, or at the top of a source checkout."""
    for candidate in (PACKAGE_DIR / "configs", PACKAGE_DIR.parent / "configs"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"deqrun's configs/ folder is missing next to {PACKAGE_DIR}")


def _job(cfg: DictConfig) -> Any:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    was_empty = not any(run_dir.iterdir()) if run_dir.is_dir() else True
    held, ctx, failed = None, None, True
    try:
        config, resolved = resolve(cfg)
        from deqrun.runner import distributed as ddp
        from deqrun.runner import run  # the data and model stack loads after the config checks
        from deqrun.runner.build import select_device

        select_device(config.trainer.device)  # a device this machine lacks: before any write
        if config.trainer.distributed == "auto" and ddp.discover().rank > 0:
            _quiet_rank()
        ctx = ddp.setup_distributed(config.trainer.distributed, config.trainer.device)
        resume_requeued(config, resolved, run_dir, ctx)
        held, run_dir = _claim(run_dir, config, cfg, list(hydra_cfg.overrides.task), ctx)
        final = run(config, resolved, run_dir, held.previous, ctx)
        failed = False
        return final
    except UserError as error:
        if ctx is None or ctx.is_main:
            _record_failure(run_dir, held, was_empty, multirun, str(error))
            if multirun and was_empty and (held is None or held.previous is None):
                _try_job_config(run_dir, cfg, list(hydra_cfg.overrides.task))
        _leave(f"error: {error}", EXIT_USER_ERROR, multirun)
    except Diverged as diverged:
        _leave(f"diverged: {diverged}", EXIT_DIVERGED, multirun)
    except Interrupted as stop:
        _leave(str(stop), 128 + stop.signum, False)
    except (KeyboardInterrupt, Abort) as stop:
        signum = getattr(stop, "signum", signal.SIGINT)
        _leave(f"stopped by {signal.Signals(signum).name} before training started", 128 + signum,
               False)
    except Exception as error:
        if held is not None and held.may_record_failure and (ctx is None or ctx.is_main):
            _try_write(run_dir, status="failed", error=f"{type(error).__name__}: {error}")
        raise
    finally:
        if held is not None:
            held.release()
        if ctx is not None:
            ddp.teardown_distributed(ctx, wait=not failed)
    return None


def resume_requeued(config: Any, resolved: dict[str, Any], run_dir: Path, ctx: Any) -> None:
    """A job requeued after a time-out or preemption (its run folder holds a checkpoint and the
    requeue marker, or SLURM counts a restart) continues as with trainer.resume=true."""
    from deqrun.runner.preemption import should_resume

    trainer = config.trainer
    if trainer.resume or trainer.resume_from or trainer.overwrite:
        return
    if should_resume(run_dir, run_dir / "checkpoints" / "last.pt"):
        trainer.resume = True
        resolved["trainer"]["resume"] = True
        config.notes.append("requeued job (time-out or preemption): resumed from its checkpoint")


def _claim(run_dir: Path, config: Any, cfg: DictConfig, overrides: list[str],
           ctx: Any) -> tuple[Any, Path]:
    """Rank 0 claims the run folder (one process writes there); the other ranks of a
    data-parallel run learn its outcome and folder (their own may differ in a time-stamped
    default run_name) and hold no lock."""
    from deqrun.runner import distributed as ddp
    from deqrun.runner.folder import Claim, claim, write_job_config

    held, error = None, None
    if ctx.is_main:
        try:
            held = claim(run_dir, config)
            if held.previous is None:
                write_job_config(run_dir, cfg, overrides)
        except UserError as refused:
            error = refused
    shared = ddp.broadcast((str(run_dir), None if held is None else held.previous,
                            None if error is None else str(error)), ctx)
    if error is not None:
        raise error
    if ctx.is_main:
        return held, run_dir
    if shared[2] is not None:
        raise UserError(f"rank 0 refused the run: {shared[2]}")
    main_dir = Path(shared[0])
    if main_dir.resolve() != run_dir.resolve() and run_dir.is_dir() and \
            not any(run_dir.iterdir()):
        run_dir.rmdir()  # Hydra made this rank's own (time-stamped) folder
    return Claim(main_dir, shared[1], None), main_dir


def _quiet_rank() -> None:
    """Ranks other than 0 write no log file and print only warnings."""
    import logging

    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    logging.getLogger("deqrun").setLevel(logging.WARNING)


def _record_failure(run_dir: Path, held: Any, was_empty: bool, multirun: bool,
                    message: str) -> None:
    """Write status failed only where no other run's work lives; drop an empty new folder."""
    if held is not None:
        if held.may_record_failure:
            _try_write(run_dir, status="failed", error=message)
    elif was_empty and multirun:
        _try_write(run_dir, status="failed", error=message)
    elif was_empty and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def _try_job_config(run_dir: Path, cfg: DictConfig, overrides: list[str]) -> None:
    """A failed sweep job keeps its config in .hydra/ (deqrun-report places it by that)."""
    from deqrun.runner.folder import write_job_config

    try:
        write_job_config(run_dir, cfg, overrides)
    except WriteError:
        pass


def _try_write(run_dir: Path, **fields: Any) -> None:
    try:
        write_metrics(run_dir, **fields)
    except WriteError:
        pass


def _leave(message: str, status: int, multirun: bool) -> None:
    """Print one line; exit with `status` unless this is a sweep job (the sweep goes on)."""
    print(f"deqrun: {message}", file=sys.stderr)
    if not multirun:
        sys.exit(status)


class SweepSummary(Callback):
    """After a sweep: one line per job with its status; a non-zero exit if any job failed."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = {}
        for path in sorted(sweep_dir.glob("*/metrics.json")):
            content = read_metrics(path.parent)
            jobs[path.parent.name] = content if content else {"status": "unreadable"}
        failed = [name for name, job in jobs.items() if job.get("status") != "completed"]
        print(f"deqrun sweep: {len(jobs) - len(failed)} of {len(jobs)} jobs completed "
              f"in {sweep_dir}", file=sys.stderr)
        for name in failed:
            job = jobs[name]
            reason = f": {job['error']}" if job.get("error") else ""
            print(f"  {name}: {job.get('status', '?')}{reason}", file=sys.stderr)
        if failed:
            sys.exit(1)


RUN_NAME = re.compile(r"^(\+{0,2})run_name=(.*)$", re.DOTALL)


def quote_run_name(argv: list[str]) -> list[str]:
    """Make `run_name=VALUE` on the command line a string, whatever it looks like (nan, null,
    1e3, true), and refuse names that are not plain folder names before Hydra makes a folder."""
    out = []
    for arg in argv:
        match = RUN_NAME.match(arg)
        value = match.group(2) if match else ""
        if not match or value[:1] in ("'", '"') or "${" in value or "," in value:
            out.append(arg)
            continue
        check_run_name(value)
        escaped = value.replace("'", "\\'")
        out.append(f"{match.group(1)}run_name='{escaped}'")
    return out


def main() -> None:
    """Console entry point."""
    # torch_geometric scripts a helper at import, and torch deprecates torch.jit.script: not ours,
    # and it would add two lines to every message the CLI prints.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    try:
        register_configs()
        sys.argv[1:] = quote_run_name(sys.argv[1:])
    except UserError as error:
        print(f"deqrun: error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    entry = hydra.main(version_base="1.3", config_path=str(config_dir()), config_name="config")
    entry(_job)()


if __name__ == "__main__":
    main()
