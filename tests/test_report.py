"""deqrun.report on fake sweep folders (exact numbers), and once on a real tiny sweep."""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from deqrun.report import build_table, run

META = dict(name="phantom", scale="smoke", title="Phantom test table", papers=["phantom", "shine"],
            baseline="implicit", rows=["implicit", "upg", "npg", "shine", "jacobian_free"],
            seeds=[0, 1])
LABELS = dict(implicit="implicit (IFT)", upg="UPG A_{5,0.5}", npg="NPG A_{5,0.5}",
              shine="SHINE (fallback)", jacobian_free="Jacobian-free (JFB)")


def final(accuracy: float, samples_per_s: float, backward_ms: float, saved: int,
          kind: str = "process_peak_rss", peak: int = 10**9) -> dict:
    return dict(test_accuracy=accuracy, best_test_accuracy=accuracy + 0.01,
                samples_per_s=samples_per_s, forward_ms=50.0, backward_ms=backward_ms,
                saved_bytes=saved, peak_memory_bytes=peak, peak_memory_kind=kind,
                forward_nstep=14.0)


def write_run(sweep: Path, row: str | None, seed: int, status: str = "completed",
              numbers: dict | None = None, grad: dict | None = None, report: dict | None = META,
              **extra) -> Path:
    folder = sweep / f"{row or grad['name']}-seed{seed}"
    folder.mkdir(parents=True)
    config = dict(grad=grad or dict(name=row), trainer=dict(seed=seed), report=report,
                  row=dict(id=row, label=LABELS[row]) if row else None)
    content = dict(status=status, config=config, **extra)
    if numbers:
        content["final"] = numbers
    (folder / "metrics.json").write_text(json.dumps(content))
    return folder


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """Implicit 2/2; UPG failed once; NPG missing once; SHINE missing; JFB interrupted, running."""
    root = tmp_path / "2026-01-01_00-00-00"
    write_run(root, "implicit", 0, numbers=final(0.90, 100.0, 100.0, 1_000_000))
    write_run(root, "implicit", 1, numbers=final(0.92, 120.0, 140.0, 1_000_000))
    write_run(root, "upg", 0, numbers=final(0.95, 154.0, 10.0, 3_000_000),
              grad=dict(name="upg", k=5, lambda_=0.5))
    write_run(root, "upg", 1, status="failed", error="RuntimeError: boom",
              grad=dict(name="upg", k=5, lambda_=0.5))
    write_run(root, "npg", 0, numbers=final(0.94, 220.0, 20.0, 1_000_000))
    write_run(root, "jacobian_free", 0, status="interrupted")
    write_run(root, "jacobian_free", 1, status="running")
    return root


def test_aggregates_over_seeds_and_ratios_to_implicit(sweep):
    table = build_table(sweep)
    stats = table.stats
    assert stats["implicit"]["accuracy"] == pytest.approx(91.0)
    assert stats["implicit"]["accuracy_std"] == pytest.approx(statistics.stdev([90.0, 92.0]))
    assert stats["implicit"]["best_accuracy"] == pytest.approx(92.0)
    assert stats["upg"]["accuracy"] == pytest.approx(95.0) and stats["upg"]["accuracy_std"] is None
    assert stats["upg"]["train_speed"] == pytest.approx(154.0 / 110.0)
    assert stats["upg"]["backward_speed"] == pytest.approx(120.0 / 10.0)
    assert stats["upg"]["peak_memory"] == pytest.approx(3.0)
    assert stats["npg"]["train_speed"] == pytest.approx(2.0)
    assert stats["implicit"]["train_speed"] == pytest.approx(1.0)
    assert stats["shine"]["accuracy"] is None and stats["shine"]["train_speed"] is None
    assert [row.id for row in table.rows] == META["rows"]


def test_table_md_lists_failed_interrupted_and_missing_runs(sweep):
    assert run([str(sweep)]) == 0
    text = (sweep / "table.md").read_text()
    lines: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("| "):
            lines.setdefault(line.split(" | ")[0][2:], line)
    assert "| 2/2 | 91.00 ± 1.41 |" in lines["implicit (IFT)"]
    assert "| 1/2 | 95.00 |" in lines["UPG A_{5,0.5}"] and "| 95.0 |" in lines["UPG A_{5,0.5}"]
    assert "| 1.40 | 1.4 | 12.00 | 12.0 | 3.00 | 0.5 |" in lines["UPG A_{5,0.5}"]
    assert "| 0/2 |" in lines["shine"] and "| 93.14 |" in lines["shine"]
    assert "| 0/2 |" in lines["Jacobian-free (JFB)"]
    assert "UPG A_{5,0.5}, seed 1 (upg-seed1): **failed**: RuntimeError: boom" in text
    assert "NPG A_{5,0.5}, seed 1: **missing**" in text
    assert "shine, seed 0: **missing**" in text and "shine, seed 1: **missing**" in text
    assert "Jacobian-free (JFB), seed 0 (jacobian_free-seed0): **interrupted**" in text
    assert "seed 1 (jacobian_free-seed1): **running**" in text
    assert "saved_bytes" in text


