"""The SHINE table: its rows (configs/experiment/shine/) and presets (table/shine_*.yaml)."""

from __future__ import annotations

import pytest
from test_tables import CONFIGS, composed, sweep_values

from deqrun.config import resolve

ROWS = sorted(p.stem for p in (CONFIGS / "experiment" / "shine").glob("*.yaml"))
GRAD_OF_ROW = {"original": "implicit", "shine": "shine", "jacobian": "jacobian_free",
               "jf": "jacobian_free"}


def test_rows_cover_the_papers_grid():
    steps = ("1", "2", "5", "7", "10")
    expected = {"original", "shine", "shine_fallback", "shine_opa", "jacobian_free"}
    expected |= {f"{prefix}{n}" for n in steps for prefix in ("original_b", "shine_refine",
                                                              "jf_refine")}
    assert set(ROWS) == expected


@pytest.mark.parametrize("row", ROWS)
def test_every_shine_row_composes_with_its_gradient(row):
    run, resolved = resolve(composed(f"experiment=shine/{row}"))
    assert resolved["row"]["id"] == row
    assert run.grad.name == GRAD_OF_ROW[row.split("_")[0]]
    assert run.solver.name == "broyden"
    steps = int("".join(c for c in row if c.isdigit()) or 0)
    if row.startswith("original_b"):
        assert run.grad.b_max_iter == steps + 1 and run.grad.b_solver == "broyden"
    elif "refine" in row:
        assert run.grad.refine == steps
    if row == "shine_opa":
        assert run.solver.opa_every == 5 and run.solver.update == "adjoint"


@pytest.mark.parametrize("table", ["shine_smoke", "shine_paper"])
def test_shine_tables_sweep_their_report_rows(table):
    cfg = composed(f"table={table}", hydra=True)
    rows = [e.split("/")[-1] for e in sweep_values(table, "experiment")]
    assert rows == list(cfg.report.rows)
    assert set(rows) <= set(ROWS)
    assert cfg.report.baseline == "original" and cfg.report.name == "shine"
    assert [int(s) for s in sweep_values(table, "trainer.seed")] == list(cfg.report.seeds)
