"""JIIO (Gurumurthy et al. 2021): joint inference and input optimisation.

Instead of an outer optimiser around a full DEQ solve, min_x L(h(z), y) s.t. z = f(z, x) is solved
as one fixed point over (z, x, mu). This module holds its options (the `grad=jiio` config group);
the joint solver lives beside them.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class JIIOOptions:
    """Options of the joint (z, x, mu) solve; defaults as in the reference's MNIST setting."""

    T: int = 80
    m: int = 20
    alpha0: list = field(default_factory=lambda: [0.6, 0.2])
    switch_iter: int | None = None
    mu_damping: float = 0.6
    z_damping: float = 0.8
    projection: str = "none"
    eps: float = 1.0
    normalized_step: bool = False
