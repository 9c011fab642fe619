"""The LM table's rows and tables compose and resolve to the settings they document."""

from __future__ import annotations

import pytest
from test_tables import EXPERIMENTS, TABLES, composed, composed_many

from deqrun.config import resolve

LM_EXPERIMENTS = [e for e in EXPERIMENTS if e.startswith("lm/")]
LM_TABLES = [t for t in TABLES if t.startswith("lm_")]


def test_the_lm_rows_and_tables_exist():
    assert LM_EXPERIMENTS == ["lm/explicit", "lm/implicit", "lm/jr_implicit", "lm/jr_upg",
                              "lm/jr_upg_more", "lm/tiny", "lm/upg"]
    assert LM_TABLES == ["lm_paper", "lm_smoke"]


@pytest.mark.parametrize("table", LM_TABLES)
def test_lm_table_rows_resolve(table):
    rows = ["implicit", "upg", "jr_implicit", "jr_upg", "jr_upg_more", "explicit"]
    configs = composed_many([[f"table={table}", f"experiment=lm/{row}"] for row in rows])
    jobs = {row: resolve(cfg)[0] for row, cfg in zip(rows, configs)}
    budget = 12 if table == "lm_smoke" else 30
    for row, run in jobs.items():
        assert run.model.name == "deq_transformer" and run.solver.name == "anderson"
        assert run.model.norm == ("post" if row in ("implicit", "upg") else "pre")
        assert (run.trainer.jac_reg_weight > 0) == row.startswith("jr_")
    assert jobs["implicit"].solver.f_max_iter == budget
    assert jobs["jr_upg_more"].solver.f_max_iter == budget * 3 // 2
    assert (jobs["upg"].grad.k, jobs["upg"].grad.lambda_) == (5, 0.8)
    assert jobs["explicit"].model.explicit
    paper = jobs["implicit"]
    if table == "lm_paper":
        assert (paper.model.size, paper.task.name, paper.task.tgt_len) == ("wt103", "wikitext103",
                                                                         150)
        assert (paper.optim.lr, paper.optim.warmup_steps, paper.trainer.max_steps) == (
            2.5e-4, 16000, 300000)
        assert (paper.trainer.pretrain_steps, paper.trainer.batch_size) == (32000, 56)
    cfg = composed(f"table={table}", hydra=True)
    assert cfg.report.name == "lm" and list(cfg.report.rows) == rows
