"""The Task interface: everything the training loop needs to know about a kind of problem.

A task owns its data and its batching (image mini-batches, BPTT segments, graph mini-batches,
full-batch coordinates), its loss, its metrics and its headline metric. The loop only ever calls
the methods below, so it never names accuracy, perplexity or PSNR.

Metrics are additive: `metric_sums(output, batch)` returns sums over the batch (e.g. the number
correct, the summed loss, the sample count), the loop adds them over an epoch or an evaluation,
and `reduce(sums)` turns them into the reported numbers, among them `loss` and `self.metric`.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from torch.utils.data import DataLoader, Dataset


@dataclass(frozen=True)
class LoaderOptions:
    """How the runner wants batches: size, seed (order = f(seed, epoch)), workers, pinning."""

    batch_size: int
    seed: int = 0
    num_workers: int = 0
    pin_memory: bool = False


@dataclass
class ModelSpec:
    """What a model must know about the task's data; a model reads the fields it needs.

    kind: the task kind (image_classification, language_model, graph, signal, ...);
    in_shape: one input's shape (e.g. (C, H, W)); out_features: classes, or output channels;
    extra: anything else (vocabulary size, feature sizes, coordinate dimension, ...).
    """

    kind: str
    in_shape: tuple[int, ...] = ()
    out_features: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.extra.get(key, default)


class Batches(Sized, Iterable, Protocol):
    """A sized iterable of batches (a DataLoader is one)."""


class Task(ABC):
    """A problem the runner trains on. Subclasses set `name`, `metric` and `higher_is_better`."""

    name: str = "task"
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    eval_splits: tuple[str, ...] = ("test",)
    eval_with_grad: ClassVar[bool] = False  # evaluation needs autograd (e.g. attacks on the input)

    def __init__(self) -> None:
        self.notes: list[str] = []

    # ---- data --------------------------------------------------------------------------------
    @abstractmethod
    def model_spec(self) -> ModelSpec:
        """What the model needs to know (input shape, classes, vocabulary, ...)."""

    @abstractmethod
    def train_batches(self, epoch: int, options: LoaderOptions) -> Batches:
        """The epoch's training batches; the same (options.seed, epoch) gives the same order."""

    @abstractmethod
    def eval_batches(self, split: str, options: LoaderOptions) -> Batches:
        """Batches of an evaluation split (one of eval_splits), in a fixed order."""

    def to_device(self, batch: Any, device: torch.device, non_blocking: bool = False) -> Any:
        """The batch with every tensor moved to `device` (tuples, lists, dicts, dataclasses)."""
        return move_to(batch, device, non_blocking)

    @abstractmethod
    def model_input(self, batch: Any) -> Any:
        """What the model's forward takes from a batch."""

    def count(self, batch: Any) -> dict[str, int]:
        """Units of work in the batch for throughput: at least `samples` (also e.g. `tokens`)."""
        return {"samples": int(len(batch[0]))}

    # ---- objective and metrics ---------------------------------------------------------------
    @abstractmethod
    def loss(self, output: Any, batch: Any) -> torch.Tensor:
        """The training loss (a scalar with a graph)."""

    @abstractmethod
    def metric_sums(self, output: Any, batch: Any) -> dict[str, float]:
        """Additive sums over the batch (no graph), including what `reduce` needs for `loss`."""

    @abstractmethod
    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        """Summed metrics -> reported ones; includes `loss` and `self.metric`."""

    def better(self, a: float, b: float) -> bool:
        """Whether headline value a is better than b."""
        return a > b if self.higher_is_better else a < b

    # ---- whole-run hooks ---------------------------------------------------------------------
    def final_metrics(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """Extra entries for metrics.json `final`; by default the best test value over epochs."""
        key = f"test_{self.metric}"
        values = [h[key] for h in history if h.get(key) is not None]
        if not values:
            return {}
        best = max(values) if self.higher_is_better else min(values)
        return {f"best_{key}": best}

    def artifacts(self, model: torch.nn.Module, run_dir: Path, device: torch.device,
                  ) -> dict[str, Any]:
        """Write pictures or sound of the trained model into run_dir; return metrics about them."""
        return {}


class DatasetTask(Task):
    """A task over a map-style train/test Dataset pair, batched by torch DataLoaders."""

    def __init__(self, train_set: Dataset, test_set: Dataset) -> None:
        super().__init__()
        self.train_set, self.test_set = train_set, test_set

    def split(self, name: str) -> Dataset:
        if name == "test":
            return self.test_set
        raise KeyError(f"task {self.name} has no evaluation split {name!r}")

    def collate(self, samples: list[Any]) -> Any:
        """How samples become a batch (the DataLoader default)."""
        return torch.utils.data.default_collate(samples)

    def train_batches(self, epoch: int, options: LoaderOptions) -> DataLoader:
        generator = torch.Generator().manual_seed(options.seed * 100_003 + epoch)
        return DataLoader(self.train_set, batch_size=options.batch_size, shuffle=True,
                          generator=generator, num_workers=options.num_workers,
                          pin_memory=options.pin_memory, collate_fn=self.collate)

    def eval_batches(self, split: str, options: LoaderOptions) -> DataLoader:
        return DataLoader(self.split(split), batch_size=options.batch_size, shuffle=False,
                          num_workers=options.num_workers, pin_memory=options.pin_memory,
                          collate_fn=self.collate)


def move_to(value: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Recursively move tensors inside tuples, lists, dicts and dataclasses to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, dict):
        return {k: move_to(v, device, non_blocking) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(move_to(v, device, non_blocking) for v in value)
    if hasattr(value, "_fields"):  # namedtuple
        return type(value)(*(move_to(v, device, non_blocking) for v in value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: move_to(getattr(value, f.name), device, non_blocking)
                   for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    if hasattr(value, "to") and callable(value.to):  # e.g. torch_geometric Batch
        return value.to(device, non_blocking=non_blocking)
    return value


def skip(batches: Iterable[Any], count: int) -> Iterator[Any]:
    """The batches after the first `count` (mid-epoch resume)."""
    iterator = iter(batches)
    for _ in range(count):
        next(iterator, None)
    return iterator
