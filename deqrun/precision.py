"""The gradient-precision study (Geng et al. 2021, Figs. 1 and 3): how close each gradient method
comes to the exact implicit gradient.

Three parts, each written into --out as CSV and PNG, with the key numbers in summary.md:
  synthetic  f(z) = tanh(W z + U x) with ||W||_2 set; dense exact gradient; every method through
             deqrun.core.DEQ (always run);
  mdeq       a trained MDEQ checkpoint (--run): every method against a tight implicit gradient on
             test batches, with that gradient's backward residual and the spectral radius of J;
  dynamic    the grad_cosine values logged during training (trainer.precision_every, --run).

Usage: python -m deqrun.precision --out DIR [--run RUN_DIR] [--widths ...] [--spectral-norms ...]
       [--seeds N] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn
from torch.utils.data import DataLoader

from deqrun import gradcheck
from deqrun.core import DEQ, GRADIENTS, StateLayout, spectral_radius
from deqrun.errors import UserError

KS = (1, 2, 5, 10, 20)
LAMBDAS = (0.3, 0.5, 0.8, 1.0)
WIDTHS = (32, 64, 128)
SPECTRAL_NORMS = (0.5, 0.7, 0.9, 0.95)
SEEDS = 5
SYNTHETIC_BATCH = 16
FOCUS_NORM = 0.9
FOCUS_K, FOCUS_LAMBDA = 5, 0.5
SYNTHETIC_FORWARD = dict(solver="broyden", f_max_iter=60, f_tol=1e-10, stop_mode="abs")
TIGHT_FORWARD = dict(solver="anderson", f_max_iter=500, f_tol=1e-13, stop_mode="abs")
MDEQ_EXACT = dict(b_solver="anderson", b_max_iter=200, b_tol=1e-8, b_stop_mode="rel")
MDEQ_BATCHES, MDEQ_BATCH_SIZE = 4, 32
TRUSTED_RESIDUAL = 1e-4
SYNTHETIC_FIELDS = ["width", "spectral_norm", "seed", "method", "k", "lambda", "cosine",
                    "forward_residual", "w_spectral_radius"]
MDEQ_FIELDS = ["batch", "method", "k", "lambda", "cosine", "forward_residual",
               "backward_residual", "backward_converged", "backward_nstep",
               "spectral_radius_median", "spectral_radius_max", "noncontractive"]
EXIT_USER_ERROR = 2


class PrecisionError(UserError):
    """The study cannot run as asked (e.g. the run folder lacks a file); one readable line."""


# ---- the grid of gradient methods --------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """One gradient method of the grid: its CSV name and its options for deqrun.core."""

    name: str
    grad: str
    options: tuple = ()
    k: int | None = None
    lambda_: float | None = None

    def columns(self) -> dict[str, Any]:
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


# ---- part 1: the synthetic layer ---------------------------------------------------------------
@dataclass
class SyntheticLayer:
    """f(z) = tanh(W z + U x) on (batch, width) states in float64, with a linear loss <c, z*>."""

    W: torch.Tensor
    U: torch.Tensor
    x: torch.Tensor
    cotangent: torch.Tensor

    def f(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + self.x @ self.U.T)

    def params(self) -> list[torch.Tensor]:
        return [self.W, self.U]


def make_layer(width: int, spectral_norm: float, seed: int,
               batch: int = SYNTHETIC_BATCH) -> SyntheticLayer:
    """A random layer whose W has exactly the given spectral norm (the seed fixes its direction)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(width, width, generator=gen, dtype=torch.float64)
    W = spectral_norm * W / torch.linalg.matrix_norm(W, 2)
    U = torch.randn(width, width, generator=gen, dtype=torch.float64) / width**0.5
    x = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    cotangent = torch.randn(batch, width, generator=gen, dtype=torch.float64)
    return SyntheticLayer(W.requires_grad_(), U.requires_grad_(), x, cotangent)


def tight_fixed_point(layer: SyntheticLayer) -> torch.Tensor:
    """z* to about machine precision (Anderson, abs tol 1e-13)."""
    deq = DEQ(**TIGHT_FORWARD)
    result = deq.solve(layer.f, torch.zeros_like(layer.cotangent), TIGHT_FORWARD["f_max_iter"],
                       TIGHT_FORWARD["f_tol"])
    return result.z.detach()


