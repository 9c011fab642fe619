"""Measurement helpers: saved-tensor bytes, timers, peak memory."""

from __future__ import annotations

import torch
from torch import nn

from deqrun.measure import SavedTensorMeter, Timer, peak_memory_bytes, reset_peak_memory


def test_saved_tensor_meter_counts_activation_bytes_and_excludes_parameters():
    layer = nn.Linear(100, 50, bias=False)
    x = torch.randn(64, 100)
    with SavedTensorMeter(exclude=layer.parameters()) as meter:
        y = layer(x)
    assert meter.bytes == x.nbytes
    x.requires_grad_()
    with SavedTensorMeter() as meter_all:
        y = layer(x)
    assert meter_all.bytes == x.nbytes + layer.weight.nbytes  # the weight is saved for dL/dx
    y.sum().backward()


def test_saved_tensor_meter_counts_each_storage_once_and_grows_with_depth():
    x = torch.randn(32, 32, requires_grad=True)

    def saved(depth: int) -> int:
        with SavedTensorMeter() as meter:
            z = x
            for _ in range(depth):
                z = torch.tanh(z)
        return meter.bytes

    assert saved(4) == 4 * x.nbytes
    assert saved(8) == 2 * saved(4)


def test_timer_measures_elapsed_time():
    with Timer("cpu") as timer:
        torch.randn(300, 300) @ torch.randn(300, 300)
    assert timer.ms > 0


def test_peak_memory_sees_a_large_allocation():
    reset_peak_memory("cpu")
    before = peak_memory_bytes("cpu")
    block = torch.ones(64 * 2**20 // 4)
    after = peak_memory_bytes("cpu")
    assert after - before >= 0.9 * block.nbytes or after >= before + 50 * 2**20
