"""How converged is a trained DEQ's forward solve? Per-sample figures on its test split.

    python scripts/convergence_check.py outputs/runs/NAME [outputs/runs/OTHER ...]

For each run folder (checkpoints/last.pt + metrics.json), solves every test batch with the run's
training-mode budget and tolerance (no graph) and reports: the fraction of samples whose best
residual is under tol, the median number of steps until a sample first gets under tol (the
budget when it never does), the median f evaluations per batch (the batch stops when every
sample is done), and the mean best residual. The logged `nstep` is the index of the best iterate,
which keeps moving after a sample is under tol while the rest of its batch still iterates; the
figures here separate the two. Uses the precision study's load_model and the task's test batches.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from deqrun.runner.build import loader_options
from deqrun.studies.precision.checkpoint import load_model
from deqrun.studies.precision.runfolder import RunFolder


def check(path: Path) -> dict:
    """The convergence figures of one run folder."""
    metrics = json.loads((path / "metrics.json").read_text())
    loaded = load_model(RunFolder(path, metrics, path / "checkpoints" / "last.pt"))
    task, model, config, device = loaded.task, loaded.model, loaded.config, loaded.device
    deq = model.deq
    deq.eval_f_max_iter, deq.eval_f_tol = deq.f_max_iter, deq.f_tol
    model.eval()
    model.reset_state()
    steps, residuals, evals, converged = [], [], [], []
    batches = task.eval_batches("test", loader_options(config, device, train=False))
    with torch.no_grad():
        for batch in batches:
            batch = task.to_device(batch, device)
            _, stats = model(task.model_input(batch))
            result = stats.forward
            steps += result.steps_to_tol.tolist()
            residuals += result.residual.tolist()
            converged += result.converged.tolist()
            evals.append(result.n_f_evals)
    return dict(
        run=path.name,
        budget=deq.f_max_iter,
        tol=deq.f_tol,
        converged=sum(converged) / len(converged),
        median_steps_to_tol=statistics.median(steps),
        median_f_evals=statistics.median(evals),
        mean_residual=sum(residuals) / len(residuals),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(
        f"{'run':<28}{'budget':>7}{'tol':>8}{'under tol':>11}{'steps to tol':>14}"
        f"{'f evals':>9}{'residual':>10}"
    )
    for path in args.runs:
        r = check(path)
        print(
            f"{r['run']:<28}{r['budget']:>7}{r['tol']:>8.0e}{r['converged']:>11.1%}"
            f"{r['median_steps_to_tol']:>14.1f}{r['median_f_evals']:>9.1f}"
            f"{r['mean_residual']:>10.2e}"
        )


if __name__ == "__main__":
    main()
