"""launcher=slurm composes to multi-node, multi-GPU DDP jobs (checked without a cluster)."""

from __future__ import annotations

import shutil

import pytest
import submitit
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from deqrun.cli import config_dir
from deqrun.config import register_configs
from deqrun.runner.slurm import job_ranks, job_tasks, sbatch_script, submitit_executor


def launcher_config(*overrides: str) -> dict:
    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        cfg = compose("config", overrides=["launcher=slurm", *overrides],
                      return_hydra_config=True)
    cfg.hydra.sweep.dir = "/sweep"
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


@pytest.fixture
def fake_srun(monkeypatch):
    """submitit's SLURM executor refuses to start where there is no srun."""
    real = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: "/usr/bin/srun"
                        if name in ("srun", "sbatch") else real(name, *a, **k))


def test_two_nodes_of_four_tasks_give_a_world_of_eight(fake_srun, tmp_path):
    launcher = launcher_config("hydra.launcher.tasks_per_node=4", "hydra.launcher.nodes=2")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 4, 4)
    assert launcher["max_num_timeout"] > 0
    script = sbatch_script(launcher, tmp_path)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --signal=USR2@120", "#SBATCH --cpus-per-task=8"):
        assert line in script
    assert "srun" in script
    ranks = job_ranks(launcher)
    assert [r.rank for r in ranks] == list(range(8))
    assert {r.world_size for r in ranks} == {8} and {r.source for r in ranks} == {"slurm"}
    assert [r.local_rank for r in ranks] == [0, 1, 2, 3] * 2
    assert len({(r.master_addr, r.master_port) for r in ranks}) == 1
    assert ranks[0].master_addr == "node01"


def test_submitit_reads_the_same_ranks_from_the_task_environment(monkeypatch):
    launcher = dict(nodes=2, tasks_per_node=4)
    monkeypatch.setenv("_TEST_CLUSTER_", "slurm")  # submitit's switch for tests off a cluster
    for env, ours in zip(job_tasks(launcher), job_ranks(launcher)):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        theirs = submitit.JobEnvironment()
        assert (theirs.global_rank, theirs.num_tasks, theirs.local_rank) == \
            (ours.rank, ours.world_size, ours.local_rank)
        assert theirs.hostnames[0] == ours.master_addr


def test_the_executor_keeps_the_timeout_budget(fake_srun, tmp_path):
    launcher = launcher_config("hydra.launcher.max_num_timeout=3")
    executor = submitit_executor(launcher, tmp_path)
    assert executor._executor.max_num_timeout == 3
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (1, 1, 1)
