"""Mixed precision in the runner: trainer.precision=bf16|fp16 runs the forward under autocast,
the DEQ solver iterates in float32, and metrics.json records the policy."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from deqrun.core import DEQ

FAST = ["trainer.epochs=1", "task.subset=128", "trainer.batch_size=64", "solver.f_max_iter=5",
        "trainer.eval_batch_size=512", "trainer.progress=false"]


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_under_bf16_autocast_the_layer_is_bf16_and_the_solver_state_float32(solver):
    torch.manual_seed(0)
    inject, mix = nn.Linear(6, 16), nn.Linear(16, 16, bias=False)
    with torch.no_grad():
        mix.weight.mul_(0.6 / torch.linalg.matrix_norm(mix.weight, 2))
    x = torch.randn(5, 6)
    seen = []

    def f(z):
        seen.append(z.dtype)
        inner = mix(z)
        seen.append(inner.dtype)
        return torch.tanh(inner + u)

    deq = DEQ(solver=solver, grad="implicit", f_max_iter=40, f_tol=1e-4).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u = inject(x)
        z, stats = deq(f, torch.zeros(5, 16))
        loss = z.square().sum()
    loss.backward()
    states, layers = set(seen[0::2]), set(seen[1::2])
    assert states == {torch.float32}  # what the solver iterates (and the backward re-enters)
    assert layers == {torch.bfloat16}  # the layer's matmul under autocast
    assert z.dtype == torch.float32 and stats.residual.dtype == torch.float32
    assert float(stats.residual.max()) < 5e-2  # bf16 layer, float32 solve: converges
    assert mix.weight.grad.dtype == torch.float32 and torch.isfinite(mix.weight.grad).all()
    seen.clear()
    plain, _ = deq.eval()(lambda z: torch.tanh(mix(z) + inject(x)), torch.zeros(5, 16))
    assert (z.detach() - plain).abs().max() < 5e-2


def test_without_autocast_nothing_changes():
    deq = DEQ(solver="anderson", grad="implicit", f_max_iter=30, f_tol=1e-6).eval()
    z0 = torch.zeros(3, 4, dtype=torch.float64)
    z, _ = deq(lambda z: 0.5 * torch.tanh(z) + 1.0, z0)
    assert z.dtype == torch.float64


@pytest.mark.parametrize("precision", ["bf16"])
def test_a_bf16_run_completes_and_records_its_numerics(tmp_path, precision):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "deqrun.cli", *FAST, "run_name=mixed",
                           f"trainer.precision={precision}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "outputs" / "runs" / "mixed"
    content = json.loads((run_dir / "metrics.json").read_text())
    assert content["status"] == "completed"
    assert content["numerics"] == dict(precision=precision, tf32=False, deterministic=True,
                                       cudnn_benchmark=False, solver_dtype="float32",
                                       matmul_precision="highest")
    final = content["final"]
    assert 0 <= final["test_accuracy"] <= 1 and 0 < final["forward_nstep"] <= 5
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(s["objective"])) for s in steps)
    weights = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert {w.dtype for w in weights.values() if w.is_floating_point()} == {torch.float32}


@pytest.mark.parametrize("args,needle", [
    (["trainer.precision=16"], "trainer.precision must be 32 (or fp32), bf16 or fp16"),
    (["trainer.precision=bf16", "trainer.precision_every=5"], "need trainer.precision=32"),
    (["trainer.distributed=maybe"], "trainer.distributed must be auto or off"),
    (["trainer.tf32=yes"], "trainer.tf32 must be auto, true or false"),
])
def test_bad_scale_out_options_are_one_line(tmp_path, args, needle):
    done = subprocess.run([sys.executable, "-m", "deqrun.cli", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and needle in done.stderr
    assert "Traceback" not in done.stderr
