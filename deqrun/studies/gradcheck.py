"""Gradient precision: a model's parameter gradient under any DEQ gradient method, compared with
the exact (tightly solved implicit) gradient on the same batch, same random masks, same z*.

Used during training (`trainer.precision_every`, the phantom-gradient paper's "dynamic precision")
and by the precision study (deqrun.studies.precision). Works for any task and any DEQModel: the
loss is `task.loss(output, batch)` with `output, stats = model(task.model_input(batch))`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from deqrun.core import GRADIENTS, DEQStats

EXACT = dict(b_solver="anderson", b_max_iter=100, b_tol=1e-7, b_stop_mode="rel")


def exact_method() -> Any:
    """Implicit differentiation with a tight backward solve."""
    return GRADIENTS["implicit"](**EXACT)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The CPU (and, on CUDA, the device's) random state, to replay a forward's masks."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore a state taken by rng_state."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextmanager
def replay(model: nn.Module, state: dict[str, Any], device: torch.device) -> Iterator[None]:
    """Run with the RNG as at `state` (same dropout masks); leave RNG and buffers as found."""
    buffers = [b.detach().clone() for b in model.buffers()]
    outer = rng_state(device)
    set_rng_state(state, device)
    try:
        yield
    finally:
        set_rng_state(outer, device)
        with torch.no_grad():
            for buffer, saved in zip(model.buffers(), buffers):
                buffer.copy_(saved)


def gradients_and_stats(model: nn.Module, task: Any, batch: Any, params: list[nn.Parameter],
                        method: Any, state: dict[str, Any], device: torch.device,
                        jac_weight: float = 0.0) -> tuple[list[torch.Tensor], DEQStats]:
    """parameter_gradients, and the DEQ stats of that forward (with its backward solve)."""
    with replay(model, state, device), model.deq.use_gradient(method):
        model.train()
        output, stats = model(task.model_input(batch))
        loss = task.loss(output, batch)
        if stats.jac_loss is not None:
            loss = loss + jac_weight * stats.jac_loss
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)], stats


def parameter_gradients(model: nn.Module, task: Any, batch: Any, params: list[nn.Parameter],
                        method: Any, state: dict[str, Any], device: torch.device,
                        jac_weight: float = 0.0) -> list[torch.Tensor]:
    """d loss / d params with `method`, replaying the randomness captured in `state`.

    The loss is the task loss plus jac_weight x the DEQ's Jacobian penalty when the model computes
    one (its random probes are replayed too), i.e. the loss training differentiates. A parameter
    the loss does not reach gets a zero gradient.
    """
    grads, _ = gradients_and_stats(model, task, batch, params, method, state, device, jac_weight)
    return grads


def cosine(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Cosine similarity of two gradients given as lists of tensors."""
    flat_a = torch.cat([t.reshape(-1).double() for t in a])
    flat_b = torch.cat([t.reshape(-1).double() for t in b])
    return float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm()).clamp_min(1e-300))
