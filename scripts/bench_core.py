"""Benchmark deqrun.core on a conv f of MDEQ-tiny size; side by side with torchdeq when installed.

    python scripts/bench_core.py [--device cuda] [--repeats 5] [--json out.json]

All timings are medians over --repeats runs in this one process; ratios compare methods run
side by side. f: state 24 x 16 x 16, batch 32, conv3x3 to 5x channels, GroupNorm, ReLU, conv3x3
back, + injection, GroupNorm; weight norm on both convs. The solver table is repeated on a 4x
larger state (24 x 32 x 32); overhead = solver time outside f, in percent of the time in f and
in microseconds per step (per f evaluation).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable

import torch
from torch import nn

from deqrun.core import DEQ, SOLVERS, apply_weight_norm, reset_norms
from deqrun.measure import SavedTensorMeter, Timer

GRADS = {
    "implicit": dict(grad="implicit", b_solver="anderson", b_max_iter=40, b_tol=1e-6),
    "upg A(5,0.5)": dict(grad="upg", k=5, lambda_=0.5),
    "npg A(5,0.5)": dict(grad="npg", k=5, lambda_=0.5),
    "jacobian_free": dict(grad="jacobian_free"),
    "shine": dict(grad="shine"),
}


class ConvCell(nn.Module):
    """The benchmark's f(z, x): MDEQ-tiny's residual block without the residual."""

    def __init__(self, channels: int = 24, expansion: int = 5, in_channels: int = 3) -> None:
        super().__init__()
        self.body = nn.ModuleDict({
            "conv1": nn.Conv2d(channels, expansion * channels, 3, padding=1, bias=False),
            "conv2": nn.Conv2d(expansion * channels, channels, 3, padding=1, bias=False),
        })
        apply_weight_norm(self.body)
        self.gn1 = nn.GroupNorm(8, expansion * channels, affine=False)
        self.gn2 = nn.GroupNorm(8, channels, affine=False)
        self.inject = nn.Conv2d(in_channels, channels, 3, padding=1)

    def closure(self, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """Recompute the normalised weights once and return f(z) for input x."""
        reset_norms(self.body)
        injection = self.inject(x)

        def f(z: torch.Tensor) -> torch.Tensor:
            hidden = torch.relu(self.gn1(self.body["conv1"](z)))
            return self.gn2(self.body["conv2"](hidden) + injection)

        return f


def interleaved(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, float]:
    """Median of each run's own measurement (ms), the runs taking turns so drift hits all alike."""
    for run in runs.values():
        run()
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(repeats):
        for label, run in runs.items():
            times[label].append(run())
    return {label: statistics.median(values) for label, values in times.items()}


def timed(fn: Callable[[], object], device: torch.device) -> Callable[[], float]:
    """A run that times fn."""

    def run() -> float:
        with Timer(device) as timer:
            fn()
        return timer.ms

    return run


class Counted:
    """f that counts its calls and the (synchronised) time spent inside them."""

    def __init__(self, f: Callable, device: torch.device) -> None:
        self.f, self.device, self.calls, self.ms = f, device, 0, 0.0

    def __call__(self, z):
        self.calls += 1
        with Timer(self.device) as timer:
            out = self.f(z)
        self.ms += timer.ms
        return out


BARE_CALLS = 10


