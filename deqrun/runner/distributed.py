"""Data-parallel runs with torch.distributed: set-up, rank discovery, reductions, sharding.

`trainer.distributed=auto` turns distributed training on when the process was started as one of
several: by `torchrun` (WORLD_SIZE > 1, RANK, LOCAL_RANK, MASTER_ADDR/PORT set by torchrun) or by
SLURM through `srun`/submitit (SLURM_NTASKS > 1 with SLURM_PROCID, SLURM_LOCALID and the job's
node list, from which MASTER_ADDR and MASTER_PORT are derived). `off` always runs one process.
The backend is nccl when every rank has a GPU and gloo on CPU; each rank takes the GPU of its
local rank.

Conventions the runner keeps under DDP:
- `trainer.batch_size` is the global batch: each of the N ranks gets batch_size / N samples, so a
  table's recipe means the same thing on 1 or 16 GPUs (batch_size must be divisible by N).
- Metrics are reduced as sums and counts (`reduce_sums`), never as means of means; peak memory is
  the maximum over ranks (`max_over_ranks`); a stop (signal, divergence) on any rank stops all of
  them at the same step (`stop_together`).
- Only rank 0 (`ctx.is_main`) logs, writes metrics.json and saves checkpoints.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Sampler, Subset

from deqrun.errors import ConfigError
from deqrun.tasks.base import Batches, DatasetTask, LoaderOptions, Task
from deqrun.tasks.base import skip as skip_batches

log = logging.getLogger("deqrun")

MODES = ("auto", "off")
PORT_RANGE = (20000, 60000)
SHUFFLE_SEED_STRIDE = 100_003  # DatasetTask seeds epoch e of seed s with s * 100_003 + e


@dataclass(frozen=True)
class LaunchInfo:
    """Where this process sits in a multi-process launch, as read from the environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the run; world_size 1 means not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, writes metrics.json and checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether several processes take part."""
        return self.world_size > 1

    def describe(self) -> dict[str, Any]:
        """What metrics.json records about the launch."""
        return dict(world_size=self.world_size, backend=self.backend, rank_device=str(self.device))


# ---- discovery -----------------------------------------------------------------------------
def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: 'gpu[07-09,12],cpu3' -> 'gpu07'."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match or not match.group(1):
        raise ConfigError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(3)
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def _slurm_port(job_id: str) -> int:
    """A port every task of a job derives alike from the job id (as submitit does)."""
    low, high = PORT_RANGE
    digits = int(re.sub(r"\D", "", job_id) or 0)
    return low + digits % (high - low)


def discover(env: Mapping[str, str] | None = None) -> LaunchInfo:
    """Rank, world size, local rank and rendezvous address from torchrun's or SLURM's variables."""
    env = os.environ if env is None else env
    if int(env.get("WORLD_SIZE", "1")) > 1:
        return LaunchInfo(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                          local_rank=int(env.get("LOCAL_RANK", "0")),
                          master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                          master_port=int(env.get("MASTER_PORT", "29500")), source="torchrun")
    if int(env.get("SLURM_NTASKS", "1")) > 1:
        if "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
            log.warning("SLURM_NTASKS > 1 but this is the batch script, not an srun task: "
                        "running one process (start the tasks with srun or submitit)")
            return LaunchInfo(0, 1, 0, "127.0.0.1", 0, "single")
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ConfigError("SLURM_NTASKS > 1 but neither SLURM_JOB_NODELIST nor "
                              "SLURM_NODELIST is set")
        port = env.get("MASTER_PORT") or _slurm_port(env.get("SLURM_JOB_ID", "0"))
        return LaunchInfo(rank=int(env["SLURM_PROCID"]), world_size=int(env["SLURM_NTASKS"]),
                          local_rank=int(env.get("SLURM_LOCALID", "0")),
                          master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
                          master_port=int(port), source="slurm")
    return LaunchInfo(0, 1, 0, "127.0.0.1", 0, "single")


def slurm_task_environment(nodes: int, tasks_per_node: int, node: int, local: int,
                           job_id: str = "4242", hostnames: list[str] | None = None,
                           ) -> dict[str, str]:
    """The SLURM variables task `local` on node `node` of an srun step sees (block layout)."""
    hostnames = hostnames or [f"node{i:02d}" for i in range(1, nodes + 1)]
    if len(hostnames) != nodes:
        raise ValueError(f"{len(hostnames)} host names for {nodes} nodes")
    return dict(SLURM_JOB_ID=job_id, SLURM_NTASKS=str(nodes * tasks_per_node),
                SLURM_NTASKS_PER_NODE=str(tasks_per_node), SLURM_JOB_NUM_NODES=str(nodes),
                SLURM_NNODES=str(nodes), SLURM_NODEID=str(node),
                SLURM_PROCID=str(node * tasks_per_node + local), SLURM_LOCALID=str(local),
                SLURM_JOB_NODELIST=",".join(hostnames), SLURM_NODELIST=",".join(hostnames),
                SLURMD_NODENAME=hostnames[node], SLURM_STEP_ID="0")


# ---- set-up and tear-down -------------------------------------------------------------------
def rank_device(requested: str, local_rank: int) -> torch.device:
    """The device of one rank: the GPU of its local rank (the only one when SLURM binds one GPU
    per task), or the CPU."""
    if requested == "cpu" or requested.startswith("mps"):
        return torch.device(requested)
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if count == 1:  # SLURM bound one GPU to this task (CUDA_VISIBLE_DEVICES)
            return torch.device("cuda", 0)
        if local_rank >= count:
            raise ConfigError(f"local rank {local_rank} but only {count} GPU(s) visible: one "
                              "task per GPU (tasks_per_node = gpus_per_node)")
        return torch.device("cuda", local_rank)
    if requested.startswith("cuda"):
        raise ConfigError(f"trainer.device={requested} but CUDA is not available on this rank")
    return torch.device("cpu")


def setup_distributed(mode: str, device: str, env: Mapping[str, str] | None = None,
                      timeout_s: float = 1800.0) -> DistributedContext:
    """Join the process group when `mode` is auto and the launch has several processes."""
    if mode not in MODES:
        raise ConfigError(f"trainer.distributed must be auto or off, got {mode!r}")
    info = discover(env)
    if mode == "off" or info.world_size == 1:
        return DistributedContext()
    chosen = rank_device(device, info.local_rank)
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if not dist.is_initialized():
        os.environ.update(MASTER_ADDR=info.master_addr, MASTER_PORT=str(info.master_port),
                          RANK=str(info.rank), WORLD_SIZE=str(info.world_size),
                          LOCAL_RANK=str(info.local_rank))
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))
    log.info("distributed (%s): rank %d of %d, local rank %d, %s, %s", info.source, info.rank,
             info.world_size, info.local_rank, backend, chosen)
    return DistributedContext(info.rank, info.world_size, info.local_rank, chosen, backend)


def teardown_distributed(ctx: DistributedContext, wait: bool = True) -> None:
    """Leave the process group (after a barrier, so no rank exits while others still reduce;
    `wait=False` after an error, when the other ranks may never reach the barrier)."""
    if ctx.distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistributedContext,
               find_unused_parameters: bool = False) -> nn.Module:
    """The model in DistributedDataParallel on a multi-process run, else unchanged.

    The DEQModel stays reachable as `.module` (implicit_parameters, reset_state, deq).
    """
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                               find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---- reductions ----------------------------------------------------------------------------
def _keys(sums: Mapping[str, float], ctx: DistributedContext) -> list[str]:
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, sorted(sums))
    return sorted(set().union(*gathered))


def reduce_sums(sums: Mapping[str, Any], ctx: DistributedContext) -> dict[str, float]:
    """Add additive metric sums (and counts) over ranks; a key missing on a rank counts 0."""
    if not ctx.distributed:
        return {k: float(v) for k, v in sums.items()}
    keys = _keys(sums, ctx)
    packed = torch.tensor([float(sums.get(k, 0.0)) for k in keys], dtype=torch.float64,
                          device=ctx.device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return dict(zip(keys, packed.tolist()))


def sum_values(values: list[float], ctx: DistributedContext) -> list[float]:
    """Add a list of numbers over ranks, element by element (every rank passes the same length:
    one all-reduce, for the per-step sums)."""
    if not ctx.distributed:
        return [float(v) for v in values]
    packed = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM)
    return packed.tolist()


def gather(value: Any, ctx: DistributedContext) -> list[Any]:
    """Every rank's `value` (picklable), in rank order."""
    if not ctx.distributed:
        return [value]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def gather_values(values: torch.Tensor, ctx: DistributedContext) -> torch.Tensor:
    """Every rank's 1-D `values` concatenated in rank order, on every rank (on the CPU, float64);
    the shards may differ in length (e.g. per-sample solver steps, for a median over all)."""
    local = values.detach().reshape(-1).to(torch.float64)
    if not ctx.distributed:
        return local.cpu()
    local = local.to(ctx.device)
    size = torch.tensor([local.numel()], dtype=torch.long, device=ctx.device)
    sizes = [torch.zeros_like(size) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    padded = local.new_zeros(max(counts))
    padded[: local.numel()] = local
    parts = [torch.zeros_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]).cpu()


