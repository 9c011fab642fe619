"""USR2 under a fake submitit job: checkpoint, status interrupted, requeue, identical resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import submitit
import torch
from submitit.core.job_environment import SignalHandler
from submitit.core.utils import JobPaths
from torch import nn

from deqrun.errors import Interrupted
from deqrun.results import write_metrics
from deqrun.runner import rng
from deqrun.runner.preemption import (
    PreemptionSignals,
    Resumable,
    clear_requeue,
    mark_requeue,
    should_resume,
)

STEPS = 12


class TinyJob:
    """A job in the shape of Hydra's submitit launcher: `__call__` trains (resuming when the run
    folder says so), `checkpoint` resubmits the same call. The loop does what deqrun's loop does
    on USR2: stop at the step boundary, checkpoint, mark interrupted, hand over to submitit."""

    def __init__(self, run_dir: Path, signal_at: int | None = None) -> None:
        self.run_dir, self.signal_at = run_dir, signal_at

    def __call__(self, steps: int) -> dict:
        checkpoint = self.run_dir / "checkpoints" / "last.pt"
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.3), nn.Linear(8, 1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        step = 0
        if should_resume(self.run_dir, checkpoint, env={}):
            state = torch.load(checkpoint, weights_only=True)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            rng.restore_rng(state["rng"], torch.device("cpu"))
            step = state["step"]
            clear_requeue(self.run_dir)
        write_metrics(self.run_dir, status="running", fresh=step == 0)
        with PreemptionSignals() as preempt:
            while step < steps:
                x = torch.randn(16, 4)
                loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
                optimizer.zero_grad()
                loss.backward()
                if step == self.signal_at:
                    self.signal_at = None
                    os.kill(os.getpid(), signal.SIGUSR2)  # arrives in the middle of the step
                optimizer.step()
                step += 1
                if preempt.requested:
                    self.stop(model, optimizer, step, preempt, checkpoint)
        final = {"weights": [p.detach().tolist() for p in model.parameters()]}
        write_metrics(self.run_dir, status="completed", final=final)
        return final

    def stop(self, model, optimizer, step, preempt, checkpoint) -> None:
        checkpoint.parent.mkdir(parents=True, exist_ok=True)
        torch.save(dict(model=model.state_dict(), optimizer=optimizer.state_dict(), step=step,
                        rng=rng.capture_rng(torch.device("cpu"))), checkpoint)
        write_metrics(self.run_dir, status="interrupted")
        mark_requeue(self.run_dir, preempt.signum, step, 0)
        preempt.hand_over()
        raise Interrupted(preempt.signum, "stopped (not rank 0 of a submitit job)")

    def checkpoint(self, *args, **kwargs):
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


@pytest.fixture
def slurm_job(monkeypatch):
    """A fake SLURM task 0 of job 77 as submitit sees it; requeues are recorded, not run."""
    for key, value in dict(_TEST_CLUSTER_="slurm", SLURM_JOB_ID="77", SLURM_PROCID="0",
                           SLURM_NTASKS="1", SLURM_LOCALID="0", SLURM_NODEID="0",
                           SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="node01").items():
        monkeypatch.setenv(key, value)
    env = submitit.JobEnvironment()
    requeued: list[int] = []
    monkeypatch.setattr(type(env), "_requeue", lambda self, countdown: requeued.append(countdown))
    return env, requeued


def test_usr2_checkpoints_marks_interrupted_requeues_and_resumes_identically(slurm_job, tmp_path):
    env, requeued = slurm_job
    run_dir = tmp_path / "run"
    paths = JobPaths(tmp_path / "submitit", job_id="77")
    paths.folder.mkdir(parents=True)
    delayed = submitit.helpers.DelayedSubmission(TinyJob(run_dir, signal_at=5), STEPS)
    delayed.set_timeout(60, 2)
    handler = SignalHandler(env, paths, delayed)
    before = signal.signal(signal.SIGUSR2, handler.checkpoint_and_try_requeue)  # as submitit does
    try:
        with pytest.raises(SystemExit):
            delayed.result()
        assert signal.getsignal(signal.SIGUSR2) == handler.checkpoint_and_try_requeue
    finally:
        signal.signal(signal.SIGUSR2, before)
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "interrupted"
    assert torch.load(run_dir / "checkpoints" / "last.pt")["step"] == 6
    assert requeued == [2]  # preempted, not timed out: the time-out budget is untouched
    requeued_job = submitit.helpers.DelayedSubmission.load(paths.submitted_pickle)
    final = requeued_job.result()
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    assert not (run_dir / "checkpoints" / "requeue.json").exists()
    assert final == TinyJob(tmp_path / "reference")(STEPS)


def test_without_submitit_the_job_is_requeued_with_scontrol(tmp_path):
    asked: list[str] = []
    with PreemptionSignals() as preempt:
        assert not preempt.hand_over(env={"SLURM_JOB_ID": "5"}, requeue=asked.append)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert preempt.requested and preempt.signum == signal.SIGUSR2
        preempt.hand_over(env={"SLURM_JOB_ID": "5"}, requeue=asked.append)
        preempt.hand_over(env={"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8",
                               "SLURM_ARRAY_TASK_ID": "3"}, requeue=asked.append)
        assert preempt.hand_over(env={}, requeue=asked.append) is False
    assert asked == ["5", "8_3"]
    assert signal.getsignal(signal.SIGUSR2) is not preempt._handle


def test_should_resume_needs_a_checkpoint_and_a_marker_or_a_restart(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "last.pt"
    assert not should_resume(tmp_path, checkpoint, env={"SLURM_RESTART_COUNT": "1"})
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"x")
    assert not should_resume(tmp_path, checkpoint, env={})
    assert should_resume(tmp_path, checkpoint, env={"SLURM_RESTART_COUNT": "2"})
    marker = mark_requeue(tmp_path, signal.SIGUSR2, 40, 3)
    assert json.loads(marker.read_text())["signal"] == "SIGUSR2"
    assert should_resume(tmp_path, checkpoint, env={})
    clear_requeue(tmp_path)
    assert not should_resume(tmp_path, checkpoint, env={"SLURM_RESTART_COUNT": "0"})


def test_resumable_resubmits_the_same_call():
    job = Resumable(lambda a, b=0: a + b)
    assert job(1, b=2) == 3
    again = job.checkpoint(4, b=5)
    assert again.result() == 9


@pytest.mark.parametrize("saved, visible", [(4, 2), (1, 2), (2, 2)])
def test_restore_cuda_rng_tolerates_another_gpu_count(monkeypatch, saved, visible):
    restored: list[tuple[int, int]] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: restored.append((int(state[0]), device)))
    states = [torch.full((8,), i, dtype=torch.uint8) for i in range(saved)]
    note = rng.restore_cuda_rng(states)
    assert restored == [(i, i) for i in range(min(saved, visible))]
    assert (note is None) == (saved == visible)


def test_rank_rng_files_restore_each_ranks_generator(tmp_path):
    checkpoint = tmp_path / "last.pt"
    cpu = torch.device("cpu")
    torch.manual_seed(3)
    rng.save_rank_rng(checkpoint, 1, cpu)
    expected = torch.rand(3)
    assert rng.load_rank_rng(checkpoint, 1, cpu)
    torch.testing.assert_close(torch.rand(3), expected)
    assert not rng.load_rank_rng(checkpoint, 2, cpu)
