"""A new model family needs only its own files: a throw-away regression task and DEQ model,
registered by a plugin written from this file, train through the real `deqrun` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PLUGIN = '''
"""Fit y = sin(x) on 256 points with a small DEQ: f(z) = tanh(W z + U x + b)."""
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from deqrun.models.base import DEQModel
from deqrun.registry import register_model, register_task
from deqrun.tasks.base import ModelSpec, Task


@dataclass
class SineConfig:
    name: str = "sine"
    points: int = 256

    def check(self):
        if self.points < 2:
            raise ValueError(f"points must be >= 2, got {self.points}")


@dataclass
class TinyConfig:
    name: str = "tiny_deq"
    width: int = 16


@register_task("sine", schema=SineConfig, kind="regression_1d", description="y = sin(x)")
class SineTask(Task):
    metric: ClassVar[str] = "mse"
    higher_is_better: ClassVar[bool] = False

    def __init__(self, options):
        super().__init__()
        self.x = torch.linspace(-3, 3, options.points).unsqueeze(1)
        self.y = torch.sin(self.x)

    def model_spec(self):
        return ModelSpec(kind="regression_1d", in_shape=(1,), out_features=1)

    def train_batches(self, epoch, options):
        return [(self.x, self.y)]

    def eval_batches(self, split, options):
        return [(self.x, self.y)]

    def model_input(self, batch):
        return batch[0]

    def loss(self, output, batch):
        return ((output - batch[1]) ** 2).mean()

    def metric_sums(self, output, batch):
        return {"sq": float(((output - batch[1]) ** 2).sum()), "n": float(len(batch[1]))}

    def reduce(self, sums):
        return {"loss": sums["sq"] / sums["n"], "mse": sums["sq"] / sums["n"]}


class TinyDEQ(DEQModel):
    def __init__(self, width, deq):
        super().__init__()
        self.deq = deq
        self.inject = nn.Linear(1, width)
        self.W = nn.Linear(width, width, bias=False)
        nn.init.normal_(self.W.weight, std=0.3 / width ** 0.5)
        self.head = nn.Linear(width, 1)

    def forward(self, x, pretrain=False):
        u = self.inject(x)
        z, stats = self.deq(lambda z: torch.tanh(self.W(z) + u), torch.zeros_like(u),
                            pretrain=pretrain)
        return self.head(z), stats


@register_model("tiny_deq", schema=TinyConfig, tasks=("regression_1d",), description="test")
def build_tiny(options, deq, spec):
    return TinyDEQ(options.width, deq)
'''


def write_plugin(root: Path) -> tuple[Path, Path]:
    plugin = root / "sine_plugin.py"
    plugin.write_text(PLUGIN)
    configs = root / "plugin_configs"
    (configs / "model").mkdir(parents=True)
    (configs / "task").mkdir()
    (configs / "model" / "tiny_deq.yaml").write_text(
        "defaults:\n  - /_schema/model/tiny_deq@_here_\n  - _self_\nname: tiny_deq\nwidth: 16\n")
    (configs / "task" / "sine.yaml").write_text(
        "defaults:\n  - /_schema/task/sine@_here_\n  - _self_\nname: sine\n")
    return plugin, configs


def run_deqrun(args: list[str], cwd: Path, plugin: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEQRUN_PLUGINS=str(plugin), PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "deqrun.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_a_plugin_family_trains_through_the_cli(tmp_path):
    plugin, configs = write_plugin(tmp_path)
    args = [f"hydra.searchpath=[file://{configs}]", "model=tiny_deq", "task=sine",
            "solver=anderson", "grad=implicit", "optim.lr=0.01", "trainer.epochs=40",
            "run_name=sine", "trainer.progress=false"]
    result = run_deqrun(args, tmp_path, plugin)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "outputs/runs/sine/metrics.json").read_text())
    final = metrics["final"]
    assert metrics["status"] == "completed" and final["steps"] == 40
    first = metrics["history"][0]["test_mse"]
    assert final["test_mse"] < 0.5 * first  # it learned
    assert final["best_test_mse"] == min(h["test_mse"] for h in metrics["history"])
    assert final["forward_nstep"] > 0 and "test_accuracy" not in final


def test_a_plugin_model_is_refused_on_a_task_it_does_not_serve(tmp_path):
    plugin, configs = write_plugin(tmp_path)
    result = run_deqrun([f"hydra.searchpath=[file://{configs}]", "model=tiny_deq",
                         "task=digits"], tmp_path, plugin)
    assert result.returncode == 2
    assert "model=tiny_deq does not run task=digits; valid tasks for it: sine" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_plugin_is_one_line(tmp_path):
    result = run_deqrun([], tmp_path, tmp_path / "nope.py")
    assert result.returncode != 0 and "cannot import plugin" in result.stderr
    assert "Traceback" not in result.stderr
