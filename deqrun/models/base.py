"""The model interface every family implements.

A model is an equilibrium layer f(z, injection) solved by its `deq` (a deqrun.core.DEQ), an
injection computed from the input and a head: `output, stats = model(inputs)`. The loop, the
precision study and the Jacobian penalty only use what is declared here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from deqrun.core import DEQ, DEQStats


class DEQModel(nn.Module):
    """Base class of deqrun's models.

    Subclasses set `self.deq` in __init__ and implement forward(inputs, pretrain=False), where
    pretrain=True runs the unrolled weight-tied network (deq.unrolled) instead of the solve.
    """

    deq: DEQ
    # grad=jiio: the runner sets a deqrun.core.JIIO here; models of input-objective tasks use it
    # to solve the task's InputProblem jointly with their equilibrium.
    input_optimiser: Any = None
    # The training loss of the batch as a function of the model's output, set by the runner
    # around each training forward (outer_objective): models whose DEQ wants the outer-loss
    # gradient (broyden with opa_every > 0, SHINE's OPA) turn it into z -> dL/dz.
    outer_loss: Callable[[Any], torch.Tensor] | None = None

    @contextmanager
    def outer_objective(self, loss: Callable[[Any], torch.Tensor]) -> Iterator[None]:
        """Within the block, `loss(output)` is the outer loss of the current batch."""
        previous, self.outer_loss = self.outer_loss, loss
        try:
            yield
        finally:
            self.outer_loss = previous

    def forward(self, inputs: Any, pretrain: bool = False) -> tuple[Any, DEQStats]:
        raise NotImplementedError

    def implicit_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradient passes through the fixed point (default: all)."""
        return list(self.parameters())

    def reset_state(self) -> None:
        """Forget state carried between calls (sequence memory, cached fixed points).

        The runner calls it at the start of every training epoch and every evaluation.
        """