def solver_rows(f, z0, args, device) -> list[dict]:
    """Our solvers (and torchdeq's anderson/broyden) at one tolerance and budget.

    overhead: solver time outside f over time inside f, in the same solves; vs_bare_f: forward
    time over f-evaluations x the time of one f evaluation called on its own.
    """
    solves = {f"ours {name}": _ours_solver(name, args) for name in SOLVERS}
    solves.update(_torchdeq_solvers(args))
    counters = {label: Counted(f, device) for label in solves}
    runs = {label: timed(lambda s=solve, c=counters[label]: s(c, z0), device)
            for label, solve in solves.items()}
    runs["bare f"] = timed(lambda: [f(z0) for _ in range(BARE_CALLS)], device)
    with torch.no_grad():
        ms = interleaved(runs, args.repeats)
    f_ms = ms.pop("bare f") / BARE_CALLS
    rows = []
    for label, forward_ms in ms.items():
        counter, solves_run = counters[label], args.repeats + 1
        evals, in_f = counter.calls / solves_run, counter.ms / solves_run
        rows.append(dict(solver=label, forward_ms=forward_ms, f_evals=evals,
                         ms_per_f=forward_ms / evals, in_f_ms=in_f,
                         overhead=forward_ms / in_f - 1, vs_bare_f=forward_ms / (evals * f_ms) - 1,
                         overhead_us_per_step=1e3 * (forward_ms - in_f) / evals,
                         bare_f_ms=f_ms, state=tuple(z0.shape)))
    return rows


def _ours_solver(name: str, args) -> Callable:
    options = {"anderson": dict(m=args.m), "broyden": {}, "fixed_point": {}}[name]
    return lambda f, z0: SOLVERS[name](f, z0, max_iter=args.f_max_iter, tol=args.f_tol,
                                       stop_mode="rel", **options)


def _torchdeq_solvers(args) -> dict[str, Callable]:
    try:
        from torchdeq.solver import get_solver
    except ImportError:
        return {}
    def make(name: str, options: dict) -> Callable:
        solver = get_solver(name)
        return lambda f, z0: solver(f, z0, max_iter=args.f_max_iter, tol=args.f_tol,
                                    stop_mode="rel", **options)

    return {"torchdeq anderson": make("anderson", dict(m=args.m)),
            "torchdeq broyden": make("broyden", {})}


def backward_run(cell: ConvCell, x, z0, forward: Callable, device, saved: dict) -> float:
    """One training step's forward (saved bytes recorded) and its timed backward (returned)."""
    cell.zero_grad(set_to_none=True)
    with SavedTensorMeter(exclude=cell.parameters()) as meter:
        z = forward(cell.closure(x), z0)
        loss = (z * torch.linspace(-1, 1, z.numel(), device=device).view_as(z)).sum()
    saved["bytes"] = meter.bytes
    with Timer(device) as timer:
        loss.backward()
    return timer.ms


def ours_forward(args, f_max_iter: int | None = None, **options) -> Callable:
    deq = DEQ(solver="broyden", f_max_iter=f_max_iter or args.f_max_iter, f_tol=args.f_tol,
              stop_mode="rel", **options)
    return lambda f, z0: deq(f, z0)[0]


def torchdeq_forwards(args) -> dict[str, Callable]:
    try:
        from torchdeq import get_deq
    except ImportError:
        return {}
    common = dict(f_solver="broyden", f_max_iter=args.f_max_iter, f_tol=args.f_tol,
                  f_stop_mode="rel", b_solver="anderson", b_max_iter=40, b_tol=1e-6)
    deqs = {"torchdeq implicit": get_deq(ift=True, **common),
            "torchdeq upg A(5,0.5)": get_deq(grad=5, tau=0.5, **common)}
    return {label: (lambda f, z0, d=deq: d(f, z0)[0][-1]) for label, deq in deqs.items()}


def grad_rows(cell, x, z0, args, device) -> list[dict]:
    forwards = {f"ours {label}": ours_forward(args, **options) for label, options in GRADS.items()}
    forwards.update(torchdeq_forwards(args))
    saved = {label: {} for label in forwards}
    runs = {label: (lambda fwd=fwd, s=saved[label]: backward_run(cell, x, z0, fwd, device, s))
            for label, fwd in forwards.items()}
    ms = interleaved(runs, args.repeats)
    base = ms["ours implicit"]
    return [dict(grad=label, backward_ms=value, speedup_vs_implicit=base / value,
                 saved_bytes=saved[label]["bytes"]) for label, value in ms.items()]


