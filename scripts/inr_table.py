"""The (Implicit)^2 table of a sweep: test PSNR per row (mean ± std over images), implicit minus
explicit per family, time per step and memory, beside the paper's numbers (configs/paper/inr.yaml).

    python scripts/inr_table.py outputs/tables/inr-smoke/2026-...   [--out table.md]

Reads every job folder's metrics.json (completed runs only; others are listed as such).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path

import yaml

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper" / "inr.yaml"
PAIRS = (("fourier-mfn", "fourier-imfn"), ("gabor-mfn", "gabor-imfn"), ("siren", "isiren"))


def read_runs(sweep: Path) -> tuple[dict[str, list[dict]], list[str]]:
    """Completed runs' final metrics by row id; the folders that did not complete."""
    rows: dict[str, list[dict]] = defaultdict(list)
    problems = []
    for metrics_file in sorted(sweep.glob("*/metrics.json")):
        metrics = json.loads(metrics_file.read_text())
        if metrics.get("status") != "completed":
            problems.append(f"{metrics_file.parent.name}: {metrics.get('status')}")
            continue
        row = (metrics.get("config") or {}).get("row") or {}
        image = ((metrics.get("config") or {}).get("task") or {}).get("image")
        rows[str(row.get("id", metrics_file.parent.name))].append(
            dict(metrics["final"], image=image))
    return rows, problems


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread}"


def row_lines(rows: dict[str, list[dict]], paper: dict) -> list[str]:
    lines = ["| row | test PSNR (dB) | train PSNR | images | step ms | peak MB | paper |",
             "|---|---|---|---|---|---|---|"]
    for row_id, runs in rows.items():
        published = (paper.get(row_id) or {}).get("psnr")
        lines.append(
            f"| {row_id} | {mean_std([r['test_psnr'] for r in runs])} "
            f"| {mean_std([r['train_psnr'] for r in runs])} | {len(runs)} "
            f"| {statistics.mean(r.get('step_ms', float('nan')) for r in runs):.0f} "
            f"| {statistics.mean(r.get('peak_memory_bytes', 0) for r in runs) / 2**20:.0f} "
            f"| {published if published is not None else '-'} |")
    return lines


def gap_lines(rows: dict[str, list[dict]], paper: dict) -> list[str]:
    """Implicit minus explicit per family and size, paired by image."""
    lines = ["", "| family | implicit - explicit (dB, per image) | mean ± std | paper |",
             "|---|---|---|---|"]
    sizes = sorted({"-".join(rid.split("-")[-2:]) for rid in rows})
    for explicit, implicit in PAIRS:
        for size in sizes:
            exp_runs = {r["image"]: r for r in rows.get(f"{explicit}-{size}", [])}
            imp_runs = {r["image"]: r for r in rows.get(f"{implicit}-{size}", [])}
            common = sorted(set(exp_runs) & set(imp_runs), key=str)
            if not common:
                continue
            gaps = [imp_runs[i]["test_psnr"] - exp_runs[i]["test_psnr"] for i in common]
            p_exp = (paper.get(f"{explicit}-{size}") or {}).get("psnr")
            p_imp = (paper.get(f"{implicit}-{size}") or {}).get("psnr")
            published = f"{p_imp - p_exp:+.2f}" if p_exp and p_imp else "-"
            per_image = ", ".join(f"{g:+.2f}" for g in gaps)
            lines.append(f"| {implicit} vs {explicit} {size} | {per_image} | {mean_std(gaps)} "
                         f"| {published} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    paper = (yaml.safe_load(PAPER.read_text()) or {}).get("rows", {})
    rows, problems = read_runs(args.sweep)
    lines = row_lines(rows, paper) + gap_lines(rows, paper)
    lines += [f"- not completed: {p}" for p in problems]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