def exact_gradient(layer: SyntheticLayer, z_star: torch.Tensor) -> list[torch.Tensor]:
    """Dense IFT: w = (I - J)^-T c per sample, then w^T df/d(W, U)."""
    with torch.no_grad():
        slope = 1 - z_star**2
        J = slope.unsqueeze(2) * layer.W.unsqueeze(0)
        eye = torch.eye(J.shape[1], dtype=J.dtype)
        w = torch.linalg.solve((eye - J).transpose(1, 2), layer.cotangent.unsqueeze(2))
        s = w.squeeze(2) * slope
        return [s.T @ z_star, s.T @ layer.x]


def method_gradient(layer: SyntheticLayer, method: Method) -> tuple[list[torch.Tensor], float]:
    """d<c, z*>/d(W, U) with `method` through deqrun.core.DEQ, and the forward residual reached."""
    deq = DEQ(grad=method.grad, **SYNTHETIC_FORWARD, **dict(method.options))
    z, stats = deq(layer.f, torch.zeros_like(layer.cotangent))
    grads = torch.autograd.grad((z * layer.cotangent).sum(), layer.params())
    return list(grads), float(stats.abs_residual.max())


def synthetic_rows(width: int, spectral_norm: float, seed: int, methods: list[Method],
                   batch: int = SYNTHETIC_BATCH) -> list[dict[str, Any]]:
    """One CSV row per method for one random layer."""
    layer = make_layer(width, spectral_norm, seed, batch)
    exact = exact_gradient(layer, tight_fixed_point(layer))
    radius = float(torch.linalg.eigvals(layer.W.detach()).abs().max())
    rows = []
    for method in methods:
        grads, residual = method_gradient(layer, method)
        rows.append(dict(width=width, spectral_norm=spectral_norm, seed=seed, **method.columns(),
                         cosine=gradcheck.cosine(grads, exact), forward_residual=residual,
                         w_spectral_radius=radius))
    return rows


def synthetic_study(widths: Iterable[int], spectral_norms: Iterable[float], seeds: int,
                    methods: list[Method], batch: int = SYNTHETIC_BATCH) -> list[dict[str, Any]]:
    """Rows for every (width, spectral norm, seed, method)."""
    return [row for width in widths for norm in spectral_norms for seed in range(seeds)
            for row in synthetic_rows(width, norm, seed, methods, batch)]


# ---- part 2: a trained MDEQ checkpoint ---------------------------------------------------------
@dataclass
class RunFolder:
    """What the study reads from a run folder."""

    path: Path
    metrics: dict[str, Any]
    checkpoint: Path
    cosines: list[tuple[int, float]] = field(default_factory=list)


def open_run(path: Path) -> RunFolder:
    """Check the run folder has its config, checkpoint and logged grad_cosine values."""
    metrics_path, checkpoint = path / "metrics.json", path / "checkpoints" / "last.pt"
    if not path.is_dir():
        raise PrecisionError(f"run folder {path} does not exist")
    if not metrics_path.is_file():
        raise PrecisionError(f"{path} has no metrics.json; pass a deqrun run folder")
    try:
        metrics = json.loads(metrics_path.read_text())
    except json.JSONDecodeError as error:
        raise PrecisionError(f"{metrics_path} is not valid JSON ({error})") from None
    if "config" not in metrics:
        raise PrecisionError(f"{metrics_path} has no 'config'; the run did not start properly")
    if not checkpoint.is_file():
        raise PrecisionError(f"{path} has no checkpoints/last.pt; let the run finish an epoch")
    cosines = read_grad_cosines(path / "steps.jsonl")
    if not cosines:
        raise PrecisionError(f"{path}/steps.jsonl has no grad_cosine values; train with "
                             "trainer.precision_every=N and logger=jsonl")
    return RunFolder(path, metrics, checkpoint, cosines)