def depth_check(cell, x, z0, args, device) -> dict:
    """Bytes saved for backward by implicit with 10 and 40 forward steps (tolerance unreachable)."""
    saved = {}
    for depth in (10, 40):
        deq = DEQ(solver="broyden", f_max_iter=depth, f_tol=1e-12, stop_mode="rel",
                  **GRADS["implicit"])
        record: dict = {}
        backward_run(cell, x, z0, lambda f, z, d=deq: d(f, z)[0], device, record)
        saved[depth] = record["bytes"]
    return saved


def print_ratios(rows: list[dict], label: str, names: tuple, value: str, what: str) -> None:
    """ours/torchdeq ratios of `value` for the named rows that both libraries ran."""
    by_label = {r[label]: r for r in rows}
    for name in names:
        if f"torchdeq {name}" in by_label:
            ratio = by_label[f"ours {name}"][value] / by_label[f"torchdeq {name}"][value]
            print(f"ours/torchdeq {what} time, {name}: {ratio:.2f}x")


def print_solver_table(solvers: list[dict]) -> None:
    """One state size: forward time, f evaluations, overhead outside f (percent and us/step)."""
    print(f"\nstate {solvers[0]['state']}: bare f evaluation {solvers[0]['bare_f_ms']:.2f} ms")
    print(f"{'solver':<20}{'forward ms':>12}{'f evals':>9}{'ms/f-eval':>11}{'in f ms':>9}"
          f"{'overhead':>10}{'us/step':>9}{'vs bare f':>11}")
    for r in solvers:
        print(f"{r['solver']:<20}{r['forward_ms']:>12.1f}{r['f_evals']:>9.1f}"
              f"{r['ms_per_f']:>11.2f}{r['in_f_ms']:>9.1f}{r['overhead']:>10.1%}"
              f"{r['overhead_us_per_step']:>9.0f}{r['vs_bare_f']:>11.1%}")
    print_ratios(solvers, "solver", ("anderson", "broyden"), "forward_ms", "forward")


def print_tables(solvers: list[list[dict]], grads: list[dict], depth: dict) -> None:
    for rows in solvers:
        print_solver_table(rows)
    if not grads:
        return
    print(f"\n{'grad':<26}{'backward ms':>12}{'speed-up vs implicit':>22}{'saved MB':>10}")
    for r in grads:
        print(f"{r['grad']:<26}{r['backward_ms']:>12.1f}{r['speedup_vs_implicit']:>21.1f}x"
              f"{r['saved_bytes'] / 2**20:>10.2f}")
    print_ratios(grads, "grad", ("implicit", "upg A(5,0.5)"), "backward_ms", "backward")
    same = "identical" if depth[10] == depth[40] else "DIFFERENT"
    print(f"\nimplicit saved bytes, f_max_iter 10 vs 40: {depth[10]} vs {depth[40]} ({same})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--f-max-iter", type=int, default=30)
    parser.add_argument("--f-tol", type=float, default=1e-3)
    parser.add_argument("--m", type=int, default=5, help="Anderson history (both libraries)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--base-only", action="store_true", help="skip the 4x larger state")
    parser.add_argument("--solvers-only", action="store_true", help="skip the gradient tables")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cell = ConvCell().to(device)
    solvers = []
    for side in (16, 32)[: 1 if args.base_only else 2]:
        x = torch.randn(32, 3, side, side, device=device)
        z0 = torch.zeros(32, 24, side, side, device=device)
        with torch.no_grad():
            f = cell.closure(x)
        solvers.append(solver_rows(f, z0, args, device))
    x = torch.randn(32, 3, 16, 16, device=device)
    z0 = torch.zeros(32, 24, 16, 16, device=device)
    if args.solvers_only:
        print_tables(solvers, [], {})
        return
    grads = grad_rows(cell, x, z0, args, device)
    depth = depth_check(cell, x, z0, args, device)
    print_tables(solvers, grads, depth)
    if args.json:
        with open(args.json, "w") as out:
            json.dump(dict(solvers=solvers, grads=grads, implicit_saved_bytes=depth), out, indent=1)


if __name__ == "__main__":
    main()
