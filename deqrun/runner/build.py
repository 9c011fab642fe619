"""Builders: device, seeding, the task and model from the registries, optimiser, schedule."""

from __future__ import annotations

import math
import os
import platform
from typing import Any

import torch
from torch import nn

from deqrun import registry
from deqrun.config import RunConfig
from deqrun.core import DEQ
from deqrun.core.jiio import JIIO
from deqrun.errors import ConfigError
from deqrun.models.base import DEQModel
from deqrun.tasks.base import LoaderOptions, Task


def select_device(name: str) -> torch.device:
    """auto | cpu | cuda[:N] | mps -> a device that exists here, or ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"trainer.device={name!r} is not a device; use auto, cpu, cuda[:N] "
                          "or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"trainer.device={name} but CUDA is not available here; use "
                              "trainer.device=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"trainer.device={name} but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"trainer.device={name} but MPS is not available here")
    return device


def seed_everything(seed: int, deterministic: bool, threads: int | None,
                    device: torch.device) -> None:
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    if deterministic:
        if device.type == "cuda":
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def build_task(config: RunConfig) -> Task:
    """The registered task, built from its options (loads its data)."""
    return registry.task_entry(config.task.name).build(config.task)


def build_model(config: RunConfig, task: Task) -> DEQModel:
    """The registered model around a DEQ layer configured by the solver and grad groups."""
    entry = registry.model_entry(config.model.name)
    model = entry.build(config.model, DEQ(**config.deq_options()), task.model_spec())
    if not isinstance(model, DEQModel):
        raise TypeError(f"model {config.model.name!r} must build a deqrun.models.DEQModel")
    if config.input_optimisation:
        model.input_optimiser = JIIO(**config.grad.options())
    return model


def build_task_and_model(config: RunConfig, device: torch.device) -> tuple[Task, DEQModel]:
    """The task (data, loss, metrics) and the model on `device`."""
    task = build_task(config)
    return task, build_model(config, task).to(device)


def loader_options(config: RunConfig, device: torch.device, train: bool) -> LoaderOptions:
    trainer = config.trainer
    return LoaderOptions(batch_size=trainer.batch_size if train else trainer.eval_batch_size,
                         seed=trainer.seed, num_workers=trainer.num_workers,
                         pin_memory=device.type == "cuda")


def build_optimizer(config: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = config.optim
    params = [p for p in model.parameters() if p.requires_grad]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    optimizer = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return optimizer(params, lr=o.lr, weight_decay=o.weight_decay)


def build_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int,
                    steps_per_epoch: int = 1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then per step: cosine decay to min_lr_ratio x lr, constant, or step (the
    rate multiplied by gamma once per milestone epoch completed: milestones=[50] gamma=0.5 halves
    it from the 51st epoch on, as the IGNN reference)."""
    o = config.optim
    milestone_steps = sorted(m * max(steps_per_epoch, 1) for m in o.milestones)

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        if o.schedule == "step":
            return o.gamma ** sum(step >= m for m in milestone_steps)
        progress = min((step - o.warmup_steps) / max(total_steps - o.warmup_steps, 1), 1.0)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def logger_options(config: RunConfig, resume: bool) -> dict[str, Any]:
    if config.logger.name != "wandb":
        return {}
    lg = config.logger
    return dict(project=lg.project, entity=lg.entity, mode=lg.mode, run_name=config.run_name,
                resume=resume)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def environment(device: torch.device) -> dict[str, Any]:
    info = dict(device=str(device), torch=torch.__version__, python=platform.python_version(),
                threads=torch.get_num_threads(), host=platform.node())
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
