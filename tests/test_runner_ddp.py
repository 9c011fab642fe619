"""Data-parallel runs through the real `deqrun` command: N processes started as torchrun (or
SLURM's srun) would start them, gloo on CPU, compared with one process on the same global batch.

The model is a small MLP-style DEQ registered by a plugin (no BatchNorm, no dropout: torch has no
CPU SyncBatchNorm, and per-rank dropout masks differ from one process's by design), so that N
ranks and one process compute the same thing up to the order of floating-point additions.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

PLUGIN = '''
import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from deqrun.models.base import DEQModel
from deqrun.registry import register_model


@dataclass
class MlpDeqConfig:
    name: str = "mlp_deq"
    width: int = 32


class MlpDeq(DEQModel):
    def __init__(self, width, deq, spec):
        super().__init__()
        features = 1
        for size in spec.in_shape:
            features *= size
        self.deq = deq
        self.inject = nn.Linear(features, width)
        self.mix = nn.Linear(width, width, bias=False)
        nn.init.normal_(self.mix.weight, std=0.4 / width ** 0.5)
        self.head = nn.Linear(width, spec.out_features)
        self.pause = float(os.environ.get("DEQRUN_TEST_STEP_PAUSE", "0"))

    def forward(self, x, pretrain=False):
        if self.training and self.pause:
            time.sleep(self.pause)  # a slow step, so that a signal lands mid-run
        u = self.inject(x.flatten(1))
        z, stats = self.deq(lambda z: torch.tanh(self.mix(z) + u), torch.zeros_like(u),
                            pretrain=pretrain)
        return self.head(z), stats


@register_model("mlp_deq", schema=MlpDeqConfig, tasks=("image_classification",),
                description="test: MLP DEQ")
def build(options, deq, spec):
    return MlpDeq(options.width, deq, spec)
'''

ARGS = ["model=mlp_deq", "task=digits", "task.subset=128", "trainer.batch_size=32",
        "trainer.epochs=2", "trainer.eval_batch_size=100", "solver=anderson",
        "grad=implicit", "solver.f_max_iter=15", "trainer.progress=false", "trainer.threads=1",
        "trainer.device=cpu"]
COMPARED = ("test_accuracy", "test_loss", "train_loss", "train_accuracy", "steps", "eval_nstep")


@pytest.fixture
def plugin(tmp_path: Path) -> dict[str, str]:
    module = tmp_path / "mlp_deq_plugin.py"
    module.write_text(PLUGIN)
    configs = tmp_path / "plugin_configs" / "model"
    configs.mkdir(parents=True)
    (configs / "mlp_deq.yaml").write_text(
        "defaults:\n  - /_schema/model/mlp_deq@_here_\n  - _self_\nname: mlp_deq\nwidth: 32\n")
    return dict(os.environ, DEQRUN_PLUGINS=str(module), PYTHONUNBUFFERED="1",
                OMP_NUM_THREADS="1", WANDB_MODE="offline")


def searchpath(tmp_path: Path) -> str:
    return f"hydra.searchpath=[file://{tmp_path / 'plugin_configs'}]"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What torchrun sets for each worker."""
    return dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def start(args: list[str], cwd: Path, env: dict[str, str], world: int = 1,
          launch=torchrun_env) -> list[subprocess.Popen]:
    port = free_port()
    ranks = [launch(rank, world, port) for rank in range(world)] if world > 1 else [{}]
    return [subprocess.Popen([sys.executable, "-m", "deqrun.cli", *args], cwd=cwd,
                             env={**env, **extra}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for extra in ranks]


def finish(processes: list[subprocess.Popen]) -> list[tuple[int, str]]:
    out = []
    for process in processes:
        _, stderr = process.communicate(timeout=600)
        out.append((process.returncode, stderr))
    return out


def run(args, cwd, env, world=1, launch=torchrun_env) -> list[tuple[int, str]]:
    return finish(start(args, cwd, env, world, launch))


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


def wait_for_steps(path: Path, count: int, processes: list[subprocess.Popen]) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in processes):
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path} did not reach {count} steps")


def test_two_gloo_ranks_train_the_one_process_model_and_only_rank_0_writes(tmp_path, plugin):
    args = [searchpath(tmp_path), *ARGS]
    one = run([*args, "run_name=one"], tmp_path, plugin)
    two = run([*args, "run_name=two"], tmp_path, plugin, world=2)
    assert one[0][0] == 0, one[0][1]
    assert [code for code, _ in two] == [0, 0], two[0][1] + two[1][1]
    runs = tmp_path / "outputs" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["one", "two"]
    a, b = weights(runs / "one"), weights(runs / "two")
    assert a.keys() == b.keys()
    for name in a:  # 8 Adam steps on the global batch of 32 = 2 shards of 16
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=2e-6, msg=name)
    # one metrics.json, one checkpoint (plus each rank's random state), one log, one steps log
    assert sorted(p.name for p in (runs / "two").rglob("metrics.json")) == ["metrics.json"]
    assert sorted(p.name for p in (runs / "two" / "checkpoints").iterdir()) == \
        ["last.pt", "rng-rank0.pt", "rng-rank1.pt"]
    assert len((runs / "two" / "steps.jsonl").read_text().splitlines()) == 8
    log = (runs / "two" / "deqrun.log").read_text()
    assert log.count("run two:") == 1 and "rank 1 of 2" not in log
    m1, m2 = metrics(runs / "one"), metrics(runs / "two")
    assert m2["status"] == "completed" and m2["environment"]["world_size"] == 2
    assert m2["environment"]["backend"] == "gloo"
    f1, f2 = m1["final"], m2["final"]
    for key in COMPARED:  # the logged numbers are the global batch's
        assert f2[key] == pytest.approx(f1[key], rel=1e-4, abs=1e-6), key
    assert f2["world_size"] == 2 and len(f2["peak_memory_bytes_per_rank"]) == 2
    assert f2["peak_memory_bytes"] == max(f2["peak_memory_bytes_per_rank"])
    assert f2["samples_per_s_per_rank"] == pytest.approx(f2["samples_per_s"] / 2)
    steps1 = [json.loads(line) for line in (runs / "one" / "steps.jsonl").read_text().splitlines()]
    steps2 = [json.loads(line) for line in (runs / "two" / "steps.jsonl").read_text().splitlines()]
    assert [s["samples"] for s in steps2] == [s["samples"] for s in steps1] == [32] * 8
    assert [s["objective"] for s in steps2] == pytest.approx([s["objective"] for s in steps1],
                                                              rel=1e-4)


