"""SHINE's inversion quality, with and without outer-problem awareness (OPA).

    python -m deqrun.studies.inversion [--out outputs/reference/shine] [--seeds 5]

For f(z) = tanh(W z + U x + b) (width 100; W normal with ||W||_2 = 0.9, or upper-triangular with
spectral norm 0.99), Broyden solves the fixed point with good or adjoint updates, with OPA
(every 5 steps along a prescribed direction p, as the outer gradient) or without. Reported:
cosine between SHINE's -v^T B and the exact -v^T (J - I)^-1 for v = p (prescribed) and for a
fresh random v, beside the Jacobian-free estimate v. Writes inversion.json and inversion.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from deqrun.core import SOLVERS

WIDTH, BATCH, MAX_ITER, TOL = 100, 8, 40, 1e-10
METHODS = {"Broyden": {}, "Broyden + OPA": dict(opa_every=5),
           "adjoint Broyden": dict(update="adjoint"),
           "adjoint Broyden + OPA": dict(update="adjoint", opa_every=5)}


def tanh_problem(seed: int, normal: bool):
    """f, and the batch of exact Jacobians I - J at the fixed point."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(WIDTH, WIDTH, generator=gen, dtype=torch.float64)
    W = W if normal else torch.triu(W)
    W = (0.9 if normal else 0.99) * W / torch.linalg.matrix_norm(W, 2)
    inject = torch.randn(BATCH, WIDTH, generator=gen, dtype=torch.float64)
    f = lambda z: torch.tanh(z @ W.T + inject)  # noqa: E731
    z = torch.zeros(BATCH, WIDTH, dtype=torch.float64)
    for _ in range(3000):
        z = f(z)
    system = torch.eye(WIDTH, dtype=torch.float64) - (1 - z**2).unsqueeze(2) * W
    return f, system


def cosines(f, system, options: dict, seed: int) -> dict[str, float]:
    gen = torch.Generator().manual_seed(1000 + seed)
    prescribed, random = (torch.randn(BATCH, WIDTH, generator=gen, dtype=torch.float64)
                          for _ in range(2))
    result = SOLVERS["broyden"](f, torch.zeros(BATCH, WIDTH, dtype=torch.float64),
                                max_iter=MAX_ITER, tol=TOL, stop_mode="abs",
                                outer_grad=lambda z: prescribed, **options)
    out = {}
    for name, v in (("prescribed", prescribed), ("random", random)):
        exact = torch.linalg.solve(system.transpose(1, 2), v.unsqueeze(2)).squeeze(2)
        shine = -result.lowrank.rmatvec(v)
        out[name] = float(torch.cosine_similarity(shine, exact, dim=1).mean())
        out[f"{name} JF"] = float(torch.cosine_similarity(v, exact, dim=1).mean())
    out["f_evals"] = result.n_f_evals
    return out


def run(seeds: int) -> dict:
    """{problem: {method: [per-seed cosines dict]}}."""
    table: dict = {}
    for problem, normal in (("normal W, ||W|| = 0.9", True), ("non-normal W, rho = 0.99", False)):
        table[problem] = {method: [] for method in METHODS}
        for seed in range(seeds):
            f, system = tanh_problem(seed, normal)
            for method, options in METHODS.items():
                table[problem][method].append(cosines(f, system, options, seed))
    return table


def plot(table: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(table), figsize=(11, 3.6), sharey=True)
    for ax, (problem, methods) in zip(axes, table.items()):
        labels = list(methods) + ["Jacobian-free"]
        for k, direction in enumerate(("prescribed", "random")):
            values = [[r[direction] for r in rows] for rows in methods.values()]
            values.append([r[f"{direction} JF"] for r in next(iter(methods.values()))])
            means = [sum(v) / len(v) for v in values]
            ax.bar([i + 0.4 * k for i in range(len(labels))], means, width=0.4,
                   label=f"{direction} direction")
        ax.set_xticks([i + 0.2 for i in range(len(labels))], labels, rotation=25, ha="right",
                      fontsize=8)
        ax.set_ylim(0.9, 1.001)
        ax.set_title(problem, fontsize=9)
    axes[0].set_ylabel("cosine with exact inverse product")
    axes[0].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/reference/shine")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = run(args.seeds)
    for problem, methods in table.items():
        print(problem)
        for method, rows in methods.items():
            mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
            print(f"  {method:<24} prescribed {mean['prescribed']:.4f}  random "
                  f"{mean['random']:.4f}  (JF {mean['prescribed JF']:.4f} / "
                  f"{mean['random JF']:.4f})  f evals {mean['f_evals']:.1f}")
    (out / "inversion.json").write_text(json.dumps(table, indent=1))
    plot(table, out / "inversion.png")
    print(f"wrote {out / 'inversion.json'} and {out / 'inversion.png'}")


if __name__ == "__main__":
    main()