def test_table_csv_has_our_numbers_beside_the_papers(sweep, tmp_path):
    out = tmp_path / "report"
    assert run([str(sweep), "--out", str(out)]) == 0
    rows = {r["row"]: r for r in csv.DictReader((out / "table.csv").open())}
    assert list(rows) == META["rows"]
    upg = rows["upg"]
    assert (upg["completed"], upg["expected"], upg["method"]) == ("1", "2", "upg k=5 lambda=0.5")
    assert float(upg["accuracy"]) == pytest.approx(95.0)
    assert float(upg["backward_speed"]) == pytest.approx(12.0)
    assert (upg["paper"], upg["paper_accuracy"], upg["paper_peak_memory"]) == (
        "phantom", "95.0", "0.5")
    assert upg["not_averaged"] == "seed1:failed"
    assert rows["shine"]["not_averaged"] == "seed0:missing;seed1:missing"
    assert rows["jacobian_free"]["paper"] == "shine"


def test_gradient_columns_appear_only_when_a_row_has_them(sweep, tmp_path):
    assert run([str(sweep)]) == 0
    plain = (sweep / "table.md").read_text()
    assert "fallback %" not in plain and "cosine with exact" not in plain
    root = tmp_path / "with-gradients"
    write_run(root, "implicit", 0, numbers=dict(final(0.90, 100.0, 100.0, 1), grad_cosine=1.0))
    write_run(root, "shine", 0, numbers=dict(final(0.89, 150.0, 10.0, 1), grad_cosine=0.8,
                                             fallback_fraction=0.25))
    write_run(root, "shine", 1, numbers=dict(final(0.91, 150.0, 10.0, 1), grad_cosine=0.9,
                                             fallback_fraction=0.75))
    assert run([str(root)]) == 0
    text = (root / "table.md").read_text()
    header = next(line for line in text.splitlines() if line.startswith("| row | samples/s"))
    assert header.endswith("| fallback % [2] | cosine with exact [3] |")
    shine = [line for line in text.splitlines() if line.startswith("| SHINE (fallback) |")][-1]
    assert shine.endswith("| 50.0 | 0.850 |")
    implicit = [line for line in text.splitlines() if line.startswith("| implicit (IFT) |")][-1]
    assert implicit.endswith("| – | 1.000 |")
    assert "[2] SHINE with fallback" in text and "[3] Cosine" in text
    rows = {r["row"]: r for r in csv.DictReader((root / "table.csv").open())}
    assert float(rows["shine"]["fallback_fraction"]) == pytest.approx(0.5)
    assert float(rows["shine"]["grad_cosine"]) == pytest.approx(0.85)
    assert rows["implicit"]["fallback_fraction"] == ""


def test_gpu_runs_compare_peak_memory(tmp_path):
    write_run(tmp_path, "implicit", 0, numbers=final(0.9, 100, 100, 1, "cuda_max_allocated", 400))
    write_run(tmp_path, "upg", 0, numbers=final(0.9, 100, 100, 9, "cuda_max_allocated", 200))
    table = build_table(tmp_path, paper_names=[])
    assert table.stats["upg"]["peak_memory"] == pytest.approx(0.5)
    assert "max_memory_allocated" in table.memory_note


def test_runs_without_row_group_by_grad_method_k_and_lambda(tmp_path):
    for seed, k in ((0, 5), (1, 5), (2, 3)):
        write_run(tmp_path, None, seed, numbers=final(0.9, 100.0, 10.0, 1),
                  grad=dict(name="upg", k=k, lambda_=0.5), report=None)
    write_run(tmp_path, None, 0, numbers=final(0.8, 50.0, 40.0, 1), grad=dict(name="implicit"),
              report=None)
    table = build_table(tmp_path, paper_names=[])
    rows = {row.id: len(row.runs) for row in table.rows}
    assert rows == {"implicit": 1, "upg k=5 lambda=0.5": 2, "upg k=3 lambda=0.5": 1}
    assert table.baseline == "implicit"
    assert table.stats["upg k=3 lambda=0.5"]["train_speed"] == pytest.approx(2.0)


