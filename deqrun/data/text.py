"""Word-level corpora (WikiText) through Hugging Face `datasets`: lines -> vocabulary -> token ids.

The standard protocol of the word-level language-modelling literature: every line is split on
white space and ends with `<eos>` (empty lines too), the vocabulary comes from the training split
only (most frequent first, ties in order of first appearance), and words outside it map to `<unk>`.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from deqrun.errors import DataNotFoundError

EOS, UNK = "<eos>", "<unk>"
HUB_CONFIGS = {"wikitext2": "wikitext-2-v1", "wikitext103": "wikitext-103-v1"}
HUB_SPLITS = {"train": "train", "valid": "validation", "test": "test"}
SPLITS = ("train", "valid", "test")


def words_of(lines: Iterable[str]) -> list[str]:
    """The word stream of the lines, each line followed by `<eos>`."""
    words: list[str] = []
    for line in lines:
        words.extend(line.split())
        words.append(EOS)
    return words


@dataclass
class Vocabulary:
    """Words <-> ids; ids sorted by training frequency (so adaptive-softmax cutoffs make sense)."""

    words: list[str]

    def __post_init__(self) -> None:
        self.index = {w: i for i, w in enumerate(self.words)}

    @classmethod
    def from_words(cls, words: list[str]) -> Vocabulary:
        counts = Counter(words)
        for special in (EOS, UNK):
            counts.setdefault(special, 0)
        first = {}
        for position, word in enumerate(words):
            first.setdefault(word, position)
        order = sorted(counts, key=lambda w: (-counts[w], first.get(w, len(words))))
        return cls(order)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, words: list[str]) -> torch.Tensor:
        """Word ids as int64, out-of-vocabulary words as `<unk>`."""
        unk = self.index[UNK]
        return torch.tensor([self.index.get(w, unk) for w in words], dtype=torch.long)


def local_files(root: str | os.PathLike, splits: Iterable[str]) -> dict[str, Path]:
    """root/<split>.txt for each split; DataNotFoundError names the first missing file."""
    folder = Path(root).expanduser()
    paths = {split: folder / f"{split}.txt" for split in splits}
    for split, path in paths.items():
        if not path.is_file():
            hint = " (task.train_split=valid trains on valid.txt)" if split == "train" else ""
            raise DataNotFoundError(f"missing {path}: task.root must hold "
                                    f"{', '.join(p.name for p in paths.values())}{hint}")
    return paths


def load_lines(name: str, root: str | None, splits: Iterable[str],
               cache_dir: str | None = None) -> dict[str, list[str]]:
    """Lines of each split: from root/<split>.txt (HF `text` builder) or the hub's wikitext."""
    try:
        import datasets
    except ImportError as error:  # pragma: no cover - datasets is a dependency
        raise DataNotFoundError(f"task={name} needs the `datasets` package: {error}") from None
    splits = list(splits)
    if root is not None:
        files = {split: str(path) for split, path in local_files(root, splits).items()}
        loaded = datasets.load_dataset("text", data_files=files, cache_dir=cache_dir)
        return {split: list(loaded[split]["text"]) for split in splits}
    if name not in HUB_CONFIGS:
        raise DataNotFoundError(f"task={name}: no hub copy known; give task.root=DIR")
    try:
        loaded = datasets.load_dataset("wikitext", HUB_CONFIGS[name], cache_dir=cache_dir)
    except Exception as error:  # network or cache failures become one line
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataNotFoundError(f"task={name}: cannot load wikitext/{HUB_CONFIGS[name]} from "
                                f"the Hugging Face hub ({first}); offline, give task.root=DIR "
                                f"with train.txt, valid.txt, test.txt") from None
    return {split: list(loaded[HUB_SPLITS[split]]["text"]) for split in splits}


def stream(ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The id sequence cut into batch_size contiguous rows (batch, length); the tail is dropped."""
    length = ids.numel() // batch_size
    if length < 2:
        raise ValueError(f"{ids.numel()} tokens are too few for {batch_size} streams")
    return ids[: length * batch_size].view(batch_size, length)


class Segments:
    """BPTT segments of a (batch, length) stream, in order: (inputs, targets), each (batch, T)."""

    def __init__(self, data: torch.Tensor, tgt_len: int) -> None:
        self.data, self.tgt_len = data, tgt_len

    def __len__(self) -> int:
        return -(-(self.data.shape[1] - 1) // self.tgt_len)

    def __iter__(self):
        for start in range(0, self.data.shape[1] - 1, self.tgt_len):
            end = min(start + self.tgt_len, self.data.shape[1] - 1)
            yield self.data[:, start:end], self.data[:, start + 1: end + 1]