def read_grad_cosines(steps: Path) -> list[tuple[int, float]]:
    """(step, grad_cosine) of the latest run logged in steps.jsonl, one value per step.

    The logger appends: a fresh run under an old name starts again at step 1 (only its records
    count), and a resumed run re-logs the steps after its checkpoint (the last record wins).
    A torn line (a run killed mid-write) is skipped.
    """
    if not steps.is_file():
        return []
    records = []
    for line in steps.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    starts = [i for i, record in enumerate(records) if record["step"] == 1]
    latest = records[starts[-1]:] if starts else records
    by_step = {int(r["step"]): float(r["grad_cosine"]) for r in latest if "grad_cosine" in r}
    return sorted(by_step.items())


def load_model(run: RunFolder) -> tuple[Any, nn.Module, Any, torch.device]:
    """The run's task, its model with the checkpoint's weights, its typed config, the device.

    The Jacobian penalty is switched off: the study compares gradients of the task loss only.
    """
    from deqrun.config import config_from_resolved
    from deqrun.runner.build import build_task_and_model, select_device

    config = config_from_resolved(run.metrics["config"])
    device = select_device("auto")
    task, model = build_task_and_model(config, device)
    state = torch.load(run.checkpoint, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    model.deq.jac_reg = False
    return task, model, config, device


@contextmanager
def reused_forward(deq: DEQ) -> Iterator[list]:
    """Within the block deq solves once: later solves return the first result (f, z0, result).

    Valid when every forward in the block sees the same batch, weights and dropout masks (as under
    gradcheck.replay), where the solves would be identical; it saves one solve per method.
    """
    captured: list = []
    real_solve = deq.solve

    def solve(f: Callable, z0: Any, max_iter: int, tol: float) -> Any:
        if not captured:
            captured.append((f, z0, real_solve(f, z0, max_iter, tol)))
        return captured[0][2]

    deq.solve = solve
    try:
        yield captured
    finally:
        del deq.solve


def gradients_and_stats(model: nn.Module, task: Any, x: torch.Tensor, y: torch.Tensor,
                        params: list[nn.Parameter], method: Any, state: dict[str, Any],
                        device: torch.device) -> tuple[list[torch.Tensor], Any]:
    """gradcheck.parameter_gradients that also returns the DEQ stats (with the backward solve)."""
    with gradcheck.replay(model, state, device), model.deq.use_gradient(method):
        model.train()
        logits, stats = model(x)
        grads = torch.autograd.grad(task.loss(logits, (x, y)), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)], stats


def radius_at_fixed_point(captured: tuple) -> torch.Tensor:
    """Per-sample spectral radius of J = df/dz at the captured z*."""
    f, z0, result = captured
    layout = StateLayout.of(z0)
    return spectral_radius(layout.flat_map(f), layout.flatten(result.z), n_iter=50)


def batch_diagnostics(stats: Any, radius: torch.Tensor) -> dict[str, Any]:
    """How trustworthy the exact gradient of one batch is."""
    backward = stats.backward
    return dict(forward_residual=float(stats.forward.residual.max()),
                backward_residual=float(backward.residual.max()),
                backward_converged=float(backward.converged.double().mean()),
                backward_nstep=float(backward.nstep.double().mean()),
                spectral_radius_median=float(radius.median()),
                spectral_radius_max=float(radius.max()),
                noncontractive=float((radius >= 1).double().mean()))


def mdeq_batch_rows(model: nn.Module, task: Any, x: torch.Tensor, y: torch.Tensor,
                    methods: list[Method], device: torch.device) -> list[dict[str, Any]]:
    """Every method's cosine with the tight implicit gradient on one batch (one forward solve)."""
    params = model.implicit_parameters()
    state = gradcheck.rng_state(device)
    exact_method = GRADIENTS["implicit"](**MDEQ_EXACT)
    with reused_forward(model.deq) as captured:
        exact, stats = gradients_and_stats(model, task, x, y, params, exact_method, state, device)
        base = batch_diagnostics(stats, radius_at_fixed_point(captured[0]))
        rows = []
        for method in methods:
            grads = gradcheck.parameter_gradients(model, task, (x, y), params, method.build(),
                                                  state, device)
            rows.append(dict(base, **method.columns(), cosine=gradcheck.cosine(grads, exact)))
    return rows


