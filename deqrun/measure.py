"""Measurements: synchronised timers, peak memory, bytes saved for backward.

On CUDA, timers synchronise the device before reading the clock and peak memory is
`torch.cuda.max_memory_allocated`. On CPU, memory is reported two ways: the bytes of the tensors
autograd saves for backward (through `torch.autograd.graph.saved_tensors_hooks`, counting each
storage once) and the process's peak resident set size.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable
from pathlib import Path

import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work on `device`; nothing on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """`with Timer(device) as t: ...` then `t.ms`; synchronised on GPU."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.ms = 0.0

    def __enter__(self) -> Timer:
        synchronize(self.device)
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.ms = (time.perf_counter() - self._start) * 1e3


class SavedTensorMeter:
    """Counts the bytes of tensors saved for backward inside the context (each storage once).

    Tensors in `exclude` (typically the parameters) are not counted: they exist either way.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        for part in _dense_parts(tensor):
            storage = part.untyped_storage()
            key = storage.data_ptr()
            if key not in self._excluded:
                self._seen[key] = storage.nbytes()
        return tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def _dense_parts(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The strided tensors holding a tensor's data (a sparse tensor has no storage of its own)."""
    if tensor.layout == torch.sparse_coo:
        return (tensor._indices(), tensor._values())
    if tensor.layout == torch.sparse_csr:
        return (tensor.crow_indices(), tensor.col_indices(), tensor.values())
    if tensor.layout == torch.strided:
        return (tensor,)
    return ()


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory window (CUDA allocator peak, or the process peak RSS on Linux)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif _CLEAR_REFS.exists():
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            pass


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since the last reset (Linux) or since start."""
    if _STATUS.exists():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def peak_memory_bytes(device: torch.device | str) -> int:
    """CUDA max allocated bytes on GPU; peak RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()
