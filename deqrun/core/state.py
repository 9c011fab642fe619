"""Flattening of DEQ states: a tensor or a list of tensors (multiscale) <-> one (batch, dim)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import torch

State = Union[torch.Tensor, list]  # noqa: UP007 (a runtime alias; Python 3.10 has no X | list)


@dataclass(frozen=True)
class StateLayout:
    """Shapes of a state, so it can be flattened to (batch, dim) and restored."""

    shapes: tuple
    is_list: bool

    @classmethod
    def of(cls, z: State) -> StateLayout:
        if isinstance(z, torch.Tensor):
            return cls((tuple(z.shape),), False)
        if isinstance(z, (list, tuple)) and z and all(isinstance(t, torch.Tensor) for t in z):
            batch = {t.shape[0] for t in z}
            if len(batch) != 1:
                raise ValueError(f"state tensors disagree on the batch size: {sorted(batch)}")
            return cls(tuple(tuple(t.shape) for t in z), True)
        raise TypeError("a DEQ state must be a tensor or a non-empty list of tensors")

    @property
    def batch_size(self) -> int:
        return self.shapes[0][0]

    @property
    def sizes(self) -> list[int]:
        return [int(torch.Size(s[1:]).numel()) for s in self.shapes]

    def flatten(self, z: State) -> torch.Tensor:
        if not self.is_list:
            return z.reshape(self.batch_size, -1)
        return torch.cat([t.reshape(self.batch_size, -1) for t in z], dim=1)

    def unflatten(self, flat: torch.Tensor) -> State:
        if not self.is_list:
            return flat.reshape(self.shapes[0])
        parts = torch.split(flat, self.sizes, dim=1)
        return [p.reshape(s) for p, s in zip(parts, self.shapes)]

    def flat_map(self, f: Callable[[State], State]) -> Callable[[torch.Tensor], torch.Tensor]:
        """f on flat tensors: unflatten, apply, flatten."""
        return lambda flat: self.flatten(f(self.unflatten(flat)))
