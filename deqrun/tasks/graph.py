# ruff: noqa: UP006, UP007, UP035, UP045
"""Graph tasks: TU graph classification (10-fold CV), Planetoid and chains node classification,
PPI multi-label node classification.

A batch is a GraphBatch: a torch_geometric Batch (adjacency normalised and lambda_pf attached per
graph by deqrun.data.graphs) and, for node tasks on one big graph, the mask of the nodes that
count. The model sees the Batch; loss and metrics read the mask.

Model selection: tasks with a validation split report, besides the per-epoch metrics,
`test_<metric>_val_selected` (the test value at the epoch of the best validation value, ties
broken by the lower validation loss, then the earlier epoch) and `test_<metric>_max_over_epochs`
(the best test value over all epochs: the protocol of the IGNN and phantom-gradient papers, an
optimistic one since it selects on the test set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch_geometric.data import Batch, Data

from deqrun.data.graphs import NORMALIZATIONS, load_planetoid, load_ppi, load_tu, make_chains
from deqrun.registry import register_task
from deqrun.tasks.base import LoaderOptions, ModelSpec, Task


@dataclass
class GraphBatch:
    """A batch of graphs, and for node tasks the mask of the nodes the loss and metrics use."""

    graph: Batch
    mask: Optional[torch.Tensor] = None

    def to(self, device: torch.device, non_blocking: bool = False) -> GraphBatch:
        mask = None if self.mask is None else self.mask.to(device, non_blocking=non_blocking)
        return GraphBatch(self.graph.to(device, non_blocking=non_blocking), mask)


def selection_metrics(history: list[dict[str, Any]], metric: str, higher: bool = True,
                      ) -> dict[str, Any]:
    """Validation-selected and max-over-epochs test values of `metric` from per-epoch records."""
    rows = [h for h in history if h.get(f"test_{metric}") is not None]
    if not rows:
        return {}
    sign = 1.0 if higher else -1.0
    tests = [sign * h[f"test_{metric}"] for h in rows]
    out = {f"test_{metric}_max_over_epochs": sign * max(tests)}
    valid = [(i, h) for i, h in enumerate(rows) if h.get(f"val_{metric}") is not None]
    if valid:
        def key(item: tuple[int, dict]) -> tuple:
            i, h = item
            return (-sign * h[f"val_{metric}"], h.get("val_loss", 0.0), i)

        i, best = min(valid, key=key)
        out[f"test_{metric}_val_selected"] = best[f"test_{metric}"]
        out[f"val_{metric}_best"] = best[f"val_{metric}"]
        out["epoch_val_selected"] = best.get("epoch", i)
    return out


def _check_normalization(value: str) -> None:
    if value not in NORMALIZATIONS:
        raise ValueError(f"task.normalization must be one of {NORMALIZATIONS}, got {value!r}")


class GraphTask(Task):
    """Shared batching, metrics and selection of the graph tasks."""

    def final_metrics(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        return selection_metrics(history, self.metric, self.higher_is_better)

    def model_input(self, batch: GraphBatch) -> Batch:
        return batch.graph

    def _targets(self, output: torch.Tensor, batch: GraphBatch) -> tuple[torch.Tensor, Any]:
        y = batch.graph.y
        if batch.mask is None:
            return output, y
        return output[batch.mask], y[batch.mask]

    def count(self, batch: GraphBatch) -> dict[str, int]:
        graph = batch.graph
        if batch.mask is not None:
            return {"samples": int(batch.mask.sum()), "nodes": int(graph.num_nodes)}
        return {"samples": int(getattr(graph, "num_graphs", 1)), "nodes": int(graph.num_nodes)}


class ClassificationMixin:
    """Single-label cross-entropy and accuracy."""

    metric = "accuracy"
    higher_is_better = True

    def loss(self, output: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        logits, y = self._targets(output, batch)
        return F.cross_entropy(logits, y)

    def metric_sums(self, output: torch.Tensor, batch: GraphBatch) -> dict[str, float]:
        with torch.no_grad():
            logits, y = self._targets(output, batch)
            loss = F.cross_entropy(logits, y, reduction="sum")
            correct = (logits.argmax(dim=-1) == y).sum()
        return {"loss_sum": float(loss), "correct": float(correct), "count": float(y.numel())}

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        count = max(sums.get("count", 0.0), 1.0)
        return {"loss": sums["loss_sum"] / count, "accuracy": sums["correct"] / count}


# ---- TU graph classification -----------------------------------------------------------------
@dataclass
class TUConfig:
    """task=tu: a TUDataset, stratified k-fold cross-validation."""

    name: str = "tu"
    dataset: str = "COX2"
    root: Optional[str] = None
    download: bool = True
    fold: int = 0
    folds: int = 10
    split_seed: int = 0
    val_fold: bool = True
    use_node_attr: bool = False
    normalization: str = "sym"
    sort_eval_by_size: bool = True
    size_buckets: int = 0

    def check(self) -> None:
        if self.size_buckets < 0:
            raise ValueError(f"task.size_buckets must be >= 0, got {self.size_buckets}")
        if self.folds < 3:
            raise ValueError(f"task.folds must be >= 3, got {self.folds}")
        if not 0 <= self.fold < self.folds:
            raise ValueError(f"task.fold must be in 0..{self.folds - 1}, got {self.fold}")
        _check_normalization(self.normalization)


def fold_indices(labels: np.ndarray, folds: int, fold: int, seed: int, val_fold: bool,
                 ) -> dict[str, np.ndarray]:
    """Stratified k-fold: test = fold `fold`, val = fold `fold + 1` (if val_fold), train = rest."""
    from sklearn.model_selection import StratifiedKFold

    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    parts = [test for _, test in splitter.split(np.zeros(len(labels)), labels)]
    out = {"test": parts[fold]}
    held = {fold}
    if val_fold:
        out["val"] = parts[(fold + 1) % folds]
        held.add((fold + 1) % folds)
    out["train"] = np.sort(np.concatenate([p for i, p in enumerate(parts) if i not in held]))
    return out


class TUTask(ClassificationMixin, GraphTask):
    """Graph classification on a TUDataset: sum-pooled graph logits, cross-entropy, accuracy.

    Training uses the folds other than the test fold (and the validation fold when
    val_fold=true: then 8 of 10 folds train, else 9 as in the paper, with no val split).
    """

    def __init__(self, options: TUConfig) -> None:
        super().__init__()
        options.check()
        self.options, self.name = options, f"tu-{options.dataset}"
        graphs = load_tu(options.root, options.dataset, download=options.download,
                         use_node_attr=options.use_node_attr,
                         normalization=options.normalization)
        labels = np.array([int(g.y) for g in graphs])
        parts = fold_indices(labels, options.folds, options.fold, options.split_seed,
                             options.val_fold)
        self.splits = {k: [graphs[i] for i in v] for k, v in parts.items()}
        self.eval_splits = ("val", "test") if options.val_fold else ("test",)
        self.num_features = int(graphs[0].x.shape[1])
        self.num_classes = int(labels.max()) + 1
        majority = float(np.bincount(labels[parts["test"]]).max() / len(parts["test"]))
        self.notes.append(f"{options.dataset} fold {options.fold}/{options.folds}: "
                          + ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
                          + f" graphs; test majority class {majority:.3f}")

    def model_spec(self) -> ModelSpec:
        return ModelSpec("graph_classification", (self.num_features,), self.num_classes,
                         {"num_features": self.num_features})

    def train_batches(self, epoch: int, options: LoaderOptions) -> list[GraphBatch]:
        """Shuffled batches; with size_buckets=k, each run of k batches' worth of shuffled graphs
        is sorted by size before it is cut (less padding), and the batch order is shuffled."""
        generator = torch.Generator().manual_seed(options.seed * 100_003 + epoch)
        train = self.splits["train"]
        order = torch.randperm(len(train), generator=generator).tolist()
        k, size = self.options.size_buckets, options.batch_size
        if k:
            chunks = [order[i:i + k * size] for i in range(0, len(order), k * size)]
            order = [i for chunk in chunks for i in sorted(chunk, key=lambda j: train[j].num_nodes)]
        batches = _batches([train[i] for i in order], size)
        if k:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator)]
        return batches

    def eval_batches(self, split: str, options: LoaderOptions) -> list[GraphBatch]:
        if split not in self.eval_splits:
            raise KeyError(f"task {self.name} has no evaluation split {split!r}")
        graphs = self.splits[split]
        if self.options.sort_eval_by_size:  # less padding in the per-graph state
            graphs = sorted(graphs, key=lambda g: g.num_nodes)
        return _batches(graphs, options.batch_size)


def _batches(graphs: list[Data], batch_size: int) -> list[GraphBatch]:
    return [GraphBatch(Batch.from_data_list(graphs[i:i + batch_size]))
            for i in range(0, len(graphs), batch_size)]


@register_task("tu", schema=TUConfig, kind="graph_classification",
               description="TUDataset graph classification, stratified k-fold CV")
def build_tu(options: TUConfig) -> TUTask:
    return TUTask(options)


# ---- node classification on one graph ----------------------------------------------------------
class NodeTask(ClassificationMixin, GraphTask):
    """Node classification on one graph with train/val/test node masks.

    Training is full-batch: an epoch is `steps_per_epoch` steps on the whole graph (the batch size
    does not apply), so a few epochs are enough with the runner's defaults.
    """

    eval_splits = ("val", "test")

    def __init__(self, name: str, data: Data, extra: Optional[dict] = None,
                 steps_per_epoch: int = 1) -> None:
        super().__init__()
        self.name, self.data, self.extra = name, data, dict(extra or {})
        self.steps_per_epoch = steps_per_epoch
        self.graph = Batch.from_data_list([data])
        self.num_features = int(data.x.shape[1])
        self.num_classes = int(data.y.max()) + 1
        sizes = {s: int(getattr(data, f"{s}_mask").sum()) for s in ("train", "val", "test")}
        self.notes.append(f"{name}: {data.num_nodes} nodes, {data.num_edges} edges, "
                          + ", ".join(f"{k} {v}" for k, v in sizes.items()) + " labelled nodes")

    def model_spec(self) -> ModelSpec:
        return ModelSpec("node_classification", (self.num_features,), self.num_classes,
                         {"num_features": self.num_features, **self.extra})

    def _split(self, split: str) -> list[GraphBatch]:
        return [GraphBatch(self.graph, getattr(self.data, f"{split}_mask"))]

    def train_batches(self, epoch: int, options: LoaderOptions) -> list[GraphBatch]:
        return self._split("train") * self.steps_per_epoch

    def eval_batches(self, split: str, options: LoaderOptions) -> list[GraphBatch]:
        if split not in self.eval_splits:
            raise KeyError(f"task {self.name} has no evaluation split {split!r}")
        return self._split(split)


@dataclass
class PlanetoidConfig:
    """task=planetoid: Cora, CiteSeer or PubMed with the public split."""

    name: str = "planetoid"
    dataset: str = "Cora"
    root: Optional[str] = None
    download: bool = True
    normalization: str = "sym"
    steps_per_epoch: int = 20

    def check(self) -> None:
        if self.steps_per_epoch < 1:
            raise ValueError(f"task.steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.dataset not in ("Cora", "CiteSeer", "PubMed"):
            raise ValueError(f"task.dataset must be Cora, CiteSeer or PubMed, got {self.dataset!r}")
        _check_normalization(self.normalization)


@register_task("planetoid", schema=PlanetoidConfig, kind="node_classification",
               description="Planetoid citation graphs (public split), node classification")
def build_planetoid(options: PlanetoidConfig) -> NodeTask:
    options.check()
    data = load_planetoid(options.root, options.dataset, download=options.download,
                          normalization=options.normalization)
    return NodeTask(f"planetoid-{options.dataset}", data, steps_per_epoch=options.steps_per_epoch)


@dataclass
class ChainsConfig:
    """task=chains: the IGNN paper's synthetic chains (generated; no data needed)."""

    name: str = "chains"
    length: int = 10
    chains_per_class: int = 20
    num_classes: int = 2
    features: int = 100
    train: int = 20
    val: int = 100
    test: int = 200
    undirected: bool = False
    seed: int = 42
    normalization: str = "sym"
    steps_per_epoch: int = 20

    def check(self) -> None:
        if self.steps_per_epoch < 1:
            raise ValueError(f"task.steps_per_epoch must be >= 1, got {self.steps_per_epoch}")
        if self.length < 2 or self.chains_per_class < 1 or self.num_classes < 2:
            raise ValueError("task.length >= 2, task.chains_per_class >= 1, num_classes >= 2")
        if self.features < self.num_classes:
            raise ValueError(f"task.features must be >= num_classes ({self.num_classes})")
        nodes = self.length * self.chains_per_class * self.num_classes
        if self.train + self.val + self.test > nodes or min(self.train, self.val, self.test) < 1:
            raise ValueError(f"task.train + val + test must be in 3..{nodes} (the node count)")
        _check_normalization(self.normalization)