def max_over_ranks(value: float, ctx: DistributedContext) -> float:
    """The largest of every rank's `value` (e.g. peak memory)."""
    if not ctx.distributed:
        return float(value)
    packed = torch.tensor([float(value)], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(packed, op=dist.ReduceOp.MAX)
    return float(packed.item())


def stop_together(stop: bool, ctx: DistributedContext) -> bool:
    """True on every rank when any rank wants to stop (signal, divergence, preemption)."""
    return max_over_ranks(1.0 if stop else 0.0, ctx) > 0


def broadcast(value: Any, ctx: DistributedContext, src: int = 0) -> Any:
    """Rank `src`'s `value` (any picklable object) on every rank."""
    if not ctx.distributed:
        return value
    box = [value if ctx.rank == src else None]
    dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def barrier(ctx: DistributedContext) -> None:
    """Wait for every rank (e.g. until rank 0 has written the checkpoint)."""
    if ctx.distributed:
        dist.barrier()


# ---- sharding ------------------------------------------------------------------------------
class ShardSampler(Sampler[int]):
    """One rank's share of the shuffled order DatasetTask's 1-process loader draws.

    DatasetTask shuffles with a DataLoader whose generator is seeded `seed + epoch`; the loader
    first draws its workers' base seed from that generator, then the permutation. This sampler
    draws the same two numbers, pads the permutation to a multiple of the world size (repeating
    its head, as DistributedSampler does) and keeps positions rank, rank + N, ...: so with a
    per-rank batch of B / N, the N ranks' step-i batches together are the 1-process batch i.
    """

    def __init__(self, size: int, ctx: DistributedContext, seed: int) -> None:
        self.size, self.rank, self.world, self.seed, self.epoch = \
            size, ctx.rank, ctx.world_size, seed, 0
        self.start = 0  # samples of this rank's share to leave out (mid-epoch resume)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose permutation to shard (call before iterating)."""
        self.epoch = epoch

    def global_order(self) -> list[int]:
        """The epoch's order over all ranks, as the 1-process DataLoader yields it."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the loader's base seed
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self):
        order = self.global_order()
        padded = order + order[: (-len(order)) % self.world]
        return iter(padded[self.rank::self.world][self.start:])

    def __len__(self) -> int:
        return max(-(-self.size // self.world) - self.start, 0)


def per_rank_batch(batch_size: int, ctx: DistributedContext) -> int:
    """Each rank's share of the global batch."""
    if batch_size % ctx.world_size:
        raise ConfigError(f"trainer.batch_size={batch_size} is the global batch and must be "
                          f"divisible by the {ctx.world_size} processes")
    return batch_size // ctx.world_size


def _own_order(task: Task) -> bool:
    """Whether the task batches with DatasetTask's own shuffled loader (not an override)."""
    return isinstance(task, DatasetTask) and \
        type(task).train_batches is DatasetTask.train_batches


def shard_batches(task: Task, epoch: int, options: LoaderOptions, ctx: DistributedContext,
                  skip: int = 0) -> Batches:
    """This rank's training batches of `epoch` after its first `skip` ones (options.batch_size
    is the global batch).

    Dataset tasks use a ShardSampler (a DistributedSampler that draws DatasetTask's own
    permutation of (seed, epoch), set per epoch with set_epoch): every rank takes every N-th
    sample, so the N ranks' step-i batches together are exactly the 1-process global batch i,
    and a resumed run sees the same order; skipped batches (mid-epoch resume) are never loaded.
    Other tasks shard themselves through `task.shard_batches(epoch, options, rank, world_size)`
    (streams, graphs, coordinates); in one process they use task.train_batches.
    """
    if _own_order(task):
        local = dataclasses.replace(options, batch_size=per_rank_batch(options.batch_size, ctx))
        sampler = ShardSampler(len(task.train_set), ctx, options.seed * SHUFFLE_SEED_STRIDE)
        sampler.set_epoch(epoch)
        sampler.start = skip * local.batch_size
        # The generator gives the workers the base seed of the 1-process loader (its first draw)
        # and keeps the loader from drawing from the global generator (dropout masks).
        generator = torch.Generator().manual_seed(sampler.seed + epoch)
        return DataLoader(task.train_set, batch_size=local.batch_size, sampler=sampler,
                          num_workers=local.num_workers, pin_memory=local.pin_memory,
                          collate_fn=task.collate, generator=generator,
                          persistent_workers=False)
    if not ctx.distributed:
        return _skipped(task.train_batches(epoch, options), skip)
    own = getattr(task, "shard_batches", None)
    if own is None:
        raise ConfigError(f"task {task.name} has no shard_batches(epoch, options, rank, "
                          "world_size); run it with trainer.distributed=off")
    local = dataclasses.replace(options, batch_size=per_rank_batch(options.batch_size, ctx))
    return _skipped(own(epoch, local, ctx.rank, ctx.world_size), skip)


class _skipped:
    """A sized view of batches without the first `count` (loaded, then dropped)."""

    def __init__(self, batches: Batches, count: int) -> None:
        self.batches, self.count = batches, count

    def __len__(self) -> int:
        return max(len(self.batches) - self.count, 0)

    def __iter__(self):
        return skip_batches(self.batches, self.count)


def shard_eval_batches(task: Task, split: str, options: LoaderOptions,
                       ctx: DistributedContext) -> Batches:
    """This rank's evaluation batches: samples rank, rank + N, ... without padding, so the
    reduced sums count every sample exactly once."""
    if not ctx.distributed:
        return task.eval_batches(split, options)
    own = getattr(task, "shard_eval_batches", None)
    if own is not None:
        return own(split, options, ctx.rank, ctx.world_size)
    if not isinstance(task, DatasetTask):
        return task.eval_batches(split, options) if ctx.is_main else []
    data = task.split(split)
    part = Subset(data, range(ctx.rank, len(data), ctx.world_size))
    return DataLoader(part, batch_size=options.batch_size, shuffle=False,
                      num_workers=options.num_workers, pin_memory=options.pin_memory,
                      collate_fn=task.collate)
