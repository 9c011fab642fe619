"""Models: each is an equilibrium layer f(z, injection), an injection and a head."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

from deqrun.core import DEQ

from .mdeq import MDEQ, MDEQ_SIZES, MDEQSpec, build_mdeq, resolve_mdeq_spec

ModelBuilder = Callable[..., nn.Module]

MODELS: dict[str, ModelBuilder] = {"mdeq": build_mdeq}


def build_model(name: str, options: Mapping[str, Any], *, deq: DEQ, in_channels: int,
                num_classes: int) -> nn.Module:
    """The model registered as `name`, built from its options around the DEQ layer `deq`."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(sorted(MODELS))}")
    return MODELS[name](options, deq=deq, in_channels=in_channels, num_classes=num_classes)


__all__ = ["MDEQ", "MDEQ_SIZES", "MODELS", "MDEQSpec", "build_mdeq", "build_model",
           "resolve_mdeq_spec"]

from . import inr  # noqa: E402, F401  (registers isiren and imfn)
