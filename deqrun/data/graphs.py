"""Graph data: adjacency normalisation, Perron-Frobenius roots, and torch_geometric loaders.

Every graph a graph task serves is prepared once, when the data set is loaded: its adjacency is
normalised (edge_index, edge_weight hold A with self-loops added for "sym"/"rw"), and
`lambda_pf` (shape (1,), so a mini-batch holds one value per graph) holds an upper bound of the
Perron-Frobenius root of |A| (the IGNN well-posedness projection reads it; caching it here means
it is computed once per graph, not once per forward).

Read-only local copies (e.g. ../shared/data/TUDataset) are used through a scratch root whose
`<name>/raw` links to the copy, so torch_geometric writes `processed/` into the scratch folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch_geometric.data import Data
from torch_geometric.utils import add_remaining_self_loops, scatter, to_undirected

from deqrun.data.paths import data_root
from deqrun.errors import ConfigError, DataNotFoundError

NORMALIZATIONS = ("sym", "rw", "none")
SCRATCH_ENV = "DEQRUN_GRAPH_SCRATCH"


def default_scratch() -> Path:
    """Where processed copies of read-only data sets go: $DEQRUN_GRAPH_SCRATCH or ~/.cache."""
    return Path(os.environ.get(SCRATCH_ENV, "~/.cache/deqrun/graph_scratch")).expanduser()


def normalize_adjacency(edge_index: torch.Tensor, num_nodes: int,
                        edge_weight: torch.Tensor | None = None, mode: str = "sym",
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """A -> D^-1/2 (A + I) D^-1/2 (sym), D^-1 (A + I) (rw, row-stochastic) or A (none).

    Self-loops are added only where a node has none (weight 1); degrees are row sums.
    """
    if mode not in NORMALIZATIONS:
        raise ConfigError(f"normalization must be one of {NORMALIZATIONS}, got {mode!r}")
    if edge_weight is None:
        edge_weight = torch.ones(edge_index.shape[1], dtype=torch.float32,
                                 device=edge_index.device)
    if mode == "none":
        return edge_index, edge_weight
    edge_index, edge_weight = add_remaining_self_loops(edge_index, edge_weight, 1.0, num_nodes)
    row, col = edge_index
    degree = scatter(edge_weight, row, 0, dim_size=num_nodes, reduce="sum")
    inv = degree.pow(-0.5 if mode == "sym" else -1.0).masked_fill(degree == 0, 0.0)
    if mode == "sym":
        return edge_index, inv[row] * edge_weight * inv[col]
    return edge_index, inv[row] * edge_weight


def perron_root(edge_index: torch.Tensor, edge_weight: torch.Tensor, num_nodes: int,
                batch: torch.Tensor | None = None, num_graphs: int = 1, *,
                max_iter: int = 500, tol: float = 1e-4) -> torch.Tensor:
    """Per-graph upper bound of the Perron-Frobenius root of |A|, within tol of it.

    Power iteration on M = |A| + I (the shift makes bipartite graphs converge) from a positive
    vector x; the Collatz-Wielandt ratios min_i (Mx)_i / x_i <= rho(M) <= max_i (Mx)_i / x_i bound
    the root, so the returned max ratio - 1 is never below lambda_pf (the projection stays safe
    even if the iteration is cut at max_iter). Stops when every graph's bounds are within tol.
    """
    if batch is None:
        batch = torch.zeros(num_nodes, dtype=torch.long, device=edge_index.device)
    weight = edge_weight.abs().to(torch.float64)
    row, col = edge_index
    x = torch.ones(num_nodes, dtype=torch.float64, device=edge_index.device)
    upper = torch.full((num_graphs,), float("inf"), dtype=torch.float64, device=x.device)
    for _ in range(max_iter):
        mx = x + scatter(weight * x[col], row, 0, dim_size=num_nodes, reduce="sum")
        ratio = mx / x
        upper = torch.minimum(upper, scatter(ratio, batch, 0, dim_size=num_graphs, reduce="max"))
        lower = scatter(ratio, batch, 0, dim_size=num_graphs, reduce="min")
        if bool(((upper - lower) <= tol * upper).all()):
            break
        norms = scatter(mx * mx, batch, 0, dim_size=num_graphs, reduce="sum").sqrt()
        x = (mx / norms[batch]).clamp_min(1e-300)
    return (upper - 1.0).clamp_min(0.0).to(torch.float32)


def prepare_graph(data: Data, normalization: str = "sym") -> Data:
    """A copy of `data` with the normalised adjacency and its lambda_pf attached."""
    data = data.clone()
    weight = getattr(data, "edge_weight", None)
    data.edge_index, data.edge_weight = normalize_adjacency(
        data.edge_index, data.num_nodes, weight, normalization)
    data.lambda_pf = perron_root(data.edge_index, data.edge_weight, data.num_nodes)
    return data


def prepare_graphs(graphs: list[Data], normalization: str = "sym") -> list[Data]:
    """prepare_graph for many graphs, with one batched power iteration over all of them."""
    from torch_geometric.data import Batch

    prepared = []
    for data in graphs:
        data = data.clone()
        data.edge_index, data.edge_weight = normalize_adjacency(
            data.edge_index, data.num_nodes, getattr(data, "edge_weight", None), normalization)
        prepared.append(data)
    if not prepared:
        return prepared
    union = Batch.from_data_list(prepared)
    roots = perron_root(union.edge_index, union.edge_weight, union.num_nodes, union.batch,
                        union.num_graphs)
    for data, root in zip(prepared, roots):
        data.lambda_pf = root.reshape(1)
    return prepared


def undirected(data: Data) -> Data:
    """The graph with every edge in both directions."""
    data = data.clone()
    data.edge_index = to_undirected(data.edge_index, num_nodes=data.num_nodes)
    return data


# ---- local copies and scratch roots ----------------------------------------------------------
def _writable(path: Path) -> bool:
    """Writable by this process and by its permission bits (root ignores the bits, so a
    read-only copy would otherwise be written into when running as root)."""
    return os.access(path, os.W_OK) and bool(path.stat().st_mode & 0o222)


def scratch_root(root: Path, name: str, scratch: Path | None = None) -> Path:
    """A root torch_geometric may write into for data set `name` found under root/name/raw.

    If root/name is writable (see _writable) it is used as is; otherwise a scratch folder (keyed
    by the absolute root) gets name/raw as a symlink to the read-only copy; processed/ goes there.
    """
    source = root / name
    if _writable(source):
        return root
    key = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:10]
    target = (scratch or default_scratch()) / f"{root.name}-{key}"
    link = target / name / "raw"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        if link.is_symlink():
            link.unlink()
        link.symlink_to((source / "raw").resolve(), target_is_directory=True)
    return target


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive file lock, so parallel jobs do not process the same data set at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def has_raw(root: Path, name: str, files: tuple[str, ...]) -> bool:
    """Whether root/name/raw holds every file in `files` (names relative to raw/)."""
    raw = root / name / "raw"
    return all((raw / f).is_file() for f in files)


def open_dataset(make: Callable[[Path], Any], root: Path, name: str, files: tuple[str, ...],
                 download: bool, hint: str, scratch: Path | None = None) -> Any:
    """Build a torch_geometric data set from root (via a scratch root if read-only).

    Missing raw files and download=false, or a failed download, raise DataNotFoundError(hint).
    """
    root = Path(root).expanduser()
    if has_raw(root, name, files):
        target = scratch_root(root, name, scratch)
        with _locked(target / f".{name}.lock"):
            return make(target)
    if not download:
        raise DataNotFoundError(f"{name} not found under {root / name / 'raw'}: {hint}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".{name}.lock"):
            return make(root)
    except (OSError, RuntimeError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataNotFoundError(f"{name}: download failed ({reason}); {hint}") from None


# ---- data sets -------------------------------------------------------------------------------
def _with_degree_features(graphs: list[Data]) -> list[Data]:
    """Graphs without node features get their degree as the one feature (as the reference)."""
    out = []
    for data in graphs:
        if data.x is None:
            data = data.clone()
            ones = torch.ones(data.edge_index.shape[1])
            data.x = scatter(ones, data.edge_index[1], 0, dim_size=data.num_nodes,
                             reduce="sum").unsqueeze(1)
        out.append(data)
    return out


def load_tu(root: str | Path | None, name: str, *, download: bool = True,
            use_node_attr: bool = False, normalization: str = "sym") -> list[Data]:
    """A TUDataset (root/name/raw/name_*.txt) as a list of prepared graphs."""
    from torch_geometric.datasets import TUDataset

    root = data_root(root, "TUDataset")
    files = tuple(f"{name}_{part}.txt" for part in ("A", "graph_indicator", "graph_labels"))
    hint = (f"pass task.root=<folder holding {name}/raw/{name}_A.txt ...> "
            f"(e.g. ../shared/data/TUDataset) or allow task.download=true with network")
    dataset = open_dataset(lambda r: TUDataset(str(r), name, use_node_attr=use_node_attr),
                           root, name, files, download, hint)
    return prepare_graphs(_with_degree_features(list(dataset)), normalization)


def load_planetoid(root: str | Path | None, name: str, *, download: bool = True,
                   normalization: str = "sym") -> Data:
    """Cora / CiteSeer / PubMed with the public split, row-normalised features, prepared."""
    from torch_geometric.datasets import Planetoid
    from torch_geometric.transforms import NormalizeFeatures

    root = data_root(root, "Planetoid")
    parts = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
    files = tuple(f"ind.{name.lower()}.{part}" for part in parts)
    hint = (f"pass task.root=<folder holding {name}/raw/ind.{name.lower()}.*> "
            f"(e.g. ../shared/data/Planetoid) or allow task.download=true with network")
    dataset = open_dataset(lambda r: Planetoid(str(r), name, split="public",
                                               transform=NormalizeFeatures()),
                           root, name, files, download, hint)
    return prepare_graph(dataset[0], normalization)


PPI_SPLITS = {"train": "train", "val": "valid", "test": "test"}


def load_ppi(root: str | Path | None, *, download: bool = True,
             normalization: str = "sym") -> dict[str, list[Data]]:
    """PPI (root/raw/{train,valid,test}_{graph.json,feats.npy,graph_id.npy,labels.npy})."""
    from torch_geometric.datasets import PPI

    root = data_root(root, "PPI")
    files = tuple(f"{split}_{part}" for split in PPI_SPLITS.values()
                  for part in ("graph.json", "feats.npy", "graph_id.npy", "labels.npy"))
    hint = ("pass task.root=<folder holding raw/train_graph.json ...> or allow "
            "task.download=true with network")
    out = {}
    for split in PPI_SPLITS:
        dataset = open_dataset(lambda r, s=split: PPI(str(r / root.name), split=s),
                               root.parent, root.name, files, download, hint)
        out[split] = prepare_graphs(list(dataset), normalization)
    return out


def make_chains(length: int = 10, *, chains_per_class: int = 20, num_classes: int = 2,
                features: int = 100, train: int = 20, val: int = 100, test: int = 200,
                undirected: bool = False, seed: int = 42, normalization: str = "sym") -> Data:
    """The IGNN paper's synthetic chains: only a chain's first node carries its class.

    num_classes x chains_per_class chains of `length` nodes, edges i -> i+1 (both ways if
    undirected); node features are zero except the one-hot class in the first node's first
    num_classes entries; every node is labelled with its chain's class. train/val/test are
    disjoint random node sets of the given sizes (capped by the number of nodes).
    """
    n_chains = num_classes * chains_per_class
    n = n_chains * length
    starts = torch.arange(n_chains) * length
    src = (starts.unsqueeze(1) + torch.arange(length - 1)).reshape(-1)
    edge_index = torch.stack([src, src + 1])
    if undirected:
        edge_index = to_undirected(edge_index, num_nodes=n)
    labels = torch.arange(num_classes).repeat_interleave(chains_per_class)
    x = torch.zeros(n, features)
    x[starts, labels] = 1.0
    y = labels.repeat_interleave(length)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    masks = {}
    start = 0
    for split, size in (("train", train), ("val", val), ("test", test)):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[order[start:start + size]] = True
        masks[split], start = mask, start + size
    data = Data(x=x, edge_index=edge_index, y=y, train_mask=masks["train"],
                val_mask=masks["val"], test_mask=masks["test"])
    return prepare_graph(data, normalization)