@register_task("chains", schema=ChainsConfig, kind="node_classification",
               description="synthetic long-range chains (IGNN paper), node classification")
def build_chains(options: ChainsConfig) -> NodeTask:
    options.check()
    data = make_chains(options.length, chains_per_class=options.chains_per_class,
                       num_classes=options.num_classes, features=options.features,
                       train=options.train, val=options.val, test=options.test,
                       undirected=options.undirected, seed=options.seed,
                       normalization=options.normalization)
    return NodeTask(f"chains-{options.length}", data, {"synthetic_chains": True},
                    steps_per_epoch=options.steps_per_epoch)


# ---- PPI: multi-label node classification over many graphs -------------------------------------
@dataclass
class PPIConfig:
    """task=ppi: protein-protein interaction graphs, 121 labels per node, micro-F1."""

    name: str = "ppi"
    root: Optional[str] = None
    download: bool = True
    normalization: str = "sym"
    threshold: float = 0.0

    def check(self) -> None:
        _check_normalization(self.normalization)


class PPITask(GraphTask):
    """Multi-label node classification: BCE with logits, micro-F1 of (logit > threshold)."""

    metric = "micro_f1"
    higher_is_better = True
    eval_splits = ("val", "test")

    def __init__(self, options: PPIConfig) -> None:
        super().__init__()
        options.check()
        self.name, self.threshold = "ppi", options.threshold
        self.splits = load_ppi(options.root, download=options.download,
                               normalization=options.normalization)
        first = self.splits["train"][0]
        self.num_features, self.num_labels = int(first.x.shape[1]), int(first.y.shape[1])
        self.notes.append("PPI: " + ", ".join(f"{k} {len(v)} graphs"
                                              for k, v in self.splits.items()))

    def model_spec(self) -> ModelSpec:
        return ModelSpec("node_classification", (self.num_features,), self.num_labels,
                         {"num_features": self.num_features, "multilabel": True})

    def train_batches(self, epoch: int, options: LoaderOptions) -> list[GraphBatch]:
        generator = torch.Generator().manual_seed(options.seed * 100_003 + epoch)
        order = torch.randperm(len(self.splits["train"]), generator=generator).tolist()
        return _batches([self.splits["train"][i] for i in order], options.batch_size)

    def eval_batches(self, split: str, options: LoaderOptions) -> list[GraphBatch]:
        if split not in self.eval_splits:
            raise KeyError(f"task {self.name} has no evaluation split {split!r}")
        return _batches(self.splits[split], options.batch_size)

    def loss(self, output: torch.Tensor, batch: GraphBatch) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(output, batch.graph.y.to(output.dtype))

    def metric_sums(self, output: torch.Tensor, batch: GraphBatch) -> dict[str, float]:
        with torch.no_grad():
            y = batch.graph.y.to(torch.bool)
            pred = output > self.threshold
            loss = F.binary_cross_entropy_with_logits(output, y.to(output.dtype),
                                                      reduction="sum")
            return {"loss_sum": float(loss), "entries": float(y.numel()),
                    "tp": float((pred & y).sum()), "fp": float((pred & ~y).sum()),
                    "fn": float((~pred & y).sum())}

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        denominator = 2 * sums["tp"] + sums["fp"] + sums["fn"]
        f1 = 2 * sums["tp"] / denominator if denominator > 0 else 0.0
        return {"loss": sums["loss_sum"] / max(sums["entries"], 1.0), "micro_f1": f1}


@register_task("ppi", schema=PPIConfig, kind="node_classification",
               description="PPI multi-label node classification (micro-F1)")
def build_ppi(options: PPIConfig) -> PPITask:
    return PPITask(options)
