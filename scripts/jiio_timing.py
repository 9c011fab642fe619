"""JIIO against an outer optimiser on the latent, timed side by side in one process.

    python scripts/jiio_timing.py --checkpoint GEN.pt --data-root ../shared/data/mnist \
        [--problems recon,inpaint,denoise02,denoise04] [--batch 64] [--out DIR]

For each problem (reconstruction; inpainting of a hidden centre square, 20x20 or NN x NN for
inpaintNN; denoising at sigma 0.2 / 0.4) on the same test images: JIIO (T iterations, each one
f call and one VJP) and Adam on the latent (lr 1, 40 steps, each a full DEQ forward and implicit
backward), both from x = 0. Every iterate's latent
is recorded with its synchronised time stamp; afterwards (untimed) each recorded latent is decoded
with a full forward solve, so every curve shows the true loss / PSNR of the latent found by then.
Reports the quality at x = 0, JIIO's after as many iterations as Adam's steps (the paper's
equal-iteration comparison), both finals, and how much sooner JIIO reaches Adam-40's final quality.
Writes <out>/jiio_timing.json, <out>/jiio_timing.md and <out>/<problem>.png (loss vs time).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deqrun.core import DEQ, JIIO, InputProblem, JIIOOptions
from deqrun.data.generative import build_images
from deqrun.measure import synchronize
from deqrun.models.generator import GeneratorConfig, MDEQGenerator
from deqrun.tasks.generative import image_objective, psnr_sum, squared_error
from deqrun.tasks.inverse import add_noise, centre_mask

PROBLEMS = ("recon", "inpaint", "denoise02", "denoise04")
Path_ = list[tuple[float, torch.Tensor]]


def observation(problem: str, clean: torch.Tensor,
                mask_size: int = 20) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(observed images, mask or None) for a problem name."""
    if problem.startswith("inpaint"):  # inpaint: mask_size; inpaintNN: an NN x NN square
        mask = centre_mask(clean.shape, int(problem[7:] or mask_size)).to(clean)
        return clean * mask, mask
    if problem.startswith("denoise"):
        return add_noise(clean, int(problem[-2:]) / 10, seed=1), None
    return clean, None


def record_jiio(model: MDEQGenerator, problem: InputProblem, device: torch.device) -> Path_:
    """JIIO's latent after every iteration, with its time since the start."""
    path: Path_ = []
    synchronize(device)
    start = time.perf_counter()

    def callback(_: int, x: torch.Tensor) -> None:
        synchronize(device)
        path.append((time.perf_counter() - start, x.detach().clone()))

    model.infer(problem, callback=callback)
    return path


def record_adam(model: MDEQGenerator, problem: InputProblem, device: torch.device,
                steps: int, lr: float) -> Path_:
    """Adam on the latent: each step one DEQ forward solve and one implicit backward."""
    x = problem.x0.clone().requires_grad_()
    optimiser = torch.optim.Adam([x], lr=lr)
    path: Path_ = []
    model.train()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        images, _ = model.decode(x)
        loss = problem.objective(images, x).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        synchronize(device)
        path.append((time.perf_counter() - start, x.detach().clone()))
    model.eval()
    return path


def quality(model: MDEQGenerator, path: Path_, score: Callable[[torch.Tensor], float],
            every: int = 1) -> list[tuple[float, float]]:
    """(time, score of the decoded latent) along a path (untimed evaluation)."""
    points = []
    with torch.no_grad():
        for k, (stamp, x) in enumerate(path):
            if (k + 1) % every == 0 or k == len(path) - 1:
                points.append((stamp, score(model.decode(x)[0])))
    return points


def first_reaching(points: list[tuple[float, float]], target: float, higher: bool) -> float | None:
    """The first time a curve reaches `target` (None if it never does)."""
    for stamp, value in points:
        if (value >= target) if higher else (value <= target):
            return stamp
    return None


