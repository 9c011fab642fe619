"""The gradient-precision study: synthetic numbers against dense answers, the trained-checkpoint
part on a toy model and on a real MDEQ run, the CLI."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from studies_toy import ToyDEQ, ToyTask, dense_exact

from deqrun.core import DEQ
from deqrun.studies import gradcheck
from deqrun.studies.precision import checkpoint, cli, stats, study
from deqrun.studies.precision import synthetic as S
from deqrun.studies.precision.dynamic import read_grad_cosines
from deqrun.studies.precision.methods import KS, LAMBDAS, method_grid
from deqrun.tasks.base import LoaderOptions

TINY_RUN = ["trainer.epochs=1", "task.subset=128", "trainer.batch_size=64", "solver.f_max_iter=5",
            "trainer.precision_every=1", "run_name=t", "trainer.threads=1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_METHODS = 2 * len(KS) * len(LAMBDAS) + 3


def run_module(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def pick(rows: list[dict], **where) -> list[dict]:
    return [r for r in rows if all(r[name] == value for name, value in where.items())]


def cosine_of(rows: list[dict], method: str, k=None, lam=None, **where) -> float:
    (row,) = pick(rows, method=method, k=k, **{"lambda": lam}, **where)
    return float(row["cosine"])


@pytest.fixture(scope="module")
def synthetic() -> list[dict]:
    """The full method grid at width 24, spectral norms 0.5 and 0.9, two seeds."""
    with study.torch_threads(1):
        return S.synthetic_study([24], [0.5, 0.9], 2, method_grid(), batch=4)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A one-epoch MDEQ run with grad_cosine logged at every step."""
    cwd = tmp_path_factory.mktemp("tiny")
    result = run_module("deqrun.cli", TINY_RUN, cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "outputs" / "runs" / "t"


def test_layer_has_the_asked_spectral_norm():
    layer = S.make_layer(20, 0.7, seed=3, batch=2)
    assert float(torch.linalg.matrix_norm(layer.W.detach(), 2)) == pytest.approx(0.7, rel=1e-12)


def test_exact_gradient_matches_autograd_through_a_long_unroll():
    layer = S.make_layer(12, 0.5, seed=1, batch=3)
    z = torch.zeros_like(layer.cotangent)
    for _ in range(200):
        z = layer.f(z)
    unrolled = torch.autograd.grad((z * layer.cotangent).sum(), layer.params())
    exact = S.exact_gradient(layer, S.tight_fixed_point(layer))
    for u, e in zip(unrolled, exact):
        assert float((u - e).norm() / e.norm()) < 1e-10


def test_synthetic_grid_has_every_row(synthetic):
    assert len(synthetic) == 2 * 2 * N_METHODS
    keys = {(r["spectral_norm"], r["seed"], r["method"], r["k"], r["lambda"]) for r in synthetic}
    assert len(keys) == len(synthetic)
    for name in ("upg", "npg"):
        grid = {(r["k"], r["lambda"]) for r in synthetic if r["method"] == name}
        assert grid == {(k, lam) for k in KS for lam in LAMBDAS}
    assert {"shine", "shine_nofallback", "jacobian_free"} <= {r["method"] for r in synthetic}
    assert max(r["forward_residual"] for r in synthetic) < 1e-8


def test_k1_lambda1_phantom_gradients_equal_jacobian_free(synthetic):
    for norm in (0.5, 0.9):
        for seed in (0, 1):
            where = dict(spectral_norm=norm, seed=seed)
            jfb = cosine_of(synthetic, "jacobian_free", **where)
            assert cosine_of(synthetic, "npg", 1, 1.0, **where) == pytest.approx(jfb, abs=1e-10)
            assert cosine_of(synthetic, "upg", 1, 1.0, **where) == pytest.approx(jfb, abs=1e-8)
            assert jfb < 0.999


def test_large_k_with_lambda1_reaches_the_exact_gradient(synthetic):
    for name in ("upg", "npg"):
        for seed in (0, 1):
            first = cosine_of(synthetic, name, 1, 1.0, spectral_norm=0.5, seed=seed)
            last = cosine_of(synthetic, name, 20, 1.0, spectral_norm=0.5, seed=seed)
            assert last > 1 - 1e-9 and last > first


def test_npg_cosine_matches_a_dense_truncated_series(synthetic):
    layer = S.make_layer(24, 0.9, seed=1, batch=4)
    z_star = S.tight_fixed_point(layer)
    slope = 1 - z_star**2
    J_T = (slope.unsqueeze(2) * layer.W.detach().unsqueeze(0)).transpose(1, 2)
    B_T = 0.5 * J_T + 0.5 * torch.eye(24, dtype=torch.float64)
    term, total = layer.cotangent, torch.zeros_like(layer.cotangent)
    for _ in range(5):
        total = total + term
        term = (B_T @ term.unsqueeze(2)).squeeze(2)
    s = 0.5 * total * slope
    dense = gradcheck.cosine([s.T @ z_star, s.T @ layer.x], S.exact_gradient(layer, z_star))
    row = cosine_of(synthetic, "npg", 5, 0.5, spectral_norm=0.9, seed=1)
    assert row == pytest.approx(dense, abs=1e-9)
    assert dense < 1 - 1e-6


def test_rises_and_medians():
    assert stats.rises([0.5, 0.7, 0.7, 0.9])
    assert not stats.rises([0.5, 0.9, 0.8])
    assert not stats.rises([0.5, 0.5])
    rows = [dict(method="upg", k=5, spectral_norm=0.9, cosine=c, **{"lambda": 0.5})
            for c in (0.1, 0.9, 0.8)]
    assert stats.medians(rows, spectral_norm=0.9) == {("upg", 5, 0.5): 0.8}
    assert stats.medians(rows, spectral_norm=0.5) == {}


def toy_checkpoint(solver: str = "anderson") -> checkpoint.Loaded:
    """A 'trained' toy model, as load_model would return it (contraction 0.5, with dropout)."""
    deq = DEQ(solver=solver, grad="upg", f_max_iter=200, f_tol=1e-12, stop_mode="abs")
    return checkpoint.Loaded(ToyTask(), ToyDEQ(deq, dropout=0.2), None, torch.device("cpu"))


def test_checkpoint_rows_of_a_toy_model_against_the_dense_answers():
    loaded = toy_checkpoint()
    task, model = loaded.task, loaded.model
    methods = checkpoint.checkpoint_methods(model, method_grid(ks=[1, 20], lambdas=[1.0]))
    assert "shine" not in {m.grad for m in methods} and methods[-1].name == "implicit"
    batch = next(iter(task.eval_batches("test", LoaderOptions(4))))
    rows = checkpoint.batch_rows(loaded, batch, methods)
    assert [r["method"] for r in rows] == [m.name for m in methods]
    by_name = {(r["method"], r["k"]): r["cosine"] for r in rows}
    assert by_name[("npg", 1)] == pytest.approx(by_name[("jacobian_free", None)], abs=1e-10)
    assert by_name[("jacobian_free", None)] < 0.999
    assert by_name[("upg", 20)] > 1 - 1e-6 and by_name[("implicit", None)] > 1 - 1e-9
    first = rows[0]
    assert first["backward_residual"] <= 1e-8 and first["backward_converged"] == 1.0
    assert first["forward_residual"] < 1e-8
    assert 0 < first["spectral_radius_max"] < 0.5 + 1e-6 and first["noncontractive"] == 0
    assert int(model.calls) == 0 and model.deq.gradient.name == "upg"
    model.dropout = 0.0  # the dense answer has no masks: the same comparison without dropout
    exact = gradcheck.parameter_gradients(model, task, batch, model.implicit_parameters(),
                                          gradcheck.exact_method(), gradcheck.rng_state(
                                              loaded.device), loaded.device)
    assert gradcheck.cosine(exact, dense_exact(model, batch)) == pytest.approx(1, abs=1e-10)


def test_checkpoint_methods_keep_shine_with_broyden():
    model = toy_checkpoint("broyden").model
    names = [m.name for m in checkpoint.checkpoint_methods(model, method_grid(ks=[1], lambdas=[1]))]
    assert {"shine", "shine_nofallback", "implicit"} <= set(names)


def write_steps(path: Path, cosines: list[tuple[int, float | None]], tail: str = "") -> Path:
    records = [{"step": s} if c is None else {"step": s, "grad_cosine": c} for s, c in cosines]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


def test_grad_cosines_are_read_and_a_torn_line_is_skipped(tmp_path):
    steps = write_steps(tmp_path / "steps.jsonl", [(1, 0.5), (2, None), (3, -0.25)],
                        tail='{"step": 4, "grad_co')
    assert read_grad_cosines(steps) == [(1, 0.5), (3, -0.25)]
    assert read_grad_cosines(tmp_path / "missing.jsonl") == []


def test_grad_cosines_come_from_the_latest_run_in_an_appended_log(tmp_path):
    old_run = [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.35), (5, 0.38), (6, 0.39)]
    resumed = [(1, 0.9), (2, 0.8), (3, 0.7), (2, 0.6), (3, 0.5), (4, 0.4)]
    steps = write_steps(tmp_path / "steps.jsonl", old_run + resumed)
    assert read_grad_cosines(steps) == [(1, 0.9), (2, 0.6), (3, 0.5), (4, 0.4)]


