"""Data-parallel scaling on CPU: N gloo processes x T threads vs 1 process x N*T threads.

    python scripts/ddp_scaling.py [--world 2] [--threads 1] [--steps 20] [overrides ...]

Builds the default experiment (or the given Hydra overrides) with the runner's builders, trains
`--steps` steps of the same global batch (trainer.batch_size) once in one process with
world x threads threads and once as `world` gloo ranks with `threads` threads each (sharded with
deqrun.runner.distributed), and prints the throughput of each (samples/s over the timed steps,
after 2 warm-up steps) and the scaling efficiency = DDP throughput / single-process throughput.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WARMUP = 2


def build(overrides: list[str]):
    """The run config of the default experiment with `overrides`, on the CPU."""
    from hydra import compose, initialize_config_dir

    from deqrun.cli import config_dir
    from deqrun.config import register_configs, resolve

    register_configs()
    with initialize_config_dir(version_base="1.3", config_dir=str(config_dir())):
        config, _ = resolve(compose("config", overrides=["trainer.device=cpu", *overrides]))
    return config


def worker(rank: int, world: int, threads: int, steps: int, port: int, overrides: list[str],
           out: dict) -> None:
    """Train `steps` steps as rank `rank` of `world`; rank 0 reports samples/s."""
    from deqrun.runner.build import build_optimizer, build_task_and_model, loader_options
    from deqrun.runner.distributed import (
        reduce_sums,
        setup_distributed,
        shard_batches,
        teardown_distributed,
        wrap_model,
    )

    torch.set_num_threads(threads)
    env = dict(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = setup_distributed("auto", "cpu", env=env)
    config = build(overrides)
    torch.manual_seed(config.trainer.seed)
    task, model = build_task_and_model(config, torch.device("cpu"))
    model = wrap_model(model, ctx)
    optimizer = build_optimizer(config, model)
    batches = shard_batches(task, 0, loader_options(config, torch.device("cpu"), True), ctx)
    samples, start = 0, None
    for index, batch in enumerate(batches):
        if index == WARMUP:
            start, samples = time.perf_counter(), 0
        if index == WARMUP + steps:
            break
        output, _ = model(task.model_input(batch))
        optimizer.zero_grad(set_to_none=True)
        task.loss(output, batch).backward()
        optimizer.step()
        samples += task.count(batch)["samples"]
    seconds = time.perf_counter() - start
    total = reduce_sums({"samples": samples}, ctx)["samples"]
    if ctx.is_main:
        out["samples_per_s"] = total / seconds
        out["per_rank"] = samples / seconds
    teardown_distributed(ctx)


def free_port() -> int:
    """A free local TCP port for the rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(world: int, threads: int, steps: int, overrides: list[str]) -> dict:
    """Throughput of `world` processes with `threads` threads each."""
    with mp.Manager() as manager:
        out = manager.dict()
        mp.start_processes(worker, args=(world, threads, steps, free_port(), overrides, out),
                           nprocs=world, start_method="spawn")
        return dict(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    single = measure(1, args.world * args.threads, args.steps, args.overrides)
    ddp = measure(args.world, args.threads, args.steps, args.overrides)
    print(f"1 process x {args.world * args.threads} threads: "
          f"{single['samples_per_s']:.1f} samples/s")
    print(f"{args.world} gloo processes x {args.threads} thread(s): "
          f"{ddp['samples_per_s']:.1f} samples/s total, {ddp['per_rank']:.1f} per rank")
    efficiency = ddp["samples_per_s"] / single["samples_per_s"]
    print(f"scaling efficiency (DDP / single): {efficiency:.2f}")


if __name__ == "__main__":
    main()
