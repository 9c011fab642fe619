# ruff: noqa: UP006, UP007, UP035, UP045
"""IGNN (Gu et al. 2020): implicit graph layers X = relu(W X A + Omega U A) solved by the DEQ.

Features are rows here (nodes x features), so a layer's fixed point is
    Z = relu(P Z W^T + B),   B = P U Omega^T + U Omega_d^T + b,   P = A^T (sparse, N x N),
which is the paper's X = phi(W X A + Omega U A) transposed (plus a direct injection U Omega_d^T
and a bias, the two further parameters of the reference layer, so that the parameter counts match
the paper's). Well-posedness: before each forward the rows of W are projected onto the l1 ball of
radius kappa / lambda_pf(A), so ||W||_inf lambda_pf(A) <= kappa < 1 and the fixed point exists, is
unique and Picard iteration converges. lambda_pf comes cached with each graph (deqrun.data.graphs);
a batch of graphs uses the largest one (the root of the block-diagonal union).

Per-graph solves: a mini-batch of graphs is one block-diagonal system, but the DEQ's state is
padded into (num_graphs, max_nodes, width) (as torch_geometric.utils.to_dense_batch does), so the
engine's per-sample residuals, stopping test and best iterate are per graph. f gathers the real
nodes, does the sparse product on them (no dense N x N adjacency) and scatters back; padded rows
stay exactly zero and add nothing to a graph's residual. One big graph (node classification) is
a batch of one.

Solver budget: the reference stops Picard iteration when max|X_new - X| < 3e-6 (max-norm over
the whole batch, up to 300 steps). deqrun's stop modes are per-sample L2 norms; with
stop_mode=abs, f_tol=3e-6 the L2 test implies the reference's max-norm one (||g||_inf <= ||g||_2),
per graph, so it is at least as strict (a few more steps, still capped at 300).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.nn import global_add_pool
from torch_geometric.utils import to_dense_batch

from deqrun.core import DEQ, DEQStats
from deqrun.data.graphs import perron_root
from deqrun.errors import ConfigError
from deqrun.models.base import DEQModel
from deqrun.registry import register_model

HEADS = ("auto", "pool_mlp", "linear", "none")


@dataclass(frozen=True)
class IGNNSpec:
    """A resolved IGNN architecture."""

    layers: tuple[int, ...] = (64, 64, 64)
    kappa: float = 0.9
    head: str = "auto"
    mlp_hidden: int = 64
    skip: bool = False
    dropout: float = 0.5
    input_dropout: float = 0.0
    normalize_output: bool = False
    head_bias: bool = True
    direct_injection: bool = True
    bias: bool = True


IGNN_SIZES: dict[str, IGNNSpec] = {
    # CPU smoke runs and tests.
    "tiny": IGNNSpec(layers=(16,), mlp_hidden=16),
    # Graph classification as the reference: 3 implicit layers of 64, sum pooling, MLP 64.
    # COX2 (35 features): 37 634 parameters; PROTEINS (3 features): 33 538.
    "tu": IGNNSpec(),
    # PPI as the reference: implicit layers 4h, 2h, 2h, h (h = 256) and one of width 121 (the
    # classes), each with a linear skip, ELU between layers: 4 656 931 parameters.
    "ppi": IGNNSpec(layers=(1024, 512, 512, 256), kappa=0.98, head="none", skip=True,
                    dropout=0.0),
    # Citation graphs (Cora, CiteSeer, PubMed): one implicit layer of 64 injecting Omega U A
    # only (a direct term would double the largest product, features x Omega; a bias would
    # swamp the small row-normalised features), rows normalised before dropout and a linear head
    # (so the logits do not start tiny: it learns within the runner's default recipe).
    "citation": IGNNSpec(layers=(64,), kappa=0.9, head="linear", dropout=0.5,
                         input_dropout=0.5, direct_injection=False, bias=False,
                         normalize_output=True),
    # The synthetic chains, as the reference: one layer of 16 injecting only Omega U A (no bias,
    # no direct term: nodes without features must start from zero so the far-travelled class
    # signal is not swamped), row-normalised, dropout, linear.
    "chains": IGNNSpec(layers=(16,), kappa=0.9, head="linear", dropout=0.5,
                       normalize_output=True, head_bias=False, direct_injection=False,
                       bias=False),
}


@dataclass
class IGNNConfig:
    """model=ignn options; unset (null) fields take the value of the `size` preset.

    size=auto picks the preset from the task: tu for graph classification, ppi for multi-label
    node classification, chains for the synthetic chains, citation for other node tasks.
    """

    name: str = "ignn"
    size: str = "auto"
    layers: Optional[List[int]] = None
    kappa: Optional[float] = None
    head: Optional[str] = None
    mlp_hidden: Optional[int] = None
    skip: Optional[bool] = None
    dropout: Optional[float] = None
    input_dropout: Optional[float] = None
    normalize_output: Optional[bool] = None
    head_bias: Optional[bool] = None
    direct_injection: Optional[bool] = None
    bias: Optional[bool] = None

    def check(self) -> None:
        if self.size != "auto" and self.size not in IGNN_SIZES:
            raise ValueError(f"model.size must be auto or one of {sorted(IGNN_SIZES)}, "
                             f"got {self.size!r}")
        check_ignn_spec(self.resolve("tu" if self.size == "auto" else None))

    def resolve(self, preset: Optional[str] = None) -> IGNNSpec:
        """The preset (`size`, or `preset` when size=auto) with every non-null field applied."""
        spec = IGNN_SIZES[preset if self.size == "auto" and preset else self.size]
        changes = {f.name: getattr(self, f.name) for f in dataclasses.fields(IGNNSpec)
                   if getattr(self, f.name, None) is not None}
        if "layers" in changes:
            changes["layers"] = tuple(int(w) for w in changes["layers"])
        return dataclasses.replace(spec, **changes)


def preset_for(spec: Any) -> str:
    """The size=auto preset for a task's ModelSpec."""
    if spec.kind == "graph_classification":
        return "tu"
    if spec.get("multilabel"):
        return "ppi"
    return "chains" if spec.get("synthetic_chains") else "citation"


