"""Part 3: the grad_cosine values logged during training (trainer.precision_every)."""

from __future__ import annotations

import json
from pathlib import Path


def read_records(steps: Path) -> list[dict]:
    """The step records of steps.jsonl; a torn line (a run killed mid-write) is skipped."""
    records = []
    for line in steps.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def read_grad_cosines(steps: Path) -> list[tuple[int, float]]:
    """(step, grad_cosine) of the latest run logged in steps.jsonl, one value per step.

    The logger appends: a fresh run under an old name starts again at step 1 (only its records
    count), and a resumed run re-logs the steps after its checkpoint (the last record wins).
    """
    if not steps.is_file():
        return []
    records = read_records(steps)
    starts = [i for i, record in enumerate(records) if record["step"] == 1]
    latest = records[starts[-1]:] if starts else records
    by_step = {int(r["step"]): float(r["grad_cosine"]) for r in latest if "grad_cosine" in r}
    return sorted(by_step.items())
