"""scripts/jiio_table.py: its jobs compose from the presets, and the table reads their outputs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("jiio_table", ROOT / "scripts/jiio_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def attack_report(pgd_acc: float, jiio_acc: float, pgd_loss: float, jiio_loss: float) -> dict:
    trace = [{"iteration": 0, "ms": 0.0, "loss": 0.1}, {"iteration": 20, "ms": 9.0, "loss": 1.0}]
    return {"samples": 100, "clean_accuracy": 0.95, "pgd_robust_accuracy": pgd_acc,
            "jiio_robust_accuracy": jiio_acc, "pgd_loss": pgd_loss, "jiio_loss": jiio_loss,
            "pgd_ms": 4000.0, "jiio_ms": 1000.0, "pgd_trace": trace, "jiio_trace": trace}


@pytest.mark.parametrize("scale", ["smoke", "paper"])
def test_jobs_name_the_presets_and_reuse_completed_runs(scale: str) -> None:
    jobs = load_script().jobs(scale, "DATA")
    names = [job["name"] for job in jobs]
    assert names == [f"jiio-adv-none-{scale}", f"jiio-adv-jiio-{scale}",
                     f"jiio-generator-{scale}", "timing"]
    for job in jobs:
        if job["kind"] == "deqrun":
            assert "trainer.resume=true" in job["args"] and "task.root=DATA" in job["args"]
    assert "task.train_attack=jiio" in jobs[1]["args"]
    # adversarial training starts from the clean classifier's weights (job 1's run folder)
    assert f"trainer.init_from=outputs/runs/{names[0]}" in jobs[1]["args"]
    assert not any(a.startswith("trainer.init_from") for a in jobs[0]["args"])


def test_the_timing_study_is_reused_only_when_newer_than_its_checkpoint(tmp_path: Path,
                                                                       monkeypatch) -> None:
    import os

    script = load_script()
    monkeypatch.chdir(tmp_path)
    timing = script.jobs("smoke", "DATA")[-1]
    assert not script.timing_is_current(timing)  # nothing there yet
    checkpoint = Path("outputs/runs/jiio-generator-smoke/checkpoints/last.pt")
    result = Path("outputs/tables/jiio-smoke/timing/jiio_timing.json")
    for path in (checkpoint, result):
        path.parent.mkdir(parents=True)
        path.write_text("{}")
    os.utime(checkpoint, (1000, 1000))
    os.utime(result, (2000, 2000))
    assert not script.timing_is_current(timing)  # no record of the arguments it ran with
    record = script.timing_record(timing)
    record.write_text(json.dumps({"name": "timing", "args": timing["args"], "wall_s": 1.0}))
    assert script.timing_is_current(timing)
    changed = {**timing, "args": [*timing["args"], "--latent-weight", "0.01"]}
    assert not script.timing_is_current(changed)  # an option changed: time it again
    os.utime(checkpoint, (3000, 3000))  # the generator trained again: time it again
    assert not script.timing_is_current(timing)


def test_a_completed_run_is_reused_only_with_the_same_arguments(tmp_path: Path,
                                                                 monkeypatch) -> None:
    script = load_script()
    monkeypatch.chdir(tmp_path)
    job = script.jobs("smoke", "DATA")[0]
    run = Path("outputs/runs") / job["name"]
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"status": "completed"}))
    (run / "table_job.json").write_text(json.dumps({"name": job["name"], "args": job["args"],
                                                    "wall_s": 7.0, "exit": 0}))
    out = tmp_path / "table"
    out.mkdir()
    done = script.run_jobs([job], out)
    assert done[0]["reused"] and done[0]["wall_s"] == 7.0
    calls = []
    monkeypatch.setattr(script.subprocess, "call", lambda command: calls.append(command) or 0)
    changed = {**job, "args": [*job["args"], "trainer.max_steps=9"]}
    done = script.run_jobs([changed], out)
    assert not done[0].get("reused") and calls and calls[0][-1] == "trainer.max_steps=9"
    assert json.loads((run / "table_job.json").read_text())["args"] == changed["args"]


def test_compose_reads_the_outputs_and_judges_the_claims(tmp_path: Path, monkeypatch) -> None:
    script = load_script()
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "outputs/tables/jiio-smoke"
    (out / "timing").mkdir(parents=True)
    rows = [{"problem": "recon", "metric": "mse", "jiio_final": 0.05, "jiio_ms": 100.0,
             "adam_final": 0.06, "adam_ms": 900.0, "jiio_ms_to_adam_final": 60.0,
             "speedup_at_equal_quality": 15.0, "curves": {}},
            {"problem": "inpaint", "metric": "psnr", "jiio_final": 10.0, "jiio_ms": 100.0,
             "adam_final": 12.0, "adam_ms": 900.0, "jiio_ms_to_adam_final": 5.0,
             "speedup_at_equal_quality": 180.0, "curves": {}, "start": 14.0,
             "adam_improves": False}]
    (out / "timing/jiio_timing.json").write_text(json.dumps({"rows": rows}))
    runs = tmp_path / "outputs/runs"
    for name, report in (("none", attack_report(0.40, 0.35, 2.0, 2.2)),
                         ("jiio", attack_report(0.75, 0.80, 0.9, 0.8))):
        (runs / f"jiio-adv-{name}-smoke").mkdir(parents=True)
        (runs / f"jiio-adv-{name}-smoke/attacks.json").write_text(json.dumps(report))
        (runs / f"jiio-adv-{name}-smoke/metrics.json").write_text(
            json.dumps({"final": {"test_accuracy": 0.9}}))
    (runs / "jiio-generator-smoke").mkdir()
    (runs / "jiio-generator-smoke/metrics.json").write_text(
        json.dumps({"history": [{"step": 120, "test_mse": 0.1, "test_psnr": 16.0}]}))
    done = [{"name": "x", "command": "c", "wall_s": 5.0}]
    table = script.compose("smoke", out, done)
    assert "reconstruction loss at least 3x sooner: holds (15.0x sooner)" in table
    # Adam ends worse than where it started: reaching its final says nothing
    assert "inpainting PSNR at least 3x sooner: not measurable here (Adam-40 ends at 12" in table
    assert "robust accuracy: holds (+35.0 points)" in table
    assert "(JIIO-trained model): does not hold" in table  # weaker: robust 0.80 > 0.75
    assert "(clean-trained model): holds" in table
    assert "120 training steps" in table  # from the history, not the preset
    never = dict(rows[0], jiio_ms_to_adam_final=None, speedup_at_equal_quality=None,
                 start=0.1, adam_improves=True)
    verdicts = script.claims([never], {a: attack_report(0.4, 0.4, 1.0, 1.0)
                                      for a in ("none", "jiio")})
    assert "reconstruction loss at least 3x sooner: does not hold (JIIO never reached" \
        in verdicts[0]
    script.plot_attacks("smoke", out)
    assert (out / "adversarial.png").is_file()


def test_the_timing_script_runs_both_methods_on_one_problem(shared_data: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    """scripts/jiio_timing.py end to end on an untrained generator: both curves, the score at
    x = 0, JIIO's score after as many iterations as Adam's steps, the table and a plot."""
    import sys

    import torch

    from deqrun.core import DEQ
    from deqrun.models.generator import GeneratorConfig, MDEQGenerator

    spec = importlib.util.spec_from_file_location("jiio_timing", ROOT / "scripts/jiio_timing.py")
    timing = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(timing)
    torch.manual_seed(0)
    model = MDEQGenerator(GeneratorConfig(size="tiny"), DEQ(solver="anderson"), (1, 28, 28), 128)
    checkpoint = tmp_path / "last.pt"
    torch.save({"model": model.state_dict()}, checkpoint)
    out = tmp_path / "timing"
    monkeypatch.setattr(sys, "argv", [
        "jiio_timing.py", "--checkpoint", str(checkpoint), "--data-root",
        str(shared_data / "mnist"), "--problems", "recon,inpaint12", "--batch", "2", "--T", "6",
        "--m", "3", "--adam-steps", "4", "--every", "2", "--latent-weight", "0.01",
        "--out", str(out)])
    timing.main()
    rows = json.loads((out / "jiio_timing.json").read_text())["rows"]
    assert [r["problem"] for r in rows] == ["recon", "inpaint12"]
    for row in rows:
        assert len(row["curves"]["jiio"]) == 3 and len(row["curves"]["adam"]) == 4
        assert row["jiio_at_adam_steps"]["iterations"] == 4
        assert 0 < row["jiio_at_adam_steps"]["ms"] <= row["jiio_ms"]
        assert row["start"] is not None and row["adam_improves"] in (True, False)
    assert rows[0]["metric"] == "mse" and rows[1]["metric"] == "psnr"
    assert (out / "recon.png").is_file() and "mean(x^2)" in (out / "jiio_timing.md").read_text()
