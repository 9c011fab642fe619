"""optim.schedule: the per-step learning-rate factors (cosine, constant, step) and their checks."""

import re
from types import SimpleNamespace

import pytest
import torch

from deqrun.config import OptimConfig
from deqrun.errors import ConfigError
from deqrun.runner.build import build_scheduler


def rates(optim: OptimConfig, steps: int, steps_per_epoch: int, total: int = 100) -> list[float]:
    """The learning rate used by each of the first `steps` optimiser steps."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=optim.lr)
    scheduler = build_scheduler(SimpleNamespace(optim=optim), optimizer, total, steps_per_epoch)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_step_schedule_halves_after_each_milestone_epoch() -> None:
    # 3 steps per epoch; halve after epoch 2 and again after epoch 3 (IGNN: milestones=[50]).
    optim = OptimConfig(lr=1e-3, schedule="step", milestones=[3, 2], gamma=0.5)
    got = rates(optim, 12, steps_per_epoch=3)
    assert got == pytest.approx([1e-3] * 6 + [5e-4] * 3 + [2.5e-4] * 3)


def test_step_schedule_after_warmup_and_resume_position() -> None:
    optim = OptimConfig(lr=1.0, schedule="step", milestones=[1], gamma=0.1, warmup_steps=2)
    assert rates(optim, 5, steps_per_epoch=3) == pytest.approx([0.5, 1.0, 1.0, 0.1, 0.1])


def test_constant_and_cosine_unchanged() -> None:
    assert rates(OptimConfig(lr=0.1, schedule="constant"), 4, 2) == pytest.approx([0.1] * 4)
    cosine = rates(OptimConfig(lr=1.0, schedule="cosine"), 3, 1, total=2)
    assert cosine == pytest.approx([1.0, 0.5, 0.0])


@pytest.mark.parametrize("options, message", [
    (dict(schedule="step"), "optim.schedule=step needs optim.milestones"),
    (dict(schedule="step", milestones=[0]), "optim.milestones must be epochs >= 1"),
    (dict(schedule="step", milestones=[5], gamma=0.0), "optim.gamma must be in (0, 1]"),
    (dict(schedule="linear"), "optim.schedule must be cosine, constant or step"),
])
def test_bad_schedule_options_are_one_line_errors(options: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        OptimConfig(**options).check()