def load_generator(args: argparse.Namespace, image_shape: tuple[int, ...],
                   device: torch.device) -> MDEQGenerator:
    deq = DEQ(solver="anderson", grad="implicit", f_max_iter=args.f_max_iter, f_tol=args.f_tol,
              b_max_iter=args.b_max_iter, b_tol=args.b_tol)
    model = MDEQGenerator(GeneratorConfig(size=args.size), deq, image_shape, args.latent_dim)
    model.input_optimiser = JIIO(T=args.T, m=args.m, alpha0=list(args.alpha0),
                                 b_max_iter=args.b_max_iter, b_tol=args.b_tol,
                                 z_init=args.z_init, **jiio_options(args.option))
    state = torch.load(args.checkpoint, map_location=device)
    model.load_state_dict(state.get("model", state) if isinstance(state, dict) else state)
    return model.to(device).eval()


def jiio_options(pairs: list[str]) -> dict[str, Any]:
    """`--option KEY=VALUE` pairs as JIIO option values (VALUE read as JSON, else a string)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in JIIOOptions.names():
            raise SystemExit(f"--option takes KEY=VALUE with KEY a JIIO option "
                             f"({', '.join(JIIOOptions.names())}); got {pair!r}")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def run_problem(model: MDEQGenerator, name: str, clean: torch.Tensor,
                args: argparse.Namespace, device: torch.device) -> dict:
    """Both methods on one problem; returns their curves and the summary numbers."""
    observed, mask = observation(name, clean, args.mask_size)
    higher = name != "recon"

    objective = image_objective(observed, mask, args.latent_weight)

    def score(images: torch.Tensor) -> float:
        if not higher:
            return float(squared_error(images, clean).mean())
        return psnr_sum(squared_error(images, clean)) / len(clean)

    problem = InputProblem(x0=clean.new_zeros(len(clean), args.latent_dim), objective=objective)
    jiio_path = record_jiio(model, problem, device)
    adam_path = record_adam(model, problem, device, args.adam_steps, args.adam_lr)
    curves = {"jiio": quality(model, jiio_path, score, args.every),
              "adam": quality(model, adam_path, score, max(1, args.every // 2))}
    start = quality(model, [(0.0, problem.x0)], score)[0][1]
    row = summarise(name, curves, higher, start)
    if len(jiio_path) >= args.adam_steps:  # the equal-iteration comparison (the paper's 40)
        stamp, value = quality(model, [jiio_path[args.adam_steps - 1]], score)[0]
        row["jiio_at_adam_steps"] = {"iterations": args.adam_steps, "value": value,
                                     "ms": 1e3 * stamp}
    return row


def summarise(name: str, curves: dict, higher: bool, start: float | None = None) -> dict:
    """Final values, and when JIIO first reaches Adam's final. `start`: the score at x0; when
    Adam ends no better than that, reaching its final says nothing (adam_improves false)."""
    jiio_end, adam_end = curves["jiio"][-1], curves["adam"][-1]
    reach = first_reaching(curves["jiio"], adam_end[1], higher)
    improves = None if start is None else \
        bool(adam_end[1] > start if higher else adam_end[1] < start)
    return {"problem": name, "metric": "psnr" if higher else "mse", "curves": curves,
            "start": start, "adam_improves": improves,
            "jiio_final": jiio_end[1], "jiio_ms": 1e3 * jiio_end[0],
            "adam_final": adam_end[1], "adam_ms": 1e3 * adam_end[0],
            "jiio_ms_to_adam_final": None if reach is None else 1e3 * reach,
            "speedup_at_equal_quality": None if reach is None else adam_end[0] / reach}


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    extra = "".join(f", {pair}" for pair in args.option)
    if args.latent_weight:
        extra += f"; objective + {args.latent_weight} mean(x^2)"
    lines = [f"JIIO (T={args.T}, m={args.m}, alpha0={args.alpha0}, z_init={args.z_init}{extra}) "
             f"vs Adam on the latent (lr {args.adam_lr}, {args.adam_steps} steps), "
             f"test images {args.first}-{args.first + args.batch - 1}, one process.",
             "", f"| problem | metric | at x0 | JIIO-{args.adam_steps} (ms) | JIIO final | "
             "JIIO ms | Adam final | Adam ms | JIIO ms to Adam's final | "
             "speed-up at equal quality |",
             "|---" * 10 + "|"]
    for r in rows:
        reach = r["jiio_ms_to_adam_final"]
        reach = "never" if reach is None else f"{reach:.0f}"
        speed = "-" if r["speedup_at_equal_quality"] is None else \
            f"{r['speedup_at_equal_quality']:.1f}x"
        start = "-" if r.get("start") is None else f"{r['start']:.4f}"
        lines.append(f"| {r['problem']} | {r['metric']} | {start} | {at_steps(r)} | "
                     f"{r['jiio_final']:.4f} | "
                     f"{r['jiio_ms']:.0f} | {r['adam_final']:.4f} | {r['adam_ms']:.0f} | "
                     f"{reach} | {speed} |")
    lines += ["", "Paper (MNIST MDEQ, GPU): JIIO 40 iterations 862 ms vs Adam 40 steps 7659 ms."]
    return "\n".join(lines) + "\n"


def at_steps(row: dict) -> str:
    """JIIO's score after as many iterations as Adam took steps, and when ('-' if T was less)."""
    point = row.get("jiio_at_adam_steps")
    return "-" if point is None else f"{point['value']:.4f} ({point['ms']:.0f})"