def test_expected_rows_come_from_multirun_yaml_when_no_run_has_them(tmp_path):
    (tmp_path / "multirun.yaml").write_text("report:\n  rows: [implicit, upg]\n  seeds: [0]\n")
    folder = tmp_path / "upg-seed0" / ".hydra"
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("grad: {name: upg, k: 5, lambda_: 0.5}\n"
                                        "trainer: {seed: 0}\nrow: {id: upg, label: UPG}\n")
    table = build_table(tmp_path, paper_names=[])
    assert [row.id for row in table.rows] == ["implicit", "upg"]
    assert table.rows[0].missing_seeds == [0]
    assert table.rows[1].runs[0].status == "no metrics.json"


def test_a_broken_metrics_json_is_listed_not_dropped(sweep):
    broken = sweep / "npg-seed1"
    (broken / ".hydra").mkdir(parents=True)
    (broken / ".hydra" / "config.yaml").write_text("grad: {name: npg}\ntrainer: {seed: 1}\n"
                                                   "row: {id: npg, label: 'NPG A_{5,0.5}'}\n")
    (broken / "metrics.json").write_text('{"status": "compl')
    assert run([str(sweep)]) == 0
    text = (sweep / "table.md").read_text()
    assert "NPG A_{5,0.5}, seed 1 (npg-seed1): **unreadable metrics.json" in text
    assert "NPG A_{5,0.5}, seed 1: **missing**" not in text


def test_a_folder_of_sweeps_reports_the_newest(sweep, capsys):
    older = sweep.parent / "2025-01-01_00-00-00"
    write_run(older, "implicit", 0, numbers=final(0.5, 1, 1, 1))
    assert run([str(sweep.parent)]) == 0
    assert (sweep / "table.md").is_file() and not (older / "table.md").exists()