def test_cli_quick_with_a_run_writes_every_file(tiny_run, tmp_path):
    out = tmp_path / "study"
    result = run_module("deqrun.studies.precision",
                        ["--out", str(out), "--run", str(tiny_run), "--quick", "--threads", "1"],
                        tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("synthetic_vs_k", "synthetic_heatmap", "synthetic_vs_spectral_norm",
                 "mdeq_vs_k", "dynamic_precision"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC, name
    assert len(read_csv(out / "synthetic.csv")) == 2 * N_METHODS
    mdeq = read_csv(out / "mdeq.csv")
    assert len(mdeq) == N_METHODS + 1
    assert all(-1 <= float(r["cosine"]) <= 1 for r in mdeq)
    assert float(mdeq[0]["spectral_radius_max"]) > 0 and mdeq[0]["backward_residual"]
    jfb = cosine_of(mdeq, "jacobian_free", "", "")
    assert cosine_of(mdeq, "npg", "1", "1.0") == pytest.approx(jfb, abs=1e-6)
    assert len(read_csv(out / "dynamic_precision.csv")) == 2
    summary = (out / "summary.md").read_text()
    for needle in ("A_{5,0.5}", "lambda = 1", "SHINE", "Jacobian-free", "backward residual",
                   "spectral radius", "Dynamic precision", "quartiles"):
        assert needle in summary, needle


def broken_copy(run: Path, tmp_path: Path, drop: str) -> Path:
    """A copy of the run folder without the file (or the grad_cosine values) named by drop."""
    copy = tmp_path / f"no-{drop}"
    shutil.copytree(run, copy)
    if drop == "json":
        (copy / "metrics.json").write_text("{")
    elif drop == "grad_cosine":
        lines = (copy / "steps.jsonl").read_text().splitlines()
        (copy / "steps.jsonl").write_text("\n".join(
            line.replace('"grad_cosine"', '"other"') for line in lines) + "\n")
    else:
        (copy / drop).unlink()
    return copy


@pytest.mark.parametrize("drop,needle", [
    (None, "does not exist"),
    ("metrics.json", "no metrics.json"),
    ("checkpoints/last.pt", "checkpoints/last.pt"),
    ("grad_cosine", "trainer.precision_every"),
    ("json", "not valid JSON"),
])
def test_a_run_folder_lacking_what_it_needs_is_one_line_and_exit_2(tiny_run, tmp_path, capsys,
                                                                   drop, needle):
    run = tmp_path / "missing" if drop is None else broken_copy(tiny_run, tmp_path, drop)
    out = tmp_path / "out"
    assert cli.main(["--out", str(out), "--run", str(run), "--quick"]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
