"""Data-parallel scaling on CPU through the real runner: N gloo processes x T threads (torchrun)
vs 1 process x N*T threads (and 1 process x T threads), same global batch.

    python scripts/ddp_scaling.py [--world 2] [--threads 1] [--out FILE.md] [overrides ...]

Each set-up is one `deqrun` run of the default experiment (MDEQ-tiny on digits; add Hydra
overrides to change it) with trainer.epochs=1 on the CPU; its metrics.json gives the throughput
over the timed steps (every step after the first: samples of the global batch per second of step
time, forward + backward + update, on rank 0) and the run's wall time. The scaling efficiency is
DDP throughput / single-process throughput with the same total number of threads.
Run it alone on the machine (e.g. under `flock /work/wt/cpu.lock`): the numbers are only as
honest as the machine is idle.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXED = ["trainer.device=cpu", "trainer.epochs=1", "trainer.progress=false", "logger=none"]


def run(world: int, threads: int, overrides: list[str], work: Path) -> dict:
    """One run of `world` processes with `threads` threads each; its final metrics + wall time."""
    name = f"scaling-{world}x{threads}"
    args = [*FIXED, f"trainer.threads={threads}", f"run_name={name}", *overrides]
    if world == 1:
        command = [sys.executable, "-m", "deqrun.cli", "trainer.distributed=off", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={world}", "-m", "deqrun.cli", *args]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                        os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"ddp_scaling: {' '.join(command)} failed ({done.returncode}):\n"
                 f"{done.stderr[-2000:]}")
    final = json.loads((work / "outputs" / "runs" / name / "metrics.json").read_text())["final"]
    return dict(final, wall_s=wall, command=" ".join(command[1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="ddp-scaling-"))
    try:
        total = args.world * args.threads
        rows = [(f"1 process x {total} threads", run(1, total, args.overrides, work)),
                (f"{args.world} gloo processes x {args.threads} thread(s) (torchrun)",
                 run(args.world, args.threads, args.overrides, work))]
        if total != args.threads:
            rows.append((f"1 process x {args.threads} thread(s)",
                          run(1, args.threads, args.overrides, work)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    single, ddp = rows[0][1], rows[1][1]
    lines = ["| set-up | samples/s (total) | samples/s per process | step ms | timed steps "
             "| test accuracy | wall s (incl. start-up, evaluation) |",
             "|---|---|---|---|---|---|---|"]
    for label, final in rows:
        per = final.get("samples_per_s_per_rank", final["samples_per_s"])
        lines.append(f"| {label} | {final['samples_per_s']:.1f} | {per:.1f} | "
                     f"{final['step_ms']:.0f} | {final['timed_steps']} | "
                     f"{final.get('test_accuracy', float('nan')):.3f} | {final['wall_s']:.0f} |")
    efficiency = ddp["samples_per_s"] / single["samples_per_s"]
    lines.append("")
    lines.append(f"Scaling efficiency ({args.world} processes / 1 process, {total} threads "
                 f"in total): {efficiency:.2f}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        command = "python scripts/ddp_scaling.py " + " ".join(sys.argv[1:])
        args.out.write_text(f"# Data-parallel scaling on CPU\n\n`{command}` "
                            f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
                            f"load average at the start: {load:.1f})\n\n{text}\n")


if __name__ == "__main__":
    main()
