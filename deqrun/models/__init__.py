"""Models: each is an equilibrium layer f(z, injection), an injection and a head.

Every family is one module here that registers itself (deqrun.registry.register_model); importing
this package registers them all.
"""

# ruff: noqa: I001  (the base modules first, then the families that register themselves)

from __future__ import annotations

from .base import DEQModel
from .mdeq import MDEQ, MDEQ_SIZES, MDEQConfig, MDEQSpec, build_mdeq, resolve_mdeq_spec

# The other families register themselves on import.
from . import deq_transformer  # noqa: E402,F401  (model=deq_transformer)
from . import generator  # noqa: E402,F401  (model=mdeq_generator)
from . import ignn  # noqa: E402,F401  (model=ignn)
from . import inr  # noqa: E402,F401  (model=isiren, model=imfn)

__all__ = ["DEQModel", "MDEQ", "MDEQ_SIZES", "MDEQConfig", "MDEQSpec", "build_mdeq",
           "resolve_mdeq_spec"]