@pytest.mark.parametrize("make", [lambda p: p, lambda p: p / "absent"])
def test_folder_without_runs_is_a_one_line_error(tmp_path, capsys, make):
    (tmp_path / "empty-job").mkdir()
    assert run([str(make(tmp_path))]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("deqrun-report: error: ") and "\n" not in error


def test_unknown_paper_is_a_one_line_error(sweep, capsys):
    assert run([str(sweep), "--paper", "nope"]) == 2
    err = capsys.readouterr().err
    assert "no paper numbers named 'nope'; available: " in err and "phantom, shine" in err


def test_real_tiny_sweep_through_the_cli_then_the_report(tmp_path):
    """Two rows x one seed of the smoke table, one tiny epoch each; the report names the rest."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = ["table=phantom_smoke", "experiment=phantom/implicit,phantom/upg", "trainer.seed=0",
            "trainer.epochs=1", "task.subset=128", "trainer.batch_size=64", "solver.f_max_iter=5",
            "logger=none", "hydra.sweep.dir=sweep"]
    sweep = subprocess.run([sys.executable, "-m", "deqrun.cli", *args], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stderr
    assert sorted(p.name for p in (tmp_path / "sweep").glob("*-seed*")) == [
        "implicit-seed0", "upg-seed0"]
    report = subprocess.run([sys.executable, "-m", "deqrun.report", "sweep"], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "sweep" / "table.md").read_text()
    assert "| implicit (IFT) | implicit | 1/2 |" in text
    assert "| UPG A_{5,0.5} | upg k=5 lambda=0.5 | 1/2 |" in text
    assert "UPG A_{5,0.5}, seed 1: **missing**" in text and "shine, seed 0: **missing**" in text
    upg = next(r for r in csv.DictReader((tmp_path / "sweep" / "table.csv").open())
               if r["row"] == "upg")
    assert float(upg["peak_memory"]) > 1.0 and float(upg["backward_speed"]) > 0


GROUPED = dict(name="ignn", scale="smoke", title="IGNN test table", papers=["ignn"],
               baseline="implicit", rows=["implicit", "upg"], group_by=["task.dataset"],
               groups=["COX2", "PROTEINS"], replicate_key="task.fold", seeds=[0, 1],
               metrics=["test_accuracy_val_selected", "test_accuracy_max_over_epochs"],
               note="val-selected vs max-over-epochs, explained")


def write_fold(sweep: Path, row: str, dataset: str, fold: int, selected: float, best: float,
               samples_per_s: float, saved: int, status: str = "completed") -> None:
    folder = sweep / f"{dataset}-{row}-fold{fold}"
    folder.mkdir(parents=True)
    numbers = dict(final(0.5, samples_per_s, 10.0, saved), test_accuracy_val_selected=selected,
                   test_accuracy_max_over_epochs=best)
    config = dict(grad=dict(name=row), trainer=dict(seed=0), report=GROUPED,
                  task=dict(name="tu", dataset=dataset, fold=fold),
                  row=dict(id=row, label=LABELS[row]))
    content = dict(status=status, config=config)
    if status == "completed":
        content["final"] = numbers
    (folder / "metrics.json").write_text(json.dumps(content))


def test_grouped_table_rows_by_dataset_over_folds_with_both_protocols(tmp_path):
    """Rows x data sets, mean ± std over folds, per-dataset ratios and paper numbers."""
    sweep = tmp_path / "sweep"
    write_fold(sweep, "implicit", "COX2", 0, 0.80, 0.84, 100.0, 1_000)
    write_fold(sweep, "implicit", "COX2", 1, 0.78, 0.86, 100.0, 1_000)
    write_fold(sweep, "upg", "COX2", 0, 0.70, 0.90, 300.0, 4_000)
    write_fold(sweep, "upg", "COX2", 1, 0.0, 0.0, 0.0, 0, status="failed")
    write_fold(sweep, "implicit", "PROTEINS", 0, 0.60, 0.70, 50.0, 2_000)
    write_fold(sweep, "implicit", "PROTEINS", 1, 0.62, 0.72, 50.0, 2_000)
    write_fold(sweep, "upg", "PROTEINS", 0, 0.64, 0.74, 25.0, 1_000)
    table = build_table(sweep)
    assert [(row.group, row.id) for row in table.rows] == [
        ("COX2", "implicit"), ("COX2", "upg"), ("PROTEINS", "implicit"), ("PROTEINS", "upg")]
    cox2 = table.stats["COX2 / implicit"]
    assert cox2["test_accuracy_val_selected"] == pytest.approx(79.0)
    assert cox2["test_accuracy_val_selected_std"] == pytest.approx(statistics.stdev([80, 78]))
    assert cox2["test_accuracy_max_over_epochs"] == pytest.approx(85.0)
    # ratios to the implicit row of the same data set
    assert table.stats["COX2 / upg"]["train_speed"] == pytest.approx(3.0)
    assert table.stats["COX2 / upg"]["peak_memory"] == pytest.approx(4.0)
    assert table.stats["PROTEINS / upg"]["train_speed"] == pytest.approx(0.5)
    assert table.stats["PROTEINS / upg"]["peak_memory"] == pytest.approx(0.5)
    assert table.rows[3].missing_seeds == [1] and table.rows[1].missing_seeds == []

    assert run([str(sweep)]) == 0
    text = (sweep / "table.md").read_text()
    assert ("| task.dataset | row | method | runs | test_accuracy_val_selected | "
            "test_accuracy_max_over_epochs | paper accuracy |") in text
    assert ("| COX2 | implicit (IFT) | implicit | 2/2 | 79.00 ± 1.41 | 85.00 ± 1.41 | 84.1 ± 2.9 |"
            in text)
    assert "| PROTEINS | UPG A_{5,0.5} | upg | 1/2 | 64.00 | 74.00 | 78.4 | 0.50 |" in text
    assert "COX2, UPG A_{5,0.5}, fold 1 (COX2-upg-fold1): **failed**" in text
    assert "PROTEINS, UPG A_{5,0.5}, fold 1: **missing**" in text
    assert "val-selected vs max-over-epochs, explained" in text
    assert "protocol: max-over-epochs test accuracy" in text
    rows = list(csv.DictReader((sweep / "table.csv").open()))
    assert [(r["group"], r["row"]) for r in rows] == [
        ("COX2", "implicit"), ("COX2", "upg"), ("PROTEINS", "implicit"), ("PROTEINS", "upg")]
    assert float(rows[0]["test_accuracy_max_over_epochs"]) == pytest.approx(85.0)
    assert rows[2]["paper_accuracy"] == "78.6" and rows[1]["not_averaged"] == "fold1:failed"


def test_ungrouped_table_reads_the_papers_group_named_by_paper_group(tmp_path):
    """The PPI sweep of the IGNN paper table: no groups, the paper's rows.<row>.PPI numbers."""
    meta = dict(GROUPED, group_by=[], replicate_key="trainer.seed", seeds=[0], metric="micro_f1",
                metrics=["test_micro_f1_max_over_epochs"], paper_key="micro_f1", metric_scale=100,
                paper_group="PPI")
    for row in ("implicit", "upg"):
        write_run(tmp_path, row, 0, numbers=dict(final(0.5, 10.0, 10.0, 1),
                                                 test_micro_f1_max_over_epochs=0.9),
                  report=meta)
    assert run([str(tmp_path)]) == 0
    text = (tmp_path / "table.md").read_text()
    assert "| implicit (IFT) | implicit | 1/1 | 90.00 | 97.6 |" in text
    assert "| UPG A_{5,0.5} | upg | 1/1 | 90.00 | 98.2 |" in text
