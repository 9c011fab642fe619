"""Part 2: a trained run's model, every method against a tight implicit gradient on test batches.

Works for any task and model family the runner builds: batches come from the task's "test" split,
the loss is the task's, and each batch's forward is solved once (DEQ.reuse_forward) and shared by
every method under the same random masks (gradcheck.replay).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deqrun.core import GRADIENTS, StateLayout, spectral_radius
from deqrun.studies import gradcheck
from deqrun.tasks.base import LoaderOptions, Task

from .methods import Method
from .runfolder import RunFolder

CHECKPOINT_EXACT = dict(b_solver="anderson", b_max_iter=200, b_tol=1e-8, b_stop_mode="rel")
CHECKPOINT_BATCHES, CHECKPOINT_BATCH_SIZE = 4, 32
CHECKPOINT_FIELDS = ["batch", "method", "k", "lambda", "cosine", "forward_residual",
                     "backward_residual", "backward_converged", "backward_nstep",
                     "spectral_radius_median", "spectral_radius_max", "noncontractive"]


@dataclass
class Loaded:
    """A run rebuilt from its folder: task, model with the checkpoint's weights, config, device."""

    task: Task
    model: nn.Module
    config: Any
    device: torch.device


def load_model(run: RunFolder) -> Loaded:
    """The run's task and model with the checkpoint's weights, its typed config, the device.

    The Jacobian penalty is switched off: the study compares gradients of the task loss only.
    """
    from deqrun.config import config_from_resolved
    from deqrun.runner.build import build_task_and_model, select_device

    config = config_from_resolved(run.metrics["config"])
    device = select_device("auto")
    task, model = build_task_and_model(config, device)
    state = torch.load(run.checkpoint, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    model.deq.jac_reg = False
    return Loaded(task, model, config, device)


def radius_at_fixed_point(captured: tuple) -> torch.Tensor:
    """Per-sample spectral radius of J = df/dz at the captured z* (f, z0, result)."""
    f, z0, result = captured
    layout = StateLayout.of(z0)
    return spectral_radius(layout.flat_map(f), layout.flatten(result.z), n_iter=50)


def batch_diagnostics(stats: Any, radius: torch.Tensor) -> dict[str, Any]:
    """How trustworthy the exact gradient of one batch is."""
    backward = stats.backward
    return dict(forward_residual=float(stats.forward.residual.max()),
                backward_residual=float(backward.residual.max()),
                backward_converged=float(backward.converged.double().mean()),
                backward_nstep=float(backward.nstep.double().mean()),
                spectral_radius_median=float(radius.median()),
                spectral_radius_max=float(radius.max()),
                noncontractive=float((radius >= 1).double().mean()))


def batch_rows(loaded: Loaded, batch: Any, methods: list[Method]) -> list[dict[str, Any]]:
    """Every method's cosine with the tight implicit gradient on one batch (one forward solve)."""
    model, task, device = loaded.model, loaded.task, loaded.device
    params = model.implicit_parameters()
    state = gradcheck.rng_state(device)
    with model.deq.reuse_forward() as captured:
        model.reset_state()
        exact, stats = gradcheck.gradients_and_stats(
            model, task, batch, params, GRADIENTS["implicit"](**CHECKPOINT_EXACT), state, device)
        base = batch_diagnostics(stats, radius_at_fixed_point(captured[0]))
        rows = []
        for method in methods:
            model.reset_state()
            grads = gradcheck.parameter_gradients(model, task, batch, params, method.build(),
                                                  state, device)
            rows.append(dict(base, **method.columns(), cosine=gradcheck.cosine(grads, exact)))
    return rows


def checkpoint_methods(model: nn.Module, methods: list[Method]) -> list[Method]:
    """The grid plus gradcheck's training-time reference; SHINE only with a Broyden forward."""
    usable = [m for m in methods if m.grad != "shine" or model.deq.solver_name == "broyden"]
    reference = Method("implicit", "implicit", tuple(gradcheck.EXACT.items()))
    return [*usable, reference]


def run_facts(run: RunFolder, loaded: Loaded) -> dict[str, Any]:
    """What summary.md says about the run: model, solver, gradient, headline metric, status."""
    config, metric = loaded.config, loaded.task.metric
    return dict(run=str(run.path), model=config.model.name, grad=config.grad.name,
                solver=config.solver.name, f_max_iter=config.solver.f_max_iter,
                f_tol=config.solver.f_tol, jac_reg_weight=config.trainer.jac_reg_weight,
                metric=f"test {metric}",
                metric_value=run.metrics.get("final", {}).get(f"test_{metric}"),
                status=run.metrics.get("status"))


def checkpoint_study(run: RunFolder, methods: list[Method], batches: int,
                     batch_size: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows for `batches` test batches of the run's trained model, and facts about the run."""
    loaded = load_model(run)
    torch.manual_seed(loaded.config.trainer.seed)
    chosen = checkpoint_methods(loaded.model, methods)
    rows = []
    for index, batch in enumerate(loaded.task.eval_batches("test", LoaderOptions(batch_size))):
        if index >= batches:
            break
        batch = loaded.task.to_device(batch, loaded.device)
        rows += [dict(batch=index, **row) for row in batch_rows(loaded, batch, chosen)]
    return rows, run_facts(run, loaded)
