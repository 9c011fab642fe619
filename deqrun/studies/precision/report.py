"""summary.md sections and CSV files of the study."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import CHECKPOINT_EXACT
from .methods import FOCUS_K, FOCUS_LAMBDA, REFERENCES
from .stats import Key, batch_rows, focus_norm, medians, quartiles, rises

TRUSTED_RESIDUAL = 1e-4


def write_csv(path: Path, rows: list[dict[str, Any]], fieldnames: list[str]) -> None:
    """Rows as CSV with a header; None becomes an empty cell."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)


def fmt(value: float | None) -> str:
    """Four decimals, or n/a."""
    return "n/a" if value is None or np.isnan(value) else f"{value:.4f}"


def fmt_sci(value: float) -> str:
    """Scientific notation with two digits."""
    return f"{value:.1e}"


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


def contraction_verdict(rows: list[dict[str, Any]]) -> str:
    """Whether J at z* is contractive, said plainly."""
    radius = max(row["spectral_radius_max"] for row in rows)
    typical = statistics.median(row["spectral_radius_median"] for row in rows)
    share = statistics.mean(row["noncontractive"] for row in batch_rows(rows))
    if radius < 1:
        return (f"J at z* is contractive (spectral radius median {typical:.3f}, max "
                f"{radius:.3f}): the Neumann series behind UPG/NPG converges for every lambda.")
    return (f"WARNING: J at z* is NOT contractive on {share:.0%} of the samples (spectral "
            f"radius median {typical:.3f}, max {radius:.3f}). Fixed-point iteration and the "
            "undamped series (lambda = 1) diverge on those samples, so phantom gradients "
            "lose precision as k grows unless damped; the exact gradient exists only as the "
            "solution of the linear system (I - J)^T w = grad, which Krylov-type solvers "
            "(Anderson, Broyden) can still reach.")


def reference_verdict(rows: list[dict[str, Any]]) -> str:
    """Whether the 'exact' reference gradient converged, said plainly."""
    residual = max(row["backward_residual"] for row in rows)
    target = CHECKPOINT_EXACT["b_tol"]
    if residual <= TRUSTED_RESIDUAL:
        return (f"The tight implicit backward reached a relative residual <= {fmt_sci(residual)} "
                f"(target {target:g}), so the reference gradient is converged to that accuracy.")
    return (f"WARNING: the tight implicit backward stopped at a relative residual of "
            f"{fmt_sci(residual)} (target {target:g}): the 'exact' reference is itself "
            "unconverged; read the cosines below with that in mind.")


def batch_line(r: dict[str, Any]) -> str:
    """One batch's forward, backward and spectral-radius numbers."""
    return (f"- batch {r['batch']}: forward residual (rel, max) {fmt_sci(r['forward_residual'])}; "
            f"backward residual (rel, max) {fmt_sci(r['backward_residual'])} after "
            f"{r['backward_nstep']:.0f} steps (at the tolerance: {r['backward_converged']:.0%} of "
            f"samples); spectral radius of J median {r['spectral_radius_median']:.3f}, max "
            f"{r['spectral_radius_max']:.3f}, >= 1 on {r['noncontractive']:.0%} of samples")


def checkpoint_summary(rows: list[dict[str, Any]], info: dict[str, Any], ks: list[int],
                       lambdas: list[float], batch_size: int) -> str:
    """The trained-checkpoint section of summary.md."""
    per_batch = batch_rows(rows)
    table = medians(rows)
    exact = CHECKPOINT_EXACT
    lines = [
        f"## {info['model']} at a trained checkpoint",
        f"Run {info['run']} ({info['model']}, grad={info['grad']}, solver={info['solver']} "
        f"f_max_iter={info['f_max_iter']} f_tol={info['f_tol']}, jac_reg_weight="
        f"{info['jac_reg_weight']}, final {info['metric']} {fmt(info['metric_value'])}, status "
        f"{info['status']}); {len(per_batch)} test batch(es) of {batch_size}; medians over "
        "batches.",
        f"Exact gradient: implicit, {exact['b_solver']} {exact['b_max_iter']} steps, "
        f"rel tol {exact['b_tol']:g}. Spectral radius of J at z*: power method, 50 "
        "iterations, per sample.", ""]
    lines += [batch_line(row) for row in per_batch]
    lines += ["", contraction_verdict(rows) + " " + reference_verdict(rows), "",
              *phantom_lines(table, ks), "",
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