def check_ignn_spec(spec: IGNNSpec) -> None:
    """Raise ValueError (one line) for values out of range."""
    if not spec.layers or min(spec.layers) < 1:
        raise ValueError(f"model.layers must be a non-empty list of widths >= 1, got {spec.layers}")
    if not 0 < spec.kappa < 1:
        raise ValueError(f"model.kappa must be in (0, 1) for a well-posed IGNN, got {spec.kappa}")
    if spec.head not in HEADS:
        raise ValueError(f"model.head must be one of {HEADS}, got {spec.head!r}")
    for name in ("dropout", "input_dropout"):
        if not 0 <= getattr(spec, name) < 1:
            raise ValueError(f"model.{name} must be in [0, 1), got {getattr(spec, name)}")
    if spec.mlp_hidden < 1:
        raise ValueError(f"model.mlp_hidden must be >= 1, got {spec.mlp_hidden}")


def project_rows_l1(W: torch.Tensor, radius: float | torch.Tensor) -> torch.Tensor:
    """Each row of W projected (Euclidean) onto the l1 ball of `radius`; rows inside unchanged.

    Sort-based projection (Duchi et al. 2008): theta solves sum_j max(|w_j| - theta, 0) = radius.
    """
    radius = torch.as_tensor(radius, dtype=W.dtype, device=W.device)
    magnitude = W.abs()
    outside = magnitude.sum(dim=1) > radius
    if not bool(outside.any()):
        return W.clone()
    ranked = magnitude.sort(dim=1, descending=True).values
    excess = ranked.cumsum(dim=1) - radius
    index = torch.arange(1, W.shape[1] + 1, device=W.device, dtype=W.dtype)
    support = (ranked - excess / index > 0).sum(dim=1, keepdim=True)
    theta = excess.gather(1, support - 1) / support.to(W.dtype)
    projected = W.sign() * (magnitude - theta).clamp_min(0.0)
    return torch.where(outside.unsqueeze(1), projected, W)


