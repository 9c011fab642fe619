"""Data-parallel helpers: a 2-process gloo job equals a 1-process run with the same global batch."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import TensorDataset

from deqrun.core import DEQ
from deqrun.errors import ConfigError
from deqrun.models.base import DEQModel
from deqrun.runner.distributed import (
    DistributedContext,
    barrier,
    broadcast,
    discover,
    first_host,
    gather_values,
    max_over_ranks,
    per_rank_batch,
    rank_device,
    reduce_sums,
    setup_distributed,
    shard_batches,
    shard_eval_batches,
    stop_together,
    teardown_distributed,
    unwrap,
    wrap_model,
)
from deqrun.tasks.base import DatasetTask, LoaderOptions, ModelSpec

GLOBAL_BATCH, EPOCHS, SEED = 8, 2, 3


class TinyDEQ(DEQModel):
    """z = tanh(W z + U x + b), logits = head(z), float64."""

    def __init__(self, features: int = 6, width: int = 10, classes: int = 3) -> None:
        super().__init__()
        self.deq = DEQ(solver="anderson", grad="implicit", f_max_iter=100, f_tol=1e-12,
                       stop_mode="abs", b_max_iter=100, b_tol=1e-12)
        self.inject = nn.Linear(features, width)
        self.W = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.W.weight.mul_(0.5 / torch.linalg.matrix_norm(self.W.weight, 2))
        self.head = nn.Linear(width, classes)

    def forward(self, inputs, pretrain: bool = False):
        u = self.inject(inputs)
        z, stats = self.deq(lambda z: torch.tanh(self.W(z) + u), torch.zeros_like(u), pretrain)
        return self.head(z), stats


class TinyTask(DatasetTask):
    name = "tiny"

    def model_spec(self) -> ModelSpec:
        return ModelSpec(kind="tiny", in_shape=(6,), out_features=3)

    def model_input(self, batch):
        return batch[0]

    def loss(self, output, batch):
        return nn.functional.cross_entropy(output, batch[1])

    def metric_sums(self, output, batch):
        return {"loss": float(nn.functional.cross_entropy(output, batch[1], reduction="sum")),
                "correct": float((output.argmax(1) == batch[1]).sum()), "samples": len(batch[1])}

    def reduce(self, sums):
        return {"loss": sums["loss"] / sums["samples"],
                "accuracy": sums["correct"] / sums["samples"]}


def tiny_task() -> TinyTask:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 1).long()
    return TinyTask(TensorDataset(x[:32], y[:32]), TensorDataset(x[32:], y[32:]))


def train(rank: int, world: int, port: int, out: str) -> None:
    """Train TinyDEQ for EPOCHS epochs on this rank's shard; rank 0 saves what it saw."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    env = dict(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    ctx = setup_distributed("auto", "cpu", env=env, timeout_s=120)
    task = tiny_task()
    torch.manual_seed(1 + rank)  # DDP must broadcast rank 0's initial weights
    model = wrap_model(TinyDEQ().double(), ctx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sums: dict[str, float] = {}
    for epoch in range(EPOCHS):
        for x, y in shard_batches(task, epoch, LoaderOptions(GLOBAL_BATCH, seed=SEED), ctx):
            output, _ = model(x)
            optimizer.zero_grad()
            task.loss(output, (x, y)).backward()
            optimizer.step()
            for k, v in task.metric_sums(output.detach(), (x, y)).items():
                sums[k] = sums.get(k, 0.0) + v
    evaluated: dict[str, float] = {}
    with torch.no_grad():
        unwrap(model).eval()
        for x, y in shard_eval_batches(task, "test", LoaderOptions(3), ctx):
            for k, v in task.metric_sums(unwrap(model)(x)[0], (x, y)).items():
                evaluated[k] = evaluated.get(k, 0.0) + v
    saved = dict(params=[p.detach().clone() for p in unwrap(model).parameters()],
                 train=reduce_sums(sums, ctx), test=reduce_sums(evaluated, ctx),
                 peak=max_over_ranks(100.0 * (rank + 1), ctx),
                 stop=stop_together(rank == world - 1, ctx), calm=stop_together(False, ctx),
                 told=broadcast({"from": rank}, ctx),
                 gathered=gather_values(torch.arange(rank + 2.0) + 10 * rank, ctx))
    torch.save(saved, Path(out) / f"rank{rank}.pt")
    barrier(ctx)
    teardown_distributed(ctx)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 25 s of CPU, but several minutes of wall time on a loaded 2-core machine
def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    single.mkdir()
    double.mkdir()
    train(0, 1, 0, str(single))
    mp.start_processes(train, args=(2, free_port(), str(double)), nprocs=2, start_method="spawn")
    one = torch.load(single / "rank0.pt")
    ranks = [torch.load(double / f"rank{r}.pt") for r in range(2)]
    moved = [(a - b).abs().max() for a, b in zip(one["params"], TinyDEQ().double().parameters())]
    assert max(moved) > 1e-2  # training changed the weights
    for rank in ranks:
        for a, b in zip(one["params"], rank["params"]):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for key in ("train", "test"):
        assert ranks[0][key].keys() == one[key].keys()
        for name, value in one[key].items():
            assert ranks[0][key][name] == pytest.approx(value, rel=1e-9)
    assert one["train"]["samples"] == 32 * EPOCHS and one["test"]["samples"] == 8
    assert [r["peak"] for r in ranks] == [200.0, 200.0] and one["peak"] == 100.0
    assert [r["stop"] for r in ranks] == [True, True] and not ranks[0]["calm"]
    assert [r["told"] for r in ranks] == [{"from": 0}, {"from": 0}]
    # shards of different lengths (2 and 3 values), in rank order on every rank
    for rank in ranks:
        assert rank["gathered"].tolist() == [0.0, 1.0, 10.0, 11.0, 12.0]
    assert one["gathered"].tolist() == [0.0, 1.0]


def test_averaged_shard_gradients_equal_the_global_batch_gradient():
    """What DDP computes, in one process: the mean of the ranks' gradients on their shards."""
    task, world = tiny_task(), 2
    torch.manual_seed(1)
    single = TinyDEQ().double()
    ranks = [TinyDEQ().double() for _ in range(world)]
    for model in ranks:
        model.load_state_dict(single.state_dict())
    options = LoaderOptions(GLOBAL_BATCH, seed=SEED)
    whole = task.train_batches(1, options)
    shards = [shard_batches(task, 1, options, DistributedContext(rank=r, world_size=world))
              for r in range(world)]
    for (x, y), *parts in zip(whole, *shards):
        single.zero_grad()
        task.loss(single(x)[0], (x, y)).backward()
        for model, (xr, yr) in zip(ranks, parts):
            model.zero_grad()
            task.loss(model(xr)[0], (xr, yr)).backward()
        for p, *rank_params in zip(single.parameters(), *(m.parameters() for m in ranks)):
            averaged = sum(q.grad for q in rank_params) / world
            torch.testing.assert_close(averaged, p.grad, rtol=1e-8, atol=1e-10)


def test_discover_reads_torchrun_then_slurm_then_single():
    torchrun = discover(dict(WORLD_SIZE="4", RANK="2", LOCAL_RANK="2", MASTER_ADDR="h",
                             MASTER_PORT="1234", SLURM_NTASKS="8", SLURM_PROCID="5"))
    assert (torchrun.source, torchrun.rank, torchrun.world_size, torchrun.master_port) == \
        ("torchrun", 2, 4, 1234)
    task = dict(SLURM_NTASKS="8", SLURM_PROCID="5", SLURM_LOCALID="1",
                SLURM_JOB_NODELIST="gpu[07-10]", SLURM_JOB_ID="99")
    assert discover(task).source == "single"  # the batch script itself, not an srun task
    slurm = discover(dict(task, SLURM_STEP_ID="0"))
    assert (slurm.source, slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr) == \
        ("slurm", 5, 8, 1, "gpu07")
    assert 20000 <= slurm.master_port < 60000
    assert discover(dict(SLURM_NTASKS="1")).source == "single"
    assert discover({}).world_size == 1


def test_first_host_of_slurm_node_lists():
    assert first_host("gpu[007-009,012]") == "gpu007"
    assert first_host("a1,b2") == "a1"
    assert first_host("node5") == "node5"
    assert first_host("rack1-n[3,5]") == "rack1-n3"


def test_off_and_single_process_need_no_process_group():
    ctx = setup_distributed("off", "cpu", env=dict(WORLD_SIZE="2", RANK="0"))
    assert ctx == DistributedContext() and ctx.is_main and not ctx.distributed
    assert setup_distributed("auto", "cpu", env={}).world_size == 1
    with pytest.raises(ConfigError, match="auto or off"):
        setup_distributed("on", "cpu", env={})
    assert reduce_sums({"a": 1}, ctx) == {"a": 1.0} and stop_together(True, ctx)
    model = nn.Linear(2, 2)
    assert wrap_model(model, ctx) is model and unwrap(model) is model


def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert rank_device("auto", 3) == torch.device("cuda", 3)
    assert rank_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(ConfigError, match="one task per GPU"):
        rank_device("cuda", 4)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert rank_device("cuda", 3) == torch.device("cuda", 0)


def test_the_global_batch_must_split_evenly():
    assert per_rank_batch(128, DistributedContext(world_size=8)) == 16
    with pytest.raises(ConfigError, match="divisible"):
        per_rank_batch(100, DistributedContext(world_size=8))


def test_shards_together_are_the_one_process_batches():
    task = tiny_task()
    task.train_set = TensorDataset(torch.arange(30))  # samples are their own indices
    options = LoaderOptions(6, seed=SEED)
    for epoch in (0, 5):
        whole = [b[0].tolist() for b in task.train_batches(epoch, options)]
        shards = [[b[0].tolist() for b in shard_batches(task, epoch, options, DistributedContext(
            rank=r, world_size=3))] for r in range(3)]
        assert [sorted(sum((s[i] for s in shards), [])) for i in range(5)] == \
            [sorted(b) for b in whole]


def test_one_process_sees_the_tasks_own_batches_and_skips_without_loading():
    task = tiny_task()
    task.train_set = TensorDataset(torch.arange(30))
    options = LoaderOptions(GLOBAL_BATCH, seed=SEED)
    own = [b[0].tolist() for b in task.train_batches(1, options)]
    ours = shard_batches(task, 1, options, DistributedContext())
    assert [b[0].tolist() for b in ours] == own
    resumed = shard_batches(task, 1, options, DistributedContext(), skip=2)
    assert len(resumed) == len(own) - 2 and [b[0].tolist() for b in resumed] == own[2:]
    assert resumed.sampler.start == 2 * GLOBAL_BATCH  # skipped by index: nothing loaded
    second = shard_batches(task, 1, options, DistributedContext(rank=1, world_size=2), skip=1)
    full = shard_batches(task, 1, options, DistributedContext(rank=1, world_size=2))
    assert [b[0].tolist() for b in second] == [b[0].tolist() for b in full][1:]


class UnshardedStream(TinyTask):
    """A task with its own batching (an override of train_batches) and no sharding."""

    def train_batches(self, epoch, options):
        return [(torch.full((2,), i),) for i in range(5)]


class StreamTask(UnshardedStream):
    """The same with its own sharding."""

    def shard_batches(self, epoch, options, rank, world_size):
        return [(torch.full((options.batch_size,), rank * 10 + i),) for i in range(3)]


def test_tasks_with_their_own_batching_shard_themselves():
    base = tiny_task()
    task = StreamTask(base.train_set, base.test_set)
    options = LoaderOptions(GLOBAL_BATCH, seed=SEED)
    alone = shard_batches(task, 0, options, DistributedContext(), skip=3)
    assert len(alone) == 2 and [int(b[0][0]) for b in alone] == [3, 4]
    ranked = shard_batches(task, 0, options, DistributedContext(rank=1, world_size=2), skip=1)
    assert len(ranked) == 2 and [b[0].tolist() for b in ranked] == [[11] * 4, [12] * 4]
    with pytest.raises(ConfigError, match="trainer.distributed=off"):
        shard_batches(UnshardedStream(base.train_set, base.test_set), 0, options,
                      DistributedContext(rank=1, world_size=2))