def mdeq_methods(model: nn.Module, methods: list[Method]) -> list[Method]:
    """The grid plus gradcheck's training-time reference; SHINE only with a Broyden forward."""
    usable = [m for m in methods if m.grad != "shine" or model.deq.solver_name == "broyden"]
    reference = Method("implicit", "implicit", tuple(gradcheck.EXACT.items()))
    return [*usable, reference]


def mdeq_study(run: RunFolder, methods: list[Method], batches: int,
               batch_size: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows for `batches` test batches of a trained MDEQ, and facts about the model."""
    task, model, config, device = load_model(run)
    torch.manual_seed(config.trainer.seed)
    loader = DataLoader(task.test_set, batch_size=batch_size, shuffle=False)
    chosen = mdeq_methods(model, methods)
    rows = []
    for index, (x, y) in enumerate(loader):
        if index >= batches:
            break
        for row in mdeq_batch_rows(model, task, x.to(device), y.to(device), chosen, device):
            rows.append(dict(batch=index, **row))
    info = dict(run=str(run.path), model=config.model.name, grad=config.grad.name,
                solver=config.solver.name, f_max_iter=config.solver.f_max_iter,
                f_tol=config.solver.f_tol, jac_reg_weight=config.trainer.jac_reg_weight,
                test_accuracy=run.metrics.get("final", {}).get("test_accuracy"),
                status=run.metrics.get("status"))
    return rows, info


# ---- aggregation -------------------------------------------------------------------------------
Key = tuple[str, Any, Any]


def medians(rows: list[dict[str, Any]], **where: Any) -> dict[Key, float]:
    """Median cosine per (method, k, lambda) over the rows matching `where`."""
    groups: dict[Key, list[float]] = {}
    for row in rows:
        if all(row[name] == value for name, value in where.items()):
            groups.setdefault((row["method"], row["k"], row["lambda"]), []).append(row["cosine"])
    return {key: statistics.median(values) for key, values in groups.items()}


def focus_norm(spectral_norms: Iterable[float]) -> float:
    """The grid's spectral norm closest to 0.9 (the acceptance point)."""
    return min(spectral_norms, key=lambda norm: abs(norm - FOCUS_NORM))


def rises(values: list[float], slack: float = 1e-9) -> bool:
    """True when the sequence never drops (up to slack) and ends above where it starts."""
    steady = all(b >= a - slack for a, b in zip(values, values[1:]))
    return steady and len(values) > 1 and values[-1] > values[0]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """25th, 50th and 75th percentiles."""
    q1, q2, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q1), float(q2), float(q3)


def write_csv(path: Path, rows: list[dict[str, Any]], fieldnames: list[str]) -> None:
    """Rows as CSV with a header; None becomes an empty cell."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


# ---- plots -------------------------------------------------------------------------------------
REFERENCES = (("shine", "SHINE", "tab:red"),
              ("shine_nofallback", "SHINE (no fallback)", "tab:pink"),
              ("jacobian_free", "Jacobian-free", "tab:gray"),
              ("implicit", "implicit (gradcheck)", "black"))


def new_figure(width: float, height: float, panels: int = 1) -> tuple[Figure, list]:
    """A figure on the Agg canvas (no pyplot, no global state) with `panels` axes in a row."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure, [figure.add_subplot(1, panels, i + 1) for i in range(panels)]


def plot_vs_k(table: dict[Key, float], ks: list[int], lambdas: list[float], title: str,
              path: Path) -> None:
    """Median cosine vs k, one line per lambda, upg and npg panels, references as h-lines."""
    figure, axes = new_figure(10, 4, 2)
    for ax, name in zip(axes, ("upg", "npg")):
        for lam in lambdas:
            ax.plot(ks, [table.get((name, k, lam), np.nan) for k in ks], "o-",
                    label=f"lambda={lam:g}")
        for method, label, color in REFERENCES:
            if (method, None, None) in table:
                ax.axhline(table[(method, None, None)], ls="--", color=color, label=label)
        ax.set(xscale="log", xlabel="k", ylabel="median cosine with exact gradient",
               title=f"{name.upper()} {title}")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="lower right")
    figure.savefig(path, dpi=120)