class ImplicitGraphLayer(nn.Module):
    """One IGNN layer: Z = relu(P Z W^T + P U Omega^T + U Omega_d^T + b) for node rows U."""

    def __init__(self, in_features: int, width: int, kappa: float,
                 direct_injection: bool = True, bias: bool = True) -> None:
        super().__init__()
        self.kappa = kappa
        self.weight = nn.Parameter(torch.empty(width, width))
        self.omega = nn.Parameter(torch.empty(width, in_features))
        self.omega_direct = nn.Parameter(torch.empty(width, in_features)) if direct_injection \
            else None
        self.bias = nn.Parameter(torch.empty(width)) if bias else None
        bound = 1.0 / math.sqrt(width)
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    @property
    def width(self) -> int:
        return self.weight.shape[0]

    @torch.no_grad()
    def project_(self, lambda_pf: float | torch.Tensor) -> None:
        """Make ||W||_inf <= kappa / lambda_pf in place (projected gradient descent)."""
        radius = self.kappa / torch.as_tensor(lambda_pf).clamp_min(1e-12)
        self.weight.copy_(project_rows_l1(self.weight, radius))

    def injection(self, u: torch.Tensor, prop: torch.Tensor) -> torch.Tensor:
        """B = P U Omega^T (+ U Omega_d^T) + b, (nodes, width)."""
        b = torch.sparse.mm(prop, u @ self.omega.T)
        if self.bias is not None:
            b = b + self.bias
        if self.omega_direct is not None:
            b = b + u @ self.omega_direct.T
        return b

    def step(self, z: torch.Tensor, b: torch.Tensor, prop: torch.Tensor) -> torch.Tensor:
        """f(Z) = relu(P Z W^T + B) on node rows."""
        return torch.relu(torch.sparse.mm(prop, z @ self.weight.T) + b)


