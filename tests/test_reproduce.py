"""scripts/reproduce.py: which tables are finished, what runs again, the index page, --dry."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
reproduce = importlib.util.module_from_spec(SPEC)
sys.modules["reproduce"] = reproduce  # dataclasses look their module up
SPEC.loader.exec_module(reproduce)

META = dict(name="phantom", rows=["implicit", "upg"], seeds=[0, 1])


def fake_sweep(root: Path, stamp: str, statuses: dict[str, str], report: bool = True,
               figure: bool = False) -> Path:
    """A sweep folder as `deqrun table=...` + deqrun-report leave it."""
    sweep = root / stamp
    for folder, status in statuses.items():
        job = sweep / folder
        (job / ".hydra").mkdir(parents=True)
        row, seed = folder.split("-seed")
        config = dict(row=dict(id=row, label=row), trainer=dict(seed=int(seed)), report=META,
                      grad=dict(name=row))
        (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        (job / "metrics.json").write_text(json.dumps(dict(status=status, config=config)))
    if report:
        (sweep / "table.md").write_text("| row |\n")
    if figure:
        (sweep / "speed.png").write_bytes(b"png")
    return sweep


ALL_DONE = {"implicit-seed0": "completed", "implicit-seed1": "completed",
            "upg-seed0": "completed", "upg-seed1": "completed"}


def test_a_table_is_finished_only_with_table_md_and_every_run_completed(tmp_path):
    root = tmp_path / "phantom-smoke"
    assert reproduce.table_state("phantom", root).status == "not started"
    fake_sweep(root, "2026-01-01_00-00-00", ALL_DONE, figure=True)
    state = reproduce.table_state("phantom", root)
    assert (state.status, state.completed, state.expected) == ("finished", 4, 4)
    assert [p.name for p in state.figures] == ["speed.png"]
    fake_sweep(root, "2026-01-02_00-00-00", {**ALL_DONE, "upg-seed1": "interrupted"})
    state = reproduce.table_state("phantom", root)  # the newest sweep counts
    assert (state.status, state.completed) == ("unfinished", 3)
    assert state.problems == ["upg-seed1: interrupted"]
    fake_sweep(root, "2026-01-03_00-00-00", ALL_DONE, report=False)
    assert reproduce.table_state("phantom", root).status == "unfinished"
    fake_sweep(root, "2026-01-04_00-00-00", {"implicit-seed0": "completed"})
    state = reproduce.table_state("phantom", root)  # missing runs: 1 of 4
    assert (state.status, state.completed, state.expected) == ("unfinished", 1, 4)


def fake_configs(tmp_path: Path, *names: str) -> Path:
    configs = tmp_path / "configs"
    (configs / "table").mkdir(parents=True)
    for name in names:
        (configs / "table" / f"{name}.yaml").write_text("{}\n")
    return configs


def test_finished_tables_are_skipped_unfinished_resumed_new_ones_started(tmp_path):
    configs = fake_configs(tmp_path, "phantom_smoke", "lm_smoke", "ignn_smoke", "lm_paper")
    outputs = tmp_path / "tables"
    fake_sweep(outputs / "phantom-smoke", "2026-01-01_00-00-00", ALL_DONE)
    half = fake_sweep(outputs / "lm-smoke", "2026-01-01_00-00-00",
                      {"implicit-seed0": "completed", "upg-seed0": "failed"}, report=False)
    ran: list[list[list[str]]] = []

    def runner(commands):
        ran.append(commands)
        return 0

    status = reproduce.reproduce("smoke", outputs=outputs, configs=configs, runner=runner)
    assert status == 1  # lm and ignn did not finish (the fake runner does nothing)
    assert [commands[0][3] for commands in ran] == ["table=ignn_smoke", "table=lm_smoke"]
    ignn, lm = ran
    assert "trainer.resume=true" not in ignn[0]
    assert ignn[0][4].startswith(f"hydra.sweep.dir={outputs / 'ignn-smoke'}/")
    assert lm[0][4:] == [f"hydra.sweep.dir={half}", "trainer.resume=true"]
    assert lm[1][-1] == str(half) and lm[1][2] == "deqrun.report"
    index = (outputs / "index-smoke.md").read_text()
    assert "| phantom | finished | 4/4 | [table.md](phantom-smoke/2026-01-01_00-00-00/table.md)" \
        in index
    assert "| lm | unfinished | 1/4 | - |" in index and "| ignn | not started | - |" in index
    assert "- lm: upg-seed0: failed" in index


def test_only_selects_tables_and_rejects_unknown_ones(tmp_path):
    configs = fake_configs(tmp_path, "phantom_smoke", "lm_smoke")
    outputs = tmp_path / "tables"
    fake_sweep(outputs / "phantom-smoke", "2026-01-01_00-00-00", ALL_DONE)
    assert reproduce.reproduce("smoke", only="phantom", outputs=outputs, configs=configs,
                               runner=pytest.fail) == 0
    assert "| phantom | finished |" in (outputs / "index-smoke.md").read_text()
    with pytest.raises(reproduce.ReproduceError, match="no table jiio"):
        reproduce.reproduce("smoke", only="phantom,jiio", outputs=outputs, configs=configs)
    assert reproduce.main(["--scale", "huge"]) == 2


def test_dry_prints_every_paper_job_config(capsys):
    assert reproduce.main(["--scale", "paper", "--only", "phantom", "--dry",
                           "--args", "trainer.epochs=3"]) == 0
    out = capsys.readouterr().out
    jobs = [line for line in out.splitlines() if line.startswith("# ---- job")]
    assert len(jobs) == 6 and "experiment=phantom/upg trainer.seed=2" in out
    assert out.count("epochs: 3") == 6 and out.count("size: large") == 6
