"""SHINE in training: OPA gets the batch's outer-loss gradient from the model, and runs report
SHINE's fallback fraction and the cosine with the exact gradient (the SHINE table's columns)."""

from __future__ import annotations

import gc
import json
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_run_safety import FAST, deqrun

import deqrun.core.solvers as solvers_module
from deqrun.core import DEQ
from deqrun.measure import SavedTensorMeter
from deqrun.models import build_mdeq


def tiny_mdeq(**deq_options) -> torch.nn.Module:
    torch.manual_seed(0)
    deq = DEQ(solver="broyden", grad="shine", fallback=False, f_max_iter=6, f_tol=1e-9,
              **deq_options)
    return build_mdeq({"size": "tiny"}, deq=deq, in_channels=1, num_classes=10).double()


@pytest.fixture
def opa_calls(monkeypatch) -> list[torch.Tensor]:
    """The outer gradients every OPA update of any Broyden solve receives."""
    calls: list[torch.Tensor] = []
    original = solvers_module._BroydenMemory.opa_update

    def spy(self, point, outer_grad, *args, **kwargs):
        calls.append(outer_grad.detach().clone())
        return original(self, point, outer_grad, *args, **kwargs)

    monkeypatch.setattr(solvers_module._BroydenMemory, "opa_update", spy)
    return calls


def test_mdeq_outer_grad_is_the_batch_loss_gradient_through_the_head():
    model = tiny_mdeq(update="adjoint", opa_every=2).train()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 4, 7])
    z = [torch.randn_like(t) for t in model.injection(x)]
    with model.outer_objective(lambda out: F.cross_entropy(out, y)):
        got = model.outer_grad()(z)
    leaves = [t.clone().requires_grad_() for t in z]
    want = torch.autograd.grad(F.cross_entropy(model.head(leaves), y), leaves)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-10, atol=1e-14) and float(w.abs().max()) > 0
    assert model.outer_grad() is None  # outside the block: no outer loss


def test_head_statistics_are_untouched_by_the_outer_gradient():
    model = tiny_mdeq(update="adjoint", opa_every=2).train()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    z = [torch.randn_like(t) for t in model.injection(x)]
    before = [b.clone() for b in model.classifier.buffers()]
    with model.outer_objective(lambda out: out.square().sum()):
        model.outer_grad()(z)
    assert all(torch.equal(b, a) for b, a in zip(model.classifier.buffers(), before))


def test_opa_forward_uses_the_outer_gradient_and_needs_it(opa_calls):
    model = tiny_mdeq(update="adjoint", opa_every=2).train()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 4, 7])
    with pytest.raises(ValueError, match="opa_every > 0 needs the outer-loss gradient"):
        model(x)
    with model.outer_objective(lambda out: F.cross_entropy(out, y)):
        logits, stats = model(x)
    assert len(opa_calls) >= 1
    assert all(float(g.abs().max()) > 0 for g in opa_calls)
    F.cross_entropy(logits, y).backward()  # SHINE's backward over the OPA-updated inverse
    assert all(p.grad is not None for p in model.equilibrium.parameters() if p.requires_grad)


def steps(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]


def test_the_opa_row_trains_with_opa_and_logs_the_cosine_with_exact(tmp_path, opa_calls):
    args = ["experiment=shine/shine_opa", *FAST, "trainer.max_steps=2",
            "trainer.precision_every=2", "solver.f_max_iter=12", "solver.f_tol=1e-9",
            "logger=jsonl", "run_name=opa"]
    result = deqrun(args, tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(opa_calls) > 0  # the training forward passed dL/dz to the Broyden solve
    run = tmp_path / "outputs" / "runs" / "opa"
    final = json.loads((run / "metrics.json").read_text())["final"]
    cosines = [r["grad_cosine"] for r in steps(run) if "grad_cosine" in r]
    assert final["grad_cosine_checks"] == len(cosines) == 1  # at step 0 of 2
    assert final["grad_cosine"] == pytest.approx(statistics.fmean(cosines))
    assert all(-1 <= c <= 1 for c in cosines) and "fallback_fraction" not in final


def test_shine_with_fallback_reports_its_fallback_fraction(tmp_path):
    # A threshold at 0: every sample falls back, so the fraction is exactly 1.
    args = ["experiment=shine/shine_fallback", *FAST, "trainer.max_steps=2",
            "grad.fallback_threshold=1e-9", "logger=jsonl", "run_name=fb"]
    result = deqrun(args, tmp_path)
    assert result.returncode == 0, result.stderr
    run = tmp_path / "outputs" / "runs" / "fb"
    final = json.loads((run / "metrics.json").read_text())["final"]
    assert [r["fallback"] for r in steps(run)] == [1.0, 1.0]
    assert final["fallback_fraction"] == 1.0 and "grad_cosine" not in final


def live_tensors() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def test_solver_graphs_are_freed_under_the_saved_tensor_meter():
    """The adjoint/OPA updates build f graphs inside the loop's SavedTensorMeter; an identity pack
    hook made saved outputs hold their own grad_fn, and every solve's graphs leaked (20 GB)."""
    model = tiny_mdeq(update="adjoint", opa_every=2).train()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 4, 7])
    counts = []
    for _ in range(4):
        with model.outer_objective(lambda out: F.cross_entropy(out, y)), \
                SavedTensorMeter(exclude=model.parameters()):
            logits, _ = model(x)
        F.cross_entropy(logits, y).backward()
        del logits
        counts.append(live_tensors())
    assert counts[-1] <= counts[1], counts


def test_the_jacobian_penalty_applies_on_every_nth_step_only(tmp_path):
    # jac_reg_every=2: steps 1 and 3 (progress 0 and 2) add the penalty, steps 2 and 4 do not.
    args = [*FAST, "task.subset=256", "trainer.max_steps=4", "trainer.jac_reg_weight=0.5",
            "trainer.jac_reg_every=2", "logger=jsonl", "run_name=jr"]
    result = deqrun(args, tmp_path)
    assert result.returncode == 0, result.stderr
    logged = steps(tmp_path / "outputs" / "runs" / "jr")
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    assert ["jac_loss" in r for r in logged] == [True, False, True, False]
    assert all(r["jac_loss"] > 0 for r in logged if "jac_loss" in r)
    bad = deqrun([*FAST, "trainer.jac_reg_every=0", "run_name=bad"], tmp_path)
    assert bad.returncode != 0 and "trainer.jac_reg_every must be >= 1" in bad.stderr
