# ruff: noqa: UP006, UP007, UP045
"""Word-level language modelling: contiguous streams cut into BPTT segments, perplexity.

Training and evaluation both read each split as `batch_size` contiguous streams and feed the
segments in order, so a model that carries memory between calls (the runner resets it at every
epoch and evaluation) sees the text it follows. The model's output is the per-token negative
log-likelihood (batch, T); the metrics are perplexity (headline, lower is better) and bits
per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch

from deqrun.data.text import SPLITS, Segments, Vocabulary, load_lines, stream, words_of
from deqrun.registry import register_task
from deqrun.tasks.base import LoaderOptions, ModelSpec, Task

EVAL_NAMES = {"val": "valid", "test": "test"}


@dataclass
class WikiText2Config:
    """task=wikitext2: WikiText-2, word level (hub config wikitext-2-v1, or task.root=DIR)."""

    name: str = "wikitext2"
    root: Optional[str] = None
    train_split: str = "train"
    tgt_len: int = 64
    eval_tgt_len: Optional[int] = None
    cache_dir: Optional[str] = None

    def check(self) -> None:
        """Raise ValueError with one line for values out of range."""
        if self.train_split not in ("train", "valid"):
            raise ValueError(f"task.train_split must be train or valid, got {self.train_split!r}")
        if self.tgt_len < 1 or (self.eval_tgt_len is not None and self.eval_tgt_len < 1):
            raise ValueError("task.tgt_len and task.eval_tgt_len must be >= 1")


@dataclass
class WikiText103Config(WikiText2Config):
    """task=wikitext103: WikiText-103, word level (hub config wikitext-103-v1, or task.root=DIR)."""

    name: str = "wikitext103"
    tgt_len: int = 150


class LanguageModelTask(Task):
    """A word-level corpus: vocabulary from the training split, streams, perplexity."""

    metric: ClassVar[str] = "perplexity"
    higher_is_better: ClassVar[bool] = False

    def __init__(self, options: WikiText2Config) -> None:
        super().__init__()
        options.check()
        self.name, self.options = options.name, options
        self.eval_splits = ("test",) if options.train_split == "valid" else ("val", "test")
        needed = {options.train_split, *(EVAL_NAMES[s] for s in self.eval_splits)}
        lines = load_lines(options.name, options.root, [s for s in SPLITS if s in needed],
                           options.cache_dir)
        train_words = words_of(lines[options.train_split])
        self.vocab = Vocabulary.from_words(train_words)
        self.ids = {options.train_split: self.vocab.encode(train_words)}
        for split in self.eval_splits:
            self.ids[EVAL_NAMES[split]] = self.vocab.encode(words_of(lines[EVAL_NAMES[split]]))
        self.unigram = self.unigram_perplexities()
        self.notes.append(self.describe())

    def describe(self) -> str:
        sizes = ", ".join(f"{s} {t.numel()} tokens" for s, t in self.ids.items())
        baseline = ", ".join(f"{s} {p:.1f}" for s, p in self.unigram.items())
        return (f"{self.name}: trains on {self.options.train_split}; vocabulary {len(self.vocab)} "
                f"words from it; {sizes}; unigram (add-one) perplexity {baseline}")

    def unigram_perplexities(self) -> dict[str, float]:
        """Perplexity of the add-one unigram model of the training split on each eval split."""
        counts = torch.bincount(self.ids[self.options.train_split], minlength=len(self.vocab))
        logp = torch.log((counts.double() + 1) / (counts.sum() + len(self.vocab)))
        return {split: math.exp(-float(logp[self.ids[EVAL_NAMES[split]]].mean()))
                for split in self.eval_splits}

    # ---- data --------------------------------------------------------------------------------
    def model_spec(self) -> ModelSpec:
        return ModelSpec(kind="language_model", in_shape=(self.options.tgt_len,),
                         out_features=len(self.vocab), extra={"vocab_size": len(self.vocab)})

    def train_batches(self, epoch: int, options: LoaderOptions) -> Segments:
        """The training streams in order (the same every epoch: memory needs contiguous text)."""
        data = stream(self.ids[self.options.train_split], options.batch_size)
        return Segments(data, self.options.tgt_len)

    def eval_batches(self, split: str, options: LoaderOptions) -> Segments:
        if split not in self.eval_splits:
            raise KeyError(f"task {self.name} has no evaluation split {split!r}")
        data = stream(self.ids[EVAL_NAMES[split]], options.batch_size)
        return Segments(data, self.options.eval_tgt_len or self.options.tgt_len)

    def model_input(self, batch: Any) -> Any:
        return batch

    def count(self, batch: Any) -> dict[str, int]:
        inputs = batch[0]
        return {"samples": int(inputs.shape[0]), "tokens": int(inputs.numel())}

    # ---- objective and metrics ---------------------------------------------------------------
    def loss(self, output: torch.Tensor, batch: Any) -> torch.Tensor:
        """Mean negative log-likelihood per token (nats)."""
        return output.mean()

    def metric_sums(self, output: torch.Tensor, batch: Any) -> dict[str, float]:
        return {"nll": float(output.detach().sum()), "tokens": float(output.numel())}

    def reduce(self, sums: dict[str, float]) -> dict[str, float]:
        loss = sums["nll"] / max(sums["tokens"], 1.0)
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
                "bits_per_token": loss / math.log(2)}

    def final_metrics(self, history: list[dict[str, Any]]) -> dict[str, Any]:
        """Best test perplexity over epochs and the unigram baselines."""
        final = super().final_metrics(history)
        final.update({f"unigram_{split}_perplexity": value
                      for split, value in self.unigram.items()})
        return final


@register_task("wikitext2", schema=WikiText2Config, kind="language_model",
               description="WikiText-2, word level: perplexity")
@register_task("wikitext103", schema=WikiText103Config, kind="language_model",
               description="WikiText-103, word level: perplexity")
def build_language_task(options: WikiText2Config) -> LanguageModelTask:
    """The word-level corpus task named by options.name."""
    return LanguageModelTask(options)
