"""Aggregation of the study's rows: medians per method, trends, quartiles."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from typing import Any

import numpy as np

FOCUS_NORM = 0.9
Key = tuple[str, Any, Any]


def medians(rows: list[dict[str, Any]], **where: Any) -> dict[Key, float]:
    """Median cosine per (method, k, lambda) over the rows matching `where`."""
    groups: dict[Key, list[float]] = {}
    for row in rows:
        if all(row[name] == value for name, value in where.items()):
            groups.setdefault((row["method"], row["k"], row["lambda"]), []).append(row["cosine"])
    return {key: statistics.median(values) for key, values in groups.items()}


def focus_norm(spectral_norms: Iterable[float]) -> float:
    """The grid's spectral norm closest to 0.9 (the acceptance point)."""
    return min(spectral_norms, key=lambda norm: abs(norm - FOCUS_NORM))


def rises(values: list[float], slack: float = 1e-9) -> bool:
    """True when the sequence never drops (up to slack) and ends above where it starts."""
    steady = all(b >= a - slack for a, b in zip(values, values[1:]))
    return steady and len(values) > 1 and values[-1] > values[0]


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """25th, 50th and 75th percentiles."""
    q1, q2, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return float(q1), float(q2), float(q3)


def batch_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The first row of every batch (the batch-level columns are the same in all its rows)."""
    return [next(r for r in rows if r["batch"] == b) for b in sorted({r["batch"] for r in rows})]