@pytest.mark.slow  # about 100 s on the shared 2-core machine
def test_sigterm_to_every_rank_checkpoints_and_the_resumed_run_ends_identically(tmp_path,
                                                                                plugin):
    args = [searchpath(tmp_path), *ARGS]
    straight = run([*args, "run_name=straight"], tmp_path, plugin, world=2)
    assert [code for code, _ in straight] == [0, 0], straight[0][1]
    slow = dict(plugin, DEQRUN_TEST_STEP_PAUSE="0.4")
    processes = start([*args, "run_name=cut"], tmp_path, slow, world=2)
    run_dir = tmp_path / "outputs" / "runs" / "cut"
    wait_for_steps(run_dir / "steps.jsonl", 3, processes)
    for process in processes:
        process.send_signal(signal.SIGTERM)
    stopped = finish(processes)
    assert [code for code, _ in stopped] == [128 + signal.SIGTERM] * 2, stopped[0][1]
    assert "trainer.resume=true" in stopped[0][1] and "Traceback" not in stopped[1][1]
    assert metrics(run_dir)["status"] == "interrupted"
    at = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["progress"]["step"]
    assert 3 <= at < 8
    resumed = run([*args, "run_name=cut", "trainer.resume=true"], tmp_path, plugin, world=2)
    assert [code for code, _ in resumed] == [0, 0], resumed[0][1] + resumed[1][1]
    a = metrics(tmp_path / "outputs" / "runs" / "straight")["final"]
    b = metrics(run_dir)["final"]
    for key in COMPARED:
        assert a[key] == b[key], key
    w1, w2 = weights(tmp_path / "outputs" / "runs" / "straight"), weights(run_dir)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def slurm_env(rank: int, world: int, port: int) -> dict[str, str]:
    """What srun sets for task `rank` of a one-node job (submitit runs deqrun in each task)."""
    from deqrun.runner.distributed import slurm_task_environment

    return {**slurm_task_environment(1, world, 0, rank, job_id="777", hostnames=["localhost"]),
            "MASTER_PORT": str(port)}


@pytest.mark.slow  # about 150 s on the shared 2-core machine
def test_usr2_on_slurm_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path, plugin):
    """A SLURM time-out/preemption: USR2 to every task; scontrol is a fake recording its call."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "scontrol.calls"
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    env = dict(plugin, PATH=f"{bin_dir}:{plugin['PATH']}")
    args = [searchpath(tmp_path), *ARGS]
    straight = run([*args, "run_name=whole"], tmp_path, env, world=2, launch=slurm_env)
    assert [code for code, _ in straight] == [0, 0], straight[0][1]
    processes = start([*args, "run_name=job"], tmp_path,
                      dict(env, DEQRUN_TEST_STEP_PAUSE="0.4"), world=2, launch=slurm_env)
    run_dir = tmp_path / "outputs" / "runs" / "job"
    wait_for_steps(run_dir / "steps.jsonl", 3, processes)
    for process in processes:
        process.send_signal(signal.SIGUSR2)
    stopped = finish(processes)
    assert [code for code, _ in stopped] == [128 + signal.SIGUSR2] * 2, stopped[0][1]
    assert "requeued" in stopped[0][1] and "Traceback" not in stopped[0][1] + stopped[1][1]
    assert metrics(run_dir)["status"] == "interrupted"
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    marker = json.loads((run_dir / "checkpoints" / "requeue.json").read_text())
    assert marker["signal"] == "SIGUSR2" and marker["job"] == "777"
    assert calls.read_text().split() == ["requeue", "777"]  # once, by rank 0
    # SLURM starts the same job again: same command, no trainer.resume, a restart counted
    requeued = run([*args, "run_name=job"], tmp_path, dict(env, SLURM_RESTART_COUNT="1"),
                   world=2, launch=slurm_env)
    assert [code for code, _ in requeued] == [0, 0], requeued[0][1] + requeued[1][1]
    done = metrics(run_dir)
    assert done["status"] == "completed"
    assert any("requeued job" in note for note in done["notes"])
    assert not (run_dir / "checkpoints" / "requeue.json").exists()
    a = metrics(tmp_path / "outputs" / "runs" / "whole")["final"]
    for key in COMPARED:
        assert a[key] == done["final"][key], key