def plot_heatmap(table: dict[Key, float], ks: list[int], lambdas: list[float], title: str,
                 path: Path) -> None:
    """Median cosine over the k x lambda grid, upg and npg panels."""
    figure, axes = new_figure(10, 4, 2)
    for ax, name in zip(axes, ("upg", "npg")):
        grid = np.array([[table.get((name, k, lam), np.nan) for lam in lambdas] for k in ks])
        low = min(float(np.nanmin(grid)), 0.99)
        image = ax.imshow(grid, vmin=low, vmax=1.0, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            color = "black" if value > (low + 1.0) / 2 else "white"
            ax.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(lambdas)), [f"{lam:g}" for lam in lambdas])
        ax.set_yticks(range(len(ks)), [str(k) for k in ks])
        ax.set(xlabel="lambda", ylabel="k", title=f"{name.upper()} {title}")
        figure.colorbar(image, ax=ax)
    figure.savefig(path, dpi=120)


def plot_vs_spectral_norm(rows: list[dict[str, Any]], path: Path) -> None:
    """Median cosine of A_{5,0.5} (and JFB) vs the spectral norm of W, one line per width."""
    figure, (ax,) = new_figure(6, 4)
    norms = sorted({row["spectral_norm"] for row in rows})
    for width in sorted({row["width"] for row in rows}):
        for method, k, lam, style in (("upg", FOCUS_K, FOCUS_LAMBDA, "o-"),
                                      ("jacobian_free", None, None, "x:")):
            values = [medians(rows, width=width, spectral_norm=n).get((method, k, lam), np.nan)
                      for n in norms]
            label = f"A_{{{FOCUS_K},{FOCUS_LAMBDA:g}}}" if method == "upg" else "JFB"
            ax.plot(norms, values, style, label=f"{label}, width {width}")
    ax.set(xlabel="spectral norm of W", ylabel="median cosine with exact gradient",
           title="Synthetic tanh layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    figure.savefig(path, dpi=120)


def plot_dynamic(points: list[tuple[int, float]], path: Path) -> None:
    """Histogram of the logged grad_cosine values, and their course over training."""
    figure, (hist, course) = new_figure(10, 4, 2)
    steps, values = zip(*points)
    hist.hist(values, bins=min(30, max(5, len(values) // 2)), color="tab:blue")
    hist.set(xlabel="cosine with exact gradient", ylabel="checked steps",
             title="Dynamic precision (training)")
    course.plot(steps, values, "o-", ms=3)
    course.set(xlabel="step", ylabel="cosine with exact gradient", title="Cosine vs step")
    course.grid(alpha=0.3)
    figure.savefig(path, dpi=120)


# ---- summary.md --------------------------------------------------------------------------------
def fmt(value: float | None) -> str:
    """Four decimals, or n/a."""
    return "n/a" if value is None or np.isnan(value) else f"{value:.4f}"


def grid_table(table: dict[Key, float], name: str, ks: list[int], lambdas: list[float]) -> str:
    """A markdown table of median cosines, k down, lambda across."""
    lines = [f"| {name} k \\ lambda | " + " | ".join(f"{lam:g}" for lam in lambdas) + " |",
             "|---" * (len(lambdas) + 1) + "|"]
    for k in ks:
        lines.append(f"| {k} | " + " | ".join(fmt(table.get((name, k, lam))) for lam in lambdas)
                     + " |")
    return "\n".join(lines)


def phantom_lines(table: dict[Key, float], ks: list[int]) -> list[str]:
    """A_{5,0.5}, the lambda = 1 medians along k, and the reference methods."""
    focus = table.get(("upg", FOCUS_K, FOCUS_LAMBDA))
    lines = [f"- UPG A_{{{FOCUS_K},{FOCUS_LAMBDA:g}}}: median cosine **{fmt(focus)}** "
             f"(NPG: {fmt(table.get(('npg', FOCUS_K, FOCUS_LAMBDA)))})"]
    for name in ("upg", "npg"):
        along = [table.get((name, k, 1.0), np.nan) for k in ks]
        verdict = "rises with k" if rises(along) else "does NOT rise monotonically with k"
        listing = ", ".join(f"k={k}: {fmt(v)}" for k, v in zip(ks, along))
        lines.append(f"- {name.upper()} lambda = 1: {listing} -> {verdict}")
    refs = [f"{label} {fmt(table[(m, None, None)])}" for m, label, _ in REFERENCES
            if (m, None, None) in table]
    lines.append("- references (median cosine): " + ", ".join(refs))
    return lines


def synthetic_summary(rows: list[dict[str, Any]], ks: list[int], lambdas: list[float]) -> str:
    """The synthetic section of summary.md."""
    norms = sorted({row["spectral_norm"] for row in rows})
    norm = focus_norm(norms)
    table = medians(rows, spectral_norm=norm)
    focus = table.get(("upg", FOCUS_K, FOCUS_LAMBDA), np.nan)
    along = [table.get(("upg", k, 1.0), np.nan) for k in ks]
    target = "MET" if focus >= 0.9 and rises(along) else "NOT MET"
    per_norm = ", ".join(
        f"{n:g}: {fmt(medians(rows, spectral_norm=n).get(('upg', FOCUS_K, FOCUS_LAMBDA)))}"
        for n in norms)
    widths = sorted({row["width"] for row in rows})
    at_norm = [row for row in rows if row["spectral_norm"] == norm]
    seeds = len({row["seed"] for row in rows})
    lines = [
        "## Synthetic layer f(z) = tanh(W z + U x), float64",
        f"Widths {widths}, spectral norms {norms}, {seeds} seed(s) each; medians over widths x "
        f"seeds at spectral norm **{norm:g}**. Forward: Broyden to abs residual "
        f"<= {fmt_sci(max(row['forward_residual'] for row in rows))} (worst row); exact "
        "gradient by a dense solve of (I - J)^T w = c.", "",
        *phantom_lines(table, ks),
        f"- acceptance (A_{{5,0.5}} >= 0.9 and UPG lambda = 1 rising with k): **{target}**",
        f"- UPG A_{{5,0.5}} median by spectral norm: {per_norm}",
        f"- spectral radius of W at norm {norm:g} (median over layers): "
        f"{statistics.median(r['w_spectral_radius'] for r in at_norm):.3f} (a Gaussian W's "
        "eigenvalues fill a disc of about half its norm; J = diag(tanh') W is smaller still)", "",
        grid_table(table, "upg", ks, lambdas), "", grid_table(table, "npg", ks, lambdas), ""]
    return "\n".join(lines)


def fmt_sci(value: float) -> str:
    """Scientific notation with two digits."""
    return f"{value:.1e}"


def mdeq_verdict(rows: list[dict[str, Any]]) -> str:
    """Whether J is contractive and whether the 'exact' reference converged, said plainly."""
    radius = max(row["spectral_radius_max"] for row in rows)
    typical = statistics.median(row["spectral_radius_median"] for row in rows)
    share = statistics.mean(row["noncontractive"] for row in batch_rows(rows))
    residual = max(row["backward_residual"] for row in rows)
    if radius < 1:
        parts = [f"J at z* is contractive (spectral radius median {typical:.3f}, max "
                 f"{radius:.3f}): the Neumann series behind UPG/NPG converges for every lambda."]
    else:
        parts = [f"WARNING: J at z* is NOT contractive on {share:.0%} of the samples (spectral "
                 f"radius median {typical:.3f}, max {radius:.3f}). Fixed-point iteration and the "
                 "undamped series (lambda = 1) diverge on those samples, so phantom gradients "
                 "lose precision as k grows unless damped; the exact gradient exists only as the "
                 "solution of the linear system (I - J)^T w = grad, which Krylov-type solvers "
                 "(Anderson, Broyden) can still reach."]
    if residual <= TRUSTED_RESIDUAL:
        parts.append(f"The tight implicit backward reached a relative residual <= "
                     f"{fmt_sci(residual)} (target {MDEQ_EXACT['b_tol']:g}), so the reference "
                     "gradient is converged to that accuracy.")
    else:
        parts.append(f"WARNING: the tight implicit backward stopped at a relative residual of "
                     f"{fmt_sci(residual)} (target {MDEQ_EXACT['b_tol']:g}): the 'exact' "
                     "reference is itself unconverged; read the cosines below with that in mind.")
    return " ".join(parts)


def batch_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first row of every batch (the batch-level columns are the same in all its rows)."""
    return [next(r for r in rows if r["batch"] == b) for b in sorted({r["batch"] for r in rows})]


def batch_line(r: dict[str, Any]) -> str:
    """One batch's forward, backward and spectral-radius numbers."""
    return (f"- batch {r['batch']}: forward residual (rel, max) {fmt_sci(r['forward_residual'])}; "
            f"backward residual (rel, max) {fmt_sci(r['backward_residual'])} after "
            f"{r['backward_nstep']:.0f} steps (at the tolerance: {r['backward_converged']:.0%} of "
            f"samples); spectral radius of J median {r['spectral_radius_median']:.3f}, max "
            f"{r['spectral_radius_max']:.3f}, >= 1 on {r['noncontractive']:.0%} of samples")


def mdeq_summary(rows: list[dict[str, Any]], info: dict[str, Any], ks: list[int],
                 lambdas: list[float], batch_size: int) -> str:
    """The MDEQ-checkpoint section of summary.md."""
    per_batch = batch_rows(rows)
    table = medians(rows)
    lines = [
        "## MDEQ at a trained checkpoint",
        f"Run {info['run']} ({info['model']}, grad={info['grad']}, solver={info['solver']} "
        f"f_max_iter={info['f_max_iter']} f_tol={info['f_tol']}, jac_reg_weight="
        f"{info['jac_reg_weight']}, final test accuracy {fmt(info['test_accuracy'])}, status "
        f"{info['status']}); {len(per_batch)} test batch(es) of {batch_size}; medians over "
        "batches.",
        f"Exact gradient: implicit, {MDEQ_EXACT['b_solver']} {MDEQ_EXACT['b_max_iter']} steps, "
        f"rel tol {MDEQ_EXACT['b_tol']:g}. Spectral radius of J at z*: power method, 50 "
        "iterations, per sample.", ""]
    lines += [batch_line(row) for row in per_batch]
    lines += ["", mdeq_verdict(rows), "", *phantom_lines(table, ks), "",
              grid_table(table, "upg", ks, lambdas), "", grid_table(table, "npg", ks, lambdas), ""]
    return "\n".join(lines)


def dynamic_summary(points: list[tuple[int, float]]) -> str:
    """The dynamic-precision section of summary.md."""
    values = [value for _, value in points]
    q1, q2, q3 = quartiles(values)
    first, last = points[0], points[-1]
    return "\n".join([
        "## Dynamic precision (grad_cosine logged during training)",
        f"{len(values)} checked steps ({first[0]} to {last[0]}): median **{fmt(q2)}**, quartiles "
        f"{fmt(q1)} / {fmt(q3)}, min {fmt(min(values))}, max {fmt(max(values))}; first "
        f"{fmt(first[1])}, last {fmt(last[1])}.", ""])


# ---- the study and its command line ------------------------------------------------------------
@dataclass
class StudyOptions:
    """What to compute and where to write it."""

    out: Path
    run: Path | None = None
    widths: list[int] = field(default_factory=lambda: list(WIDTHS))
    spectral_norms: list[float] = field(default_factory=lambda: list(SPECTRAL_NORMS))
    seeds: int = SEEDS
    batch: int = SYNTHETIC_BATCH
    mdeq_batches: int = MDEQ_BATCHES
    mdeq_batch_size: int = MDEQ_BATCH_SIZE
    ks: list[int] = field(default_factory=lambda: list(KS))
    lambdas: list[float] = field(default_factory=lambda: list(LAMBDAS))
    threads: int | None = None


def say(message: str) -> None:
    print(f"deqrun.precision: {message}", file=sys.stderr, flush=True)


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with `count` intra-op threads (small matmuls are faster on one)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_synthetic(options: StudyOptions, methods: list[Method]) -> str:
    """Part 1: CSV, three plots; returns its summary section."""
    start = time.perf_counter()
    with torch_threads(1):
        rows = synthetic_study(options.widths, options.spectral_norms, options.seeds, methods,
                               options.batch)
    write_csv(options.out / "synthetic.csv", rows, SYNTHETIC_FIELDS)
    norm = focus_norm(options.spectral_norms)
    table = medians(rows, spectral_norm=norm)
    title = f"(synthetic, spectral norm {norm:g})"
    plot_vs_k(table, options.ks, options.lambdas, title, options.out / "synthetic_vs_k.png")
    plot_heatmap(table, options.ks, options.lambdas, title,
                 options.out / "synthetic_heatmap.png")
    plot_vs_spectral_norm(rows, options.out / "synthetic_vs_spectral_norm.png")
    say(f"synthetic: {len(rows)} rows in {time.perf_counter() - start:.0f} s")
    return synthetic_summary(rows, options.ks, options.lambdas)


def run_mdeq(run: RunFolder, options: StudyOptions, methods: list[Method]) -> str:
    """Part 2: CSV and plot for the run's checkpoint; returns its summary section."""
    start = time.perf_counter()
    with torch_threads(options.threads or torch.get_num_threads()):
        rows, info = mdeq_study(run, methods, options.mdeq_batches, options.mdeq_batch_size)
    write_csv(options.out / "mdeq.csv", rows, MDEQ_FIELDS)
    plot_vs_k(medians(rows), options.ks, options.lambdas, "(MDEQ checkpoint)",
              options.out / "mdeq_vs_k.png")
    say(f"mdeq: {len(rows)} rows in {time.perf_counter() - start:.0f} s")
    return mdeq_summary(rows, info, options.ks, options.lambdas, options.mdeq_batch_size)


def run_dynamic(run: RunFolder, options: StudyOptions) -> str:
    """Part 3: the logged grad_cosine values as CSV and PNG; returns its summary section."""
    rows = [dict(step=step, grad_cosine=value) for step, value in run.cosines]
    write_csv(options.out / "dynamic_precision.csv", rows, ["step", "grad_cosine"])
    plot_dynamic(run.cosines, options.out / "dynamic_precision.png")
    return dynamic_summary(run.cosines)


def run_study(options: StudyOptions) -> Path:
    """Run every part that the options ask for; return the path of summary.md."""
    run = open_run(options.run) if options.run is not None else None
    options.out.mkdir(parents=True, exist_ok=True)
    methods = method_grid(options.ks, options.lambdas)
    sections = ["# Gradient precision study (Geng et al. 2021, Figs. 1 and 3)", "",
                run_synthetic(options, methods)]
    if run is not None:
        sections += [run_mdeq(run, options, methods), run_dynamic(run, options)]
    summary = options.out / "summary.md"
    summary.write_text("\n".join(sections))
    say(f"wrote {summary}")
    return summary


QUICK = dict(widths=[16], spectral_norms=[0.5, 0.9], seeds=1, batch=4, mdeq_batches=1,
             mdeq_batch_size=8)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def contraction_norm(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"spectral norms must be in (0, 1), got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> StudyOptions:
    """Command-line options; unset sizes take the full-study defaults (or --quick's)."""
    parser = argparse.ArgumentParser(prog="python -m deqrun.precision", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for CSV, PNG, summary.md")
    parser.add_argument("--run", type=Path, help="a deqrun run folder (MDEQ + dynamic parts)")
    parser.add_argument("--widths", type=positive_int, nargs="+")
    parser.add_argument("--spectral-norms", type=contraction_norm, nargs="+")
    parser.add_argument("--seeds", type=positive_int, help="random layers per width and norm")
    parser.add_argument("--batch", type=positive_int, help="synthetic inputs per layer")
    parser.add_argument("--mdeq-batches", type=positive_int, help="test batches of the MDEQ")
    parser.add_argument("--mdeq-batch-size", type=positive_int)
    parser.add_argument("--threads", type=positive_int, help="torch threads for the MDEQ part")
    parser.add_argument("--quick", action="store_true", help="a tiny grid, for tests")
    args = parser.parse_args(argv)
    options = StudyOptions(out=args.out, run=args.run, threads=args.threads)
    if args.quick:
        for name, value in QUICK.items():
            setattr(options, name, value)
    for name in ("widths", "spectral_norms", "seeds", "batch", "mdeq_batches", "mdeq_batch_size"):
        if getattr(args, name) is not None:
            setattr(options, name, getattr(args, name))
    return options


def main(argv: list[str] | None = None) -> int:
    """Console entry point; a user error prints one line and returns 2."""
    options = parse_args(argv)
    try:
        run_study(options)
    except UserError as error:
        print(f"deqrun.precision: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
