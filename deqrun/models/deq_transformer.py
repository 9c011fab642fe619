# ruff: noqa: UP006, UP007, UP035, UP045
"""DEQ-Transformer (Bai et al. 2019): one weight-tied decoder layer solved to its fixed point.

f(z; x, memory) is a Transformer-XL decoder layer: relative-position multi-head self-attention
over [memory, z] with a causal mask, then a position-wise feed-forward block, with layer norm
after (model.norm=post) or before (model.norm=pre) each block. The input injection (a linear map
of the token embeddings to query/key/value space) is added inside the attention. The memory holds
the previous segment's equilibrium states and their injections (detached), carried between calls
and cleared by reset_state(). Tokens come in through an adaptive input embedding and leave
through an adaptive softmax tied to it (cutoffs=[] gives a plain tied softmax).
The model returns the per-token negative log-likelihood of the targets, (batch, length).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from deqrun.core import DEQ, DEQStats, apply_weight_norm, reset_norms
from deqrun.models.base import DEQModel
from deqrun.registry import register_model
from deqrun.tasks.base import ModelSpec

NORMS = ("post", "pre")


@dataclass(frozen=True)
class TransformerSpec:
    """The architecture of a DEQ-Transformer (one preset per size)."""

    d_model: int
    n_head: int
    d_head: int
    d_inner: int
    mem_len: int
    cutoffs: tuple = ()
    div_val: int = 1
    dropout: float = 0.0
    emb_dropout: float = 0.0
    norm: str = "post"
    weight_norm: bool = True
    init_std: float = 0.02
    explicit: bool = False


SIZES = {
    "tiny": TransformerSpec(d_model=128, n_head=4, d_head=32, d_inner=512, mem_len=64,
                            cutoffs=(2000, 8000), div_val=2, dropout=0.1, emb_dropout=0.1),
    "wt103": TransformerSpec(d_model=700, n_head=10, d_head=70, d_inner=48000, mem_len=150,
                             cutoffs=(20000, 40000, 200000), div_val=4, dropout=0.05,
                             emb_dropout=0.0),
}


@dataclass
class DEQTransformerConfig:
    """model=deq_transformer: a size preset; any other field set here overrides the preset."""

    name: str = "deq_transformer"
    size: str = "tiny"
    d_model: Optional[int] = None
    n_head: Optional[int] = None
    d_head: Optional[int] = None
    d_inner: Optional[int] = None
    mem_len: Optional[int] = None
    cutoffs: Optional[List[int]] = None
    div_val: Optional[int] = None
    dropout: Optional[float] = None
    emb_dropout: Optional[float] = None
    norm: str = "post"
    weight_norm: bool = True
    init_std: Optional[float] = None
    explicit: bool = False

    def spec(self) -> TransformerSpec:
        """The preset of `size` with the fields set here."""
        if self.size not in SIZES:
            raise ValueError(f"model.size must be one of {', '.join(SIZES)}, got {self.size!r}")
        overrides = {k: v for k, v in asdict(self).items()
                     if k not in ("name", "size") and v is not None}
        if "cutoffs" in overrides:
            overrides["cutoffs"] = tuple(int(c) for c in overrides["cutoffs"])
        return replace(SIZES[self.size], **overrides)

    def check(self) -> None:
        """Raise ValueError with one line for values out of range."""
        check_spec(self.spec())


def check_spec(spec: TransformerSpec) -> None:
    """Raise ValueError with one line for an inconsistent architecture."""
    if spec.norm not in NORMS:
        raise ValueError(f"model.norm must be one of {', '.join(NORMS)}, got {spec.norm!r}")
    if min(spec.d_model, spec.n_head, spec.d_head, spec.d_inner, spec.div_val) < 1:
        raise ValueError("model.d_model, n_head, d_head, d_inner and div_val must be >= 1")
    if spec.mem_len < 0:
        raise ValueError(f"model.mem_len must be >= 0, got {spec.mem_len}")
    for name in ("dropout", "emb_dropout"):
        if not 0.0 <= getattr(spec, name) < 1.0:
            raise ValueError(f"model.{name} must be in [0, 1), got {getattr(spec, name)}")
    if list(spec.cutoffs) != sorted(set(spec.cutoffs)) or any(c <= 0 for c in spec.cutoffs):
        raise ValueError(f"model.cutoffs must be increasing positive integers, got "
                         f"{list(spec.cutoffs)}")
    if spec.d_model // spec.div_val ** len(spec.cutoffs) < 1:
        raise ValueError("model.div_val is too large: the last cluster would have width 0")


# ---- adaptive input embedding and tied adaptive softmax ------------------------------------------


class AdaptiveIO(nn.Module):
    """Adaptive input embedding and the adaptive softmax that shares its tables (Baevski & Auli).

    Cluster i covers token ids [bounds[i], bounds[i+1]) with width d_model // div_val**i and a
    projection to d_model when the widths differ. The head softmax scores the first cluster's
    tokens and one logit per tail cluster. With no cutoffs it is a plain tied softmax.
    """

    def __init__(self, n_token: int, d_model: int, cutoffs: tuple, div_val: int) -> None:
        super().__init__()
        if cutoffs and cutoffs[-1] >= n_token:
            raise ValueError(f"model.cutoffs {list(cutoffs)} must stay below the vocabulary "
                             f"size {n_token} (set model.cutoffs=[] for a plain softmax)")
        self.d_model, self.bounds = d_model, [0, *cutoffs, n_token]
        widths = [d_model // div_val ** i for i in range(len(self.bounds) - 1)]
        self.tables = nn.ModuleList(nn.Embedding(hi - lo, w) for lo, hi, w
                                    in zip(self.bounds, self.bounds[1:], widths))
        self.projections = nn.ParameterDict({
            str(i): nn.Parameter(torch.randn(d_model, w) * d_model ** -0.5)
            for i, w in enumerate(widths) if w != d_model})
        self.biases = nn.ParameterList(nn.Parameter(torch.zeros(hi - lo))
                                       for lo, hi in zip(self.bounds, self.bounds[1:]))
        n_tail = len(cutoffs)
        self.cluster_weight = nn.Parameter(torch.zeros(n_tail, widths[0]))
        self.cluster_bias = nn.Parameter(torch.zeros(n_tail))
        for table, width in zip(self.tables, widths):
            nn.init.normal_(table.weight, 0.0, width ** -0.5)

    def _project_in(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        key = str(i)
        return hidden @ self.projections[key] if key in self.projections else hidden

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token ids (...) -> embeddings (..., d_model), scaled by sqrt(d_model)."""
        flat = tokens.reshape(-1)
        weight = self.tables[0].weight
        out = weight.new_zeros(flat.numel(), self.d_model)
        for i, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            rows = torch.nonzero((flat >= lo) & (flat < hi)).squeeze(1)
            if rows.numel() == 0:
                continue
            vectors = self.tables[i](flat[rows] - lo)
            if str(i) in self.projections:
                vectors = vectors @ self.projections[str(i)].t()
            out = out.index_copy(0, rows, vectors)
        return out.view(*tokens.shape, self.d_model) * math.sqrt(self.d_model)

    def _logits(self, i: int, hidden: torch.Tensor) -> torch.Tensor:
        return self._project_in(i, hidden) @ self.tables[i].weight.t() + self.biases[i]

    def nll(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of each target, hidden (N, d_model), targets (N,) -> (N,)."""
        head = self._logits(0, hidden)
        if len(self.bounds) > 2:
            tail = self._project_in(0, hidden) @ self.cluster_weight.t() + self.cluster_bias
            head = torch.cat([head, tail], dim=1)
        head_logp = F.log_softmax(_at_least_float(head), dim=1)
        nll = head_logp.new_zeros(targets.shape[0])
        for i, (lo, hi) in enumerate(zip(self.bounds, self.bounds[1:])):
            rows = torch.nonzero((targets >= lo) & (targets < hi)).squeeze(1)
            if rows.numel() == 0:
                continue
            local = (targets[rows] - lo).unsqueeze(1)
            if i == 0:
                logp = head_logp[rows].gather(1, local).squeeze(1)
            else:
                tail_logp = F.log_softmax(_at_least_float(self._logits(i, hidden[rows])), dim=1)
                logp = head_logp[rows, self.bounds[1] + i - 1] + tail_logp.gather(1, local)[:, 0]
            nll = nll.index_copy(0, rows, -logp)
        return nll


def _at_least_float(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits in float32 for the softmax; float32/float64 unchanged."""
    return x.float() if x.element_size() < 4 else x


# ---- the equilibrium layer -----------------------------------------------------------------------


def sinusoid(length: int, d_model: int, like: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embeddings of the distances 0..length-1, (length, d_model)."""
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d_model, 2, device=like.device,
                                            dtype=like.dtype) / d_model)
    angles = torch.arange(length, device=like.device, dtype=like.dtype)[:, None] * inv_freq
    return torch.cat([angles.sin(), angles.cos()], dim=1)[:, :d_model]


@dataclass
class LayerContext:
    """What f closes over in one forward: injection, memory, position embeddings, masks."""

    injection: torch.Tensor            # (B, T, 3 H Dh)
    memory: torch.Tensor               # (B, M, d_model) earlier equilibrium states
    memory_injection: torch.Tensor     # (B, M, 3 H Dh)
    positions: torch.Tensor            # (M + T, d_model) sinusoids of distances
    masks: List[Optional[torch.Tensor]] = field(default_factory=lambda: [None, None])


class RelativeAttention(nn.Module):
    """Transformer-XL multi-head attention with relative positions and global biases u, v."""

    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.n_head, self.d_head = spec.n_head, spec.d_head
        width = spec.n_head * spec.d_head
        self.qkv_net = nn.Linear(spec.d_model, 3 * width, bias=False)
        self.r_net = nn.Linear(spec.d_model, width, bias=False)
        self.o_net = nn.Linear(width, spec.d_model, bias=False)
        self.r_w_bias = nn.Parameter(torch.zeros(spec.n_head, spec.d_head))
        self.r_r_bias = nn.Parameter(torch.zeros(spec.n_head, spec.d_head))

    def forward(self, sequence: torch.Tensor, injection: torch.Tensor, positions: torch.Tensor,
                length: int) -> torch.Tensor:
        """sequence (B, M+T, d) = [memory, z] -> attention output for the last T positions."""
        batch, total, _ = sequence.shape
        q, k, v = (self.qkv_net(sequence) + injection).chunk(3, dim=-1)
        q = q[:, total - length:].reshape(batch, length, self.n_head, self.d_head)
        k = k.reshape(batch, total, self.n_head, self.d_head)
        v = v.reshape(batch, total, self.n_head, self.d_head)
        r = self.r_net(positions).reshape(total, self.n_head, self.d_head)
        content = torch.einsum("bihd,bjhd->bhij", q + self.r_w_bias, k)
        by_distance = torch.einsum("bihd,khd->bhik", q + self.r_r_bias, r)
        distance = _distances(length, total, q.device)
        position = by_distance.gather(3, distance.expand(batch, self.n_head, length, total))
        scores = (content + position) / math.sqrt(self.d_head)
        scores = scores.masked_fill(_future(length, total, q.device), float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = torch.einsum("bhij,bjhd->bihd", weights, v).reshape(batch, length, -1)
        return self.o_net(out)


def _distances(length: int, total: int, device: torch.device) -> torch.Tensor:
    """(1, 1, T, M+T) distance (M + i) - j of query i to key j, clamped at 0 (future keys)."""
    query = torch.arange(length, device=device)[:, None] + (total - length)
    return (query - torch.arange(total, device=device)[None, :]).clamp_min(0)[None, None]


def _future(length: int, total: int, device: torch.device) -> torch.Tensor:
    """(T, M+T) True where key j lies after query i: the causal mask."""
    query = torch.arange(length, device=device)[:, None] + (total - length)
    return torch.arange(total, device=device)[None, :] > query


class DecoderLayer(nn.Module):
    """f(z; context): attention block then feed-forward block, post- or pre-layer-norm.

    post: h = LN(z + attn(z)), f = LN(h + ff(h)). pre: h = z + attn(LN z), f = LN(h + ff(LN h)):
    the pre-LN blocks end in a final layer norm, as pre-LN stacks do; without it f = z + g(z)
    has no bounded fixed point in general (only roots of g, along which z may grow freely).
    """

    def __init__(self, spec: TransformerSpec) -> None:
        super().__init__()
        self.pre_norm = spec.norm == "pre"
        self.attention = RelativeAttention(spec)
        self.ff1 = nn.Linear(spec.d_model, spec.d_inner)
        self.ff2 = nn.Linear(spec.d_inner, spec.d_model)
        self.norm1 = nn.LayerNorm(spec.d_model)
        self.norm2 = nn.LayerNorm(spec.d_model)
        self.norm3 = nn.LayerNorm(spec.d_model) if self.pre_norm else None

    def forward(self, z: torch.Tensor, context: LayerContext) -> torch.Tensor:
        sequence = torch.cat([context.memory, z], dim=1)
        injection = torch.cat([context.memory_injection, context.injection], dim=1)
        if self.pre_norm:
            attended = self.attention(self.norm1(sequence), injection, context.positions,
                                      z.shape[1])
            h = z + _masked(attended, context.masks[0])
            return self.norm3(h + _masked(self._feed_forward(self.norm2(h)), context.masks[1]))
        attended = self.attention(sequence, injection, context.positions,
                                      z.shape[1])
        h = self.norm1(z + _masked(attended, context.masks[0]))
        return self.norm2(h + _masked(self._feed_forward(h), context.masks[1]))

    def _feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.ff2(F.relu(self.ff1(h)))


def _masked(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    return x if mask is None else x * mask


# ---- the model -----------------------------------------------------------------------------------


class DEQTransformer(DEQModel):
    """Language model: `nll, stats = model((tokens, targets))`, tokens/targets (B, T) int64.

    nll is the per-token negative log-likelihood (B, T). With spec.explicit the layer is not
    solved but applied deq.pretrain_depth times from zero in training and evaluation: a
    weight-tied explicit transformer with the same parameters (the LM table's explicit row).
    Weight norm on f's linear maps is recomputed once per forward; one variational-dropout mask
    per sequence and block is drawn per forward (training only) and shared by every iteration.
    """

    def __init__(self, spec: TransformerSpec, deq: DEQ, *, vocab_size: int) -> None:
        super().__init__()
        check_spec(spec)
        self.spec, self.deq = spec, deq
        self.io = AdaptiveIO(vocab_size, spec.d_model, spec.cutoffs, spec.div_val)
        self.inject = nn.Linear(spec.d_model, 3 * spec.n_head * spec.d_head)
        self.layer = DecoderLayer(spec)
        for module in (self.inject, self.layer):
            _init_linears(module, spec.init_std)
        if spec.weight_norm:
            apply_weight_norm(self.layer)
        self.memory: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def reset_state(self) -> None:
        """Forget the carried memory (start of an epoch or an evaluation)."""
        self.memory = None

    def implicit_parameters(self) -> list[nn.Parameter]:
        """Parameters whose gradient passes through the fixed point (all but the softmax head's)."""
        head = {id(p) for p in (*self.io.biases, self.io.cluster_weight, self.io.cluster_bias)}
        return [p for p in self.parameters() if id(p) not in head]

    def context(self, tokens: torch.Tensor) -> LayerContext:
        """Injection, memory, positions and dropout masks for one segment."""
        embedded = F.dropout(self.io.embed(tokens), self.spec.emb_dropout, self.training)
        injection = self.inject(embedded)
        memory, memory_injection = self._memory_for(tokens.shape[0], injection)
        positions = sinusoid(memory.shape[1] + tokens.shape[1], self.spec.d_model, embedded)
        return LayerContext(injection, memory, memory_injection, positions,
                            self.dropout_masks(embedded))

    def _memory_for(self, batch: int, injection: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self.memory is None or self.memory[0].shape[0] != batch:
            empty = injection.new_zeros(batch, 0, self.spec.d_model)
            return empty, injection.new_zeros(batch, 0, injection.shape[2])
        return tuple(m.to(injection.dtype) for m in self.memory)

    def dropout_masks(self, like: torch.Tensor) -> list[Optional[torch.Tensor]]:
        """One (B, 1, d_model) mask per block, scaled by 1/keep; None when dropout is off."""
        if not self.training or self.spec.dropout == 0:
            return [None, None]
        keep = 1.0 - self.spec.dropout
        shape = (like.shape[0], 1, like.shape[2])
        return [like.new_empty(shape).bernoulli_(keep) / keep for _ in range(2)]

    def equilibrium(self, tokens: torch.Tensor, pretrain: bool = False,
                    ) -> tuple[torch.Tensor, DEQStats, LayerContext]:
        """The segment's fixed point z* (B, T, d_model), its stats and the context it used."""
        context = self.context(tokens)
        reset_norms(self.layer)

        def f(z: torch.Tensor) -> torch.Tensor:
            return self.layer(z, context)

        z0 = context.injection.new_zeros(*tokens.shape, self.spec.d_model)
        z_star, stats = self.deq(f, z0, pretrain=pretrain)
        return z_star, stats, context

    def remember(self, z_star: torch.Tensor, context: LayerContext) -> None:
        """Keep the last mem_len states and injections (detached) for the next segment."""
        keep = self.spec.mem_len
        if keep == 0:
            self.memory = None
            return
        states = torch.cat([context.memory, z_star.detach()], dim=1)[:, -keep:]
        injections = torch.cat([context.memory_injection, context.injection.detach()], dim=1)
        self.memory = (states.detach(), injections[:, -keep:].detach())

    def head(self, z_star: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-token NLL (B, T) of the targets given the equilibrium states."""
        hidden = F.dropout(z_star, self.spec.dropout, self.training)
        nll = self.io.nll(hidden.reshape(-1, self.spec.d_model), targets.reshape(-1))
        return nll.view(targets.shape)

    def forward(self, inputs: Any, pretrain: bool = False) -> tuple[torch.Tensor, DEQStats]:
        tokens, targets = inputs
        z_star, stats, context = self.equilibrium(tokens, pretrain or self.spec.explicit)
        self.remember(z_star, context)
        return self.head(z_star, targets), stats


def _init_linears(module: nn.Module, std: float) -> None:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, std)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (tied tables counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@register_model("deq_transformer", schema=DEQTransformerConfig, tasks=("language_model",),
                description="DEQ-Transformer: one Transformer-XL decoder layer at equilibrium")
def build_deq_transformer(options: DEQTransformerConfig, deq: DEQ,
                          spec: ModelSpec) -> DEQTransformer:
    """A DEQ-Transformer for the task's vocabulary (spec.extra['vocab_size'])."""
    vocab_size = spec.get("vocab_size")
    if not vocab_size:
        raise ValueError("model=deq_transformer needs a task with a vocabulary (vocab_size)")
    return DEQTransformer(options.spec(), deq, vocab_size=int(vocab_size))
