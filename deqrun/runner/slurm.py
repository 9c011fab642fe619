"""What a `launcher=slurm` job will be, without a cluster: the submitit executor that Hydra's
submitit launcher builds, its sbatch script, and the SLURM variables each task sees."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deqrun.runner.distributed import LaunchInfo, discover, slurm_task_environment

INIT_KEYS = ("submitit_folder", "max_num_timeout")  # executor arguments, not job parameters
GENERIC_KEYS = ("submitit_folder", "timeout_min", "cpus_per_task", "gpus_per_node",
                "tasks_per_node", "mem_gb", "nodes", "name", "stderr_to_stdout")


def submitit_executor(launcher: Mapping[str, Any], folder: str | Path) -> Any:
    """The submitit AutoExecutor for a composed `hydra.launcher` (as the submitit launcher
    builds it: generic keys as is, SLURM-specific ones prefixed `slurm_`)."""
    import submitit

    params = {k: v for k, v in launcher.items() if k != "_target_"}
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm",
                                     slurm_max_num_timeout=params.get("max_num_timeout", 0))
    executor.update_parameters(**{k if k in GENERIC_KEYS else f"slurm_{k}": v
                                  for k, v in params.items() if k not in INIT_KEYS})
    return executor


def sbatch_script(launcher: Mapping[str, Any], folder: str | Path,
                  command: str = "python -u -m submitit.core._submit FOLDER") -> str:
    """The sbatch file submitit would submit for one job of the sweep."""
    executor = submitit_executor(launcher, folder)
    return executor._executor._make_submission_file_text(command, "preview")


def job_tasks(launcher: Mapping[str, Any], job_id: str = "4242") -> list[dict[str, str]]:
    """The SLURM variables of every task of one job (nodes x tasks_per_node, block layout)."""
    nodes, per_node = int(launcher.get("nodes", 1)), int(launcher.get("tasks_per_node", 1))
    return [slurm_task_environment(nodes, per_node, node, local, job_id)
            for node in range(nodes) for local in range(per_node)]


def job_ranks(launcher: Mapping[str, Any], job_id: str = "4242") -> list[LaunchInfo]:
    """How each task of one job joins torch.distributed (what `discover` reads in it)."""
    return [discover(env) for env in job_tasks(launcher, job_id)]