def plot(row: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(5, 3.5))
    for method, label in (("jiio", "JIIO"), ("adam", "Adam on the latent")):
        times, values = zip(*row["curves"][method])
        axes.plot([1e3 * t for t in times], values, marker=".", label=label)
    axes.set_xlabel("wall-clock time (ms)")
    axes.set_ylabel(row["metric"])
    axes.set_title(row["problem"])
    axes.legend()
    figure.tight_layout()
    figure.savefig(out / f"{row['problem']}.png", dpi=120)
    plt.close(figure)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data-root", default="../shared/data/mnist")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--first", type=int, default=0,
                        help="index of the first test image (probe settings on other images than "
                             "the table's, which uses the first --batch)")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--mask-size", type=int, default=20,
                        help="side of inpainting's hidden centre square (the issue's 20)")
    parser.add_argument("--latent-dim", type=int, default=128)
    parser.add_argument("--latent-weight", type=float, default=0.0,
                        help="both methods minimise the squared error plus this times mean(x^2), "
                             "a Gaussian prior on the latent (task.latent_weight)")
    parser.add_argument("--T", type=int, default=40)
    parser.add_argument("--m", type=int, default=20)
    parser.add_argument("--alpha0", type=float, nargs=2, default=[3.0, 1.0])
    parser.add_argument("--z-init", choices=["zeros", "solve"], default="zeros",
                        help="JIIO's z start: zeros (the paper's) or the equilibrium at x = 0 "
                             "(one forward solve, inside JIIO's timed path)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="any other JIIO option, e.g. --option balance=true "
                             "--option z_damping=1.0 (repeatable)")
    parser.add_argument("--f-max-iter", type=int, default=30)
    parser.add_argument("--f-tol", type=float, default=1e-3)
    parser.add_argument("--b-max-iter", type=int, default=30)
    parser.add_argument("--b-tol", type=float, default=1e-4)
    parser.add_argument("--adam-steps", type=int, default=40)
    parser.add_argument("--adam-lr", type=float, default=1.0)
    parser.add_argument("--every", type=int, default=2, help="decode every k-th JIIO iterate")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="outputs/jiio_timing")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    _, test = build_images(args.dataset, Path(args.data_root), image_size=None, download=False,
                           notes=[])
    clean = test[args.first: args.first + args.batch].to(device)
    if len(clean) < args.batch:
        raise SystemExit(f"jiio_timing: --first {args.first} --batch {args.batch} needs "
                         f"{args.first + args.batch} test images; the test split has {len(test)}")
    model = load_generator(args, tuple(clean.shape[1:]), device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.problems.split(","):
        rows.append(run_problem(model, name, clean, args, device))
        plot(rows[-1], out)
        print(markdown(rows[-1:], args).splitlines()[-3], flush=True)
    (out / "jiio_timing.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (out / "jiio_timing.md").write_text(markdown(rows, args))
    print(markdown(rows, args))


if __name__ == "__main__":
    main()
