"""The grid of gradient methods the study compares with the exact gradient."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from deqrun.core import GRADIENTS

KS = (1, 2, 5, 10, 20)
LAMBDAS = (0.3, 0.5, 0.8, 1.0)
FOCUS_K, FOCUS_LAMBDA = 5, 0.5


@dataclass(frozen=True)
class Method:
    """One gradient method of the grid: its CSV name and its options for deqrun.core."""

    name: str
    grad: str
    options: tuple = ()
    k: int | None = None
    lambda_: float | None = None

    def columns(self) -> dict[str, Any]:
        """The CSV columns naming this method."""
        return {"method": self.name, "k": self.k, "lambda": self.lambda_}

    def build(self) -> Any:
        """A fresh gradient-method object (as DEQ(grad=...) would hold)."""
        return GRADIENTS[self.grad](**dict(self.options))


def method_grid(ks: Iterable[int] = KS, lambdas: Iterable[float] = LAMBDAS) -> list[Method]:
    """upg and npg over k x lambda, SHINE with and without fallback, and Jacobian-free."""
    grid = [Method(name, name, (("k", k), ("lambda_", lam)), k, lam)
            for name in ("upg", "npg") for k in ks for lam in lambdas]
    grid += [Method("shine", "shine", (("fallback", True),)),
             Method("shine_nofallback", "shine", (("fallback", False),)),
             Method("jacobian_free", "jacobian_free")]
    return grid


# The non-phantom methods, drawn as reference lines: (CSV name, label, colour).
REFERENCES = (("shine", "SHINE", "tab:red"),
              ("shine_nofallback", "SHINE (no fallback)", "tab:pink"),
              ("jacobian_free", "Jacobian-free", "tab:gray"),
              ("implicit", "implicit (gradcheck)", "black"))
