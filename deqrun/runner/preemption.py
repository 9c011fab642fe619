"""Cluster time-outs and preemption: SIGUSR2 -> checkpoint -> requeue -> automatic resume.

On SLURM, submitit asks for `--signal=USR2@<signal_delay_s>`: shortly before a time-out, or when
the job is preempted, every task gets SIGUSR2. submitit's own handler would checkpoint the
*callable* and requeue at once, in the middle of a step, so the run would restart from scratch.
deqrun instead:

1. `PreemptionSignals` (a context manager around the training loop) turns SIGUSR2 into a flag,
   keeping submitit's handler aside;
2. the loop stops every rank at the next step boundary (`stop_together`), rank 0 writes the
   checkpoint, status `interrupted` and a requeue marker (`mark_requeue`);
3. `hand_over()` then calls submitit's handler: it pickles the job again (Hydra's submitit
   launcher implements `checkpoint` as "run the same job again"), requeues it with
   `scontrol requeue` (time-outs count against `max_num_timeout`, preemptions do not) and exits;
4. the requeued job has the same run folder; `should_resume(run_dir)` sees the marker (or SLURM's
   restart count and a checkpoint) and the runner resumes as with `trainer.resume=true`.

Outside submitit (a plain sbatch script), `hand_over()` requeues with `scontrol requeue
$SLURM_JOB_ID` when the job is requeueable, and otherwise just lets the run stop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger("deqrun")

MARKER = "requeue.json"


class PreemptionSignals:
    """SIGUSR2 (and SIGUSR1, which some sites use) become a flag the loop checks per step."""

    SIGNALS = (signal.SIGUSR2, signal.SIGUSR1)

    def __enter__(self) -> PreemptionSignals:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            log.warning("%s received (time-out or preemption): checkpointing after this step",
                        signal.Signals(signum).name)
        self.signum = signum

    @property
    def requested(self) -> bool:
        """Whether a time-out/preemption signal arrived."""
        return self.signum is not None

    def hand_over(self, env: Mapping[str, str] | None = None,
                  requeue: Callable[[str], bool] | None = None) -> bool:
        """After the checkpoint: let submitit requeue (it exits the process), else requeue with
        scontrol. Returns whether a requeue was asked for (when the process is still alive)."""
        if self.signum is None:
            return False
        previous = self.previous.get(self.signum)
        if callable(previous) and _is_submitit(previous):
            signal.signal(self.signum, previous)
            previous(self.signum, None)  # rank 0: requeue and sys.exit; other ranks: return
            return True
        env = os.environ if env is None else env
        job = env.get("SLURM_JOB_ID")
        if job is None:
            return False
        array = env.get("SLURM_ARRAY_JOB_ID")
        target = f"{array}_{env.get('SLURM_ARRAY_TASK_ID', '0')}" if array else job
        return (requeue or scontrol_requeue)(target)

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _is_submitit(handler: Any) -> bool:
    """Whether a signal handler is submitit's (a bound method of its SignalHandler)."""
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("submitit")


def scontrol_requeue(job_id: str) -> bool:
    """`scontrol requeue JOB`; False (with a warning) when scontrol is missing or refuses."""
    if shutil.which("scontrol") is None:
        log.warning("no scontrol here: job %s is not requeued; resume it by hand", job_id)
        return False
    done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if done.returncode:
        log.warning("scontrol requeue %s failed: %s", job_id, done.stderr.strip())
    return done.returncode == 0


def mark_requeue(run_dir: Path, signum: int, step: int, epoch: int) -> Path:
    """Record in the run folder that the run stopped for a requeue (read by should_resume)."""
    path = run_dir / "checkpoints" / MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(signal=signal.Signals(signum).name, step=step, epoch=epoch,
                                    job=os.environ.get("SLURM_JOB_ID"))))
    return path


def should_resume(run_dir: Path, checkpoint: Path, env: Mapping[str, str] | None = None) -> bool:
    """Whether this start is a requeued job that must continue from its checkpoint: a requeue
    marker in the run folder, or SLURM_RESTART_COUNT > 0 with a checkpoint present."""
    env = os.environ if env is None else env
    if not checkpoint.is_file():
        return False
    if (run_dir / "checkpoints" / MARKER).is_file():
        return True
    return int(env.get("SLURM_RESTART_COUNT", "0") or 0) > 0


def clear_requeue(run_dir: Path) -> None:
    """Forget the marker once the resumed run is under way."""
    (run_dir / "checkpoints" / MARKER).unlink(missing_ok=True)


class Resumable:
    """submitit's checkpointing protocol for calling deqrun without Hydra: `__call__` runs the
    job; `checkpoint` (called by submitit on USR2) resubmits the same call, which resumes."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.function(*args, **kwargs)

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """The same call again (the run folder's marker and checkpoint make it a resume)."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