@dataclass
class Padding:
    """Node rows <-> the padded (num_graphs, max_nodes, width) DEQ state."""

    index: torch.Tensor
    num_graphs: int
    max_nodes: int

    @classmethod
    def of(cls, batch: torch.Tensor, num_graphs: int) -> Padding:
        _, mask = to_dense_batch(batch.new_zeros(batch.shape[0], 1), batch,
                                 batch_size=num_graphs)
        return cls(mask.reshape(-1).nonzero().squeeze(1), num_graphs, mask.shape[1])

    def dense(self, nodes: torch.Tensor) -> torch.Tensor:
        out = nodes.new_zeros(self.num_graphs * self.max_nodes, nodes.shape[1])
        out.index_copy_(0, self.index, nodes)
        return out.view(self.num_graphs, self.max_nodes, nodes.shape[1])

    def nodes(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.reshape(-1, dense.shape[-1]).index_select(0, self.index)

    def zeros(self, width: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_zeros(self.num_graphs, self.max_nodes, width)


@dataclass
class GraphInput:
    """What a layer needs from a (batch of) graph(s), computed once per forward."""

    x: torch.Tensor
    prop: torch.Tensor
    padding: Padding
    batch: torch.Tensor
    lambda_pf: torch.Tensor


def graph_input(graph: Any) -> GraphInput:
    """Sparse propagation matrix P = A^T, padding and lambda_pf of a torch_geometric graph/batch.

    Uses graph.edge_weight (the task's normalised adjacency) and graph.lambda_pf when present;
    without lambda_pf it runs the power iteration here (uncached).
    """
    x = graph.x
    n = x.shape[0]
    batch = graph.batch if getattr(graph, "batch", None) is not None \
        else torch.zeros(n, dtype=torch.long, device=x.device)
    num_graphs = int(getattr(graph, "num_graphs", 1) or 1)
    row, col = graph.edge_index
    weight = getattr(graph, "edge_weight", None)
    weight = torch.ones(row.shape[0], dtype=x.dtype, device=x.device) if weight is None \
        else weight.to(x.dtype)
    prop = torch.sparse_coo_tensor(torch.stack([col, row]), weight, (n, n),
                                   check_invariants=False).coalesce()
    lam = getattr(graph, "lambda_pf", None)
    if lam is None:
        lam = perron_root(graph.edge_index, weight, n, batch, num_graphs)
    with warnings.catch_warnings():  # "CSR support is in beta": CSR products are 3x faster
        warnings.simplefilter("ignore", UserWarning)
        prop = prop.to_sparse_csr()
    return GraphInput(x, prop, Padding.of(batch, num_graphs), batch, lam.max().to(x.dtype))


def _solve_layer(deq: DEQ, layer: ImplicitGraphLayer, u: torch.Tensor, g: GraphInput,
                 pretrain: bool) -> tuple[torch.Tensor, DEQStats]:
    """One implicit layer through the DEQ on the padded per-graph state; node rows out."""
    layer.project_(g.lambda_pf)
    b = layer.injection(u, g.prop)
    pad = g.padding

    def f(z: torch.Tensor) -> torch.Tensor:
        return pad.dense(layer.step(pad.nodes(z), b, g.prop))

    z_star, stats = deq(f, pad.zeros(layer.width, u), pretrain=pretrain)
    return pad.nodes(z_star), stats


def worst_layer(all_stats: list[DEQStats]) -> DEQStats:
    """The stats of the layer with the largest residual (per-graph nstep/residuals are that
    layer's), with the Jacobian penalties of every layer summed into it."""
    worst = max(all_stats, key=lambda s: float(s.residual.max()))
    penalties = [s.jac_loss for s in all_stats if s.jac_loss is not None]
    if penalties:
        worst.jac_loss = torch.stack(penalties).sum()
    return worst


class IGNN(DEQModel):
    """Stacked implicit graph layers and a head (sum pooling + MLP for graphs, linear for nodes).

    forward(graph) takes a torch_geometric Data/Batch (x, edge_index, edge_weight, batch,
    lambda_pf) and returns (logits, stats): one row per graph (graph classification) or per node.
    stats are those of the worst-converged layer (see worst_layer).
    """

    def __init__(self, spec: IGNNSpec, deq: DEQ, in_features: int, out_features: int,
                 graph_level: bool) -> None:
        super().__init__()
        check_ignn_spec(spec)
        self.spec, self.deq, self.graph_level = spec, deq, graph_level
        self.head_kind = ("pool_mlp" if graph_level else "linear") if spec.head == "auto" \
            else spec.head
        widths = list(spec.layers) + ([out_features] if self.head_kind == "none" else [])
        ins = [in_features] + widths[:-1]
        self.layers = nn.ModuleList(
            ImplicitGraphLayer(i, w, spec.kappa, spec.direct_injection, spec.bias)
            for i, w in zip(ins, widths))
        self.skips = nn.ModuleList(nn.Linear(i, w) for i, w in zip(ins, widths)) \
            if spec.skip else None
        self.head = self._head(widths[-1], out_features)

    def _head(self, width: int, out_features: int) -> nn.Module:
        if self.head_kind == "pool_mlp":
            return nn.Sequential(nn.Linear(width, self.spec.mlp_hidden), nn.ReLU(),
                                 nn.Dropout(self.spec.dropout),
                                 nn.Linear(self.spec.mlp_hidden, out_features))
        if self.head_kind == "linear":
            return nn.Sequential(nn.Dropout(self.spec.dropout),
                                 nn.Linear(width, out_features, bias=self.spec.head_bias))
        return nn.Identity()

    def forward(self, inputs: Any, pretrain: bool = False) -> tuple[torch.Tensor, DEQStats]:
        g = graph_input(inputs)
        h = F.dropout(g.x, self.spec.input_dropout, self.training)
        all_stats = []
        for i, layer in enumerate(self.layers):
            z, stats = _solve_layer(self.deq, layer, h, g, pretrain)
            all_stats.append(stats)
            if self.skips is not None:
                z = z + self.skips[i](h)
                z = F.elu(z) if i < len(self.layers) - 1 else z
            h = z
        if self.spec.normalize_output:
            h = F.normalize(h, dim=-1)
        if self.head_kind == "pool_mlp":
            h = global_add_pool(h, g.batch, size=g.padding.num_graphs)
        return self.head(h), worst_layer(all_stats)

    def implicit_parameters(self) -> list[nn.Parameter]:
        """The implicit layers' parameters (their gradients pass through fixed points)."""
        return list(self.layers.parameters())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@register_model("ignn", schema=IGNNConfig, tasks=("graph_classification", "node_classification"),
                description="IGNN (Gu et al. 2020): implicit graph layers, well-posed")
def build_ignn(options: IGNNConfig, deq: DEQ, spec: Any) -> IGNN:
    """The IGNN for the task's ModelSpec (kind graph_classification or node_classification)."""
    options.check()
    if spec.kind not in ("graph_classification", "node_classification"):
        raise ConfigError(f"model=ignn serves graph tasks (graph_classification, "
                          f"node_classification), not {spec.kind!r}")
    in_features = int(spec.get("num_features", spec.in_shape[-1] if spec.in_shape else 0))
    return IGNN(options.resolve(preset_for(spec)), deq, in_features, spec.out_features,
                graph_level=spec.kind == "graph_classification")
