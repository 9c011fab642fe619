"""Models: each is an equilibrium layer f(z, injection), an injection and a head.

Every family is one module here that registers itself (deqrun.registry.register_model); importing
this package registers them all.
"""

from __future__ import annotations

from . import generator as _generator  # noqa: F401  (registers mdeq_generator)
from .base import DEQModel
from .mdeq import MDEQ, MDEQ_SIZES, MDEQConfig, MDEQSpec, build_mdeq, resolve_mdeq_spec

__all__ = ["DEQModel", "MDEQ", "MDEQ_SIZES", "MDEQConfig", "MDEQSpec", "build_mdeq",
           "resolve_mdeq_spec"]

from . import (
    deq_transformer,  # noqa: E402,F401  (registers model=deq_transformer)
    inr,  # noqa: E402, F401  (registers isiren and imfn)
)
