"""Runs never lie and never lose work: divergence, strict files, resume checks, run folders,
signals, write failures. CLI cases run as subprocesses; file-level cases run in process."""

from __future__ import annotations

import contextlib
import csv
import hashlib
import importlib.util
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from deqrun.cli import main, quote_run_name
from deqrun.config import check_run_name
from deqrun.errors import CheckpointError, ConfigError, RunFolderError, WriteError
from deqrun.loggers import build_logger
from deqrun.results import read_metrics, strict_loads, write_metrics

FAST = ["trainer.epochs=1", "task.subset=128", "trainer.batch_size=64", "solver.f_max_iter=5",
        "trainer.eval_batch_size=8", "trainer.threads=1"]


def deqrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """The deqrun command in this process (a subprocess costs ~10 s of imports on a busy box):
    exit status, stdout and stderr, as a CompletedProcess."""
    out, err = io.StringIO(), io.StringIO()
    saved = (sys.argv, os.getcwd(), torch.get_num_threads(),
             torch.are_deterministic_algorithms_enabled())
    sys.argv = ["deqrun", *args]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                status = 0
            except SystemExit as stop:
                status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None
                                                                        else 1)
            except Exception:  # a bug: show it as the CLI would
                traceback.print_exc()
                status = 1
    finally:
        sys.argv = saved[0]
        os.chdir(saved[1])
        torch.set_num_threads(saved[2])
        torch.use_deterministic_algorithms(saved[3])
        _close_file_logs()
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def _close_file_logs() -> None:
    """Detach the run folder's log file that Hydra attached, so later logs never reach it."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()


def start(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "deqrun.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def strict_metrics(run_dir: Path) -> dict:
    return strict_loads((run_dir / "metrics.json").read_text())


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` and its content hash."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_one_line_error(result: subprocess.CompletedProcess, needle: str,
                          status: int = 2) -> str:
    assert result.returncode == status, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.startswith("deqrun:")]
    assert len(lines) == 1, result.stderr
    assert needle in lines[0], lines[0]
    return lines[0]


def assert_strict_files(run_dir: Path) -> None:
    """metrics.json and every jsonl/csv file parse with strict parsers."""
    strict_metrics(run_dir)
    for path in run_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            strict_loads(line)
    for path in run_dir.glob("*.csv"):
        rows = list(csv.reader(io.StringIO(path.read_text())))
        assert all(len(row) == len(rows[0]) for row in rows)
    if importlib.util.find_spec("pandas") is not None:
        import pandas

        for path in [*run_dir.glob("*.csv"), *run_dir.glob("*.jsonl")]:
            if path.stat().st_size:
                frame = (pandas.read_csv(path) if path.suffix == ".csv"
                         else pandas.read_json(path, lines=True))
                assert len(frame) == len(path.read_text().splitlines()) - (path.suffix == ".csv")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A completed run `done` in a scratch project folder, and its files' hashes."""
    cwd = tmp_path_factory.mktemp("project")
    result = deqrun([*FAST, "run_name=done"], cwd)
    assert result.returncode == 0, result.stderr
    run_dir = cwd / "outputs" / "runs" / "done"
    assert strict_metrics(run_dir)["status"] == "completed"
    return run_dir, snapshot(run_dir)


# ---- refusals that leave a finished run byte-identical ------------------------------------------
@pytest.mark.parametrize("args,needle", [
    ([], "already holds a completed run"),
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["solver.eval_f_max_iter=-1"], "solver.eval_f_max_iter must be >= 1"),
    (["trainer.device=cuda:7"], "trainer.device=cuda:7"),
    (["trainer.device=gpu"], "trainer.device must be auto, cpu, cuda, cuda:N or mps"),
    (["trainer.resume=true", "grad=implicit", "solver=anderson"], "grad.name ('upg' -> "),
    (["trainer.resume=true", "trainer.batch_size=32"], "trainer.batch_size (64 -> 32)"),
    (["trainer.resume=true", "optim=sgd"], "optim.name ('adam' -> 'sgd')"),
    (["trainer.resume=true", "trainer.overwrite=true"], "excludes trainer.resume=true"),
])
def test_refused_runs_leave_a_finished_run_untouched(finished, args, needle):
    run_dir, before = finished
    result = deqrun([*FAST, "run_name=done", *args], run_dir.parents[2])
    assert_one_line_error(result, needle)
    assert snapshot(run_dir) == before
    assert strict_metrics(run_dir)["status"] == "completed"


def test_resuming_a_completed_run_has_nothing_to_do_and_takes_over_a_stale_lock(finished):
    run_dir, before = finished
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (run_dir / ".lock").write_text(json.dumps({"pid": int(dead), "host": socket.gethostname()}))
    result = deqrun([*FAST, "run_name=done", "trainer.resume=true"], run_dir.parents[2])
    assert result.returncode == 0, result.stderr
    assert "already completed" in result.stderr and "Traceback" not in result.stderr
    assert snapshot(run_dir) == before


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_an_unreadable_checkpoint_is_refused_in_one_line_naming_it(finished, tmp_path, damage):
    run_dir = tmp_path / "outputs" / "runs" / "broken"
    shutil.copytree(finished[0], run_dir)
    checkpoint = run_dir / "checkpoints" / "last.pt"
    content = checkpoint.read_bytes()
    checkpoint.write_bytes({"empty": b"", "truncated": content[: len(content) // 2],
                            "garbage": b"not a checkpoint" * 10}[damage])
    before = snapshot(run_dir)
    result = deqrun([*FAST, "run_name=broken", "trainer.resume=true"], tmp_path)
    line = assert_one_line_error(result, str(checkpoint))
    assert "weights_only" not in result.stderr + result.stdout, line
    assert snapshot(run_dir) == before


def copy_run(finished: Path, cwd: Path, name: str) -> Path:
    run_dir = cwd / "outputs" / "runs" / name
    shutil.copytree(finished, run_dir)
    return run_dir


def test_resume_force_keeps_weights_and_progress_and_resets_the_optimiser(finished, tmp_path):
    run_dir = copy_run(finished[0], tmp_path, "forced")
    args = [*FAST, "run_name=forced", "trainer.resume=true", "trainer.epochs=2",
            "optim.lr=0.01"]
    refused = deqrun(args, tmp_path)
    assert_one_line_error(refused, "optim.lr (0.001 -> 0.01)")
    result = deqrun([*args, "trainer.resume_force=true"], tmp_path)
    assert result.returncode == 0, result.stderr
    content = strict_metrics(run_dir)
    assert content["status"] == "completed" and len(content["history"]) == 2
    assert any("resume_force" in note and "optim.lr" in note for note in content["notes"])
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["step"] == 4 and state["config"]["optim"]["lr"] == 0.01


def test_resume_force_refuses_weights_that_do_not_fit(finished, tmp_path):
    run_dir = copy_run(finished[0], tmp_path, "resized")
    before = snapshot(run_dir)
    result = deqrun([*FAST, "run_name=resized", "trainer.resume=true",
                     "trainer.resume_force=true", "model.stem_channels=8"], tmp_path)
    assert_one_line_error(result, "does not fit the configured model")
    assert snapshot(run_dir) == before


def test_a_second_process_is_refused_by_the_lock(finished):
    run_dir, before = finished
    lock = run_dir / ".lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    try:
        result = deqrun([*FAST, "run_name=done", "trainer.resume=true"], run_dir.parents[2])
    finally:
        lock.unlink()
    assert_one_line_error(result, f"in use by pid {os.getpid()}")
    assert snapshot(run_dir) == before


# ---- run names -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", ".", "..", "../../x", "/abs", "a/b", "a\\b"])
def test_run_names_must_be_plain_folder_names(name):
    with pytest.raises(ConfigError, match="run_name"):
        check_run_name(name)
    with pytest.raises(ConfigError, match="run_name"):
        quote_run_name([f"run_name={name}"])


def test_run_names_that_look_like_values_stay_strings():
    assert quote_run_name(["run_name=nan", "run_name=null", "run_name=1e3", "x=1"]) == [
        "run_name='nan'", "run_name='null'", "run_name='1e3'", "x=1"]
    with pytest.raises(ConfigError, match="must be a string"):
        check_run_name(1000.0)


def test_a_traversing_run_name_is_refused_before_any_folder_is_made(tmp_path):
    result = deqrun([*FAST, "run_name=../../escaped"], tmp_path)
    assert_one_line_error(result, "plain folder name")
    assert not any(tmp_path.rglob("escaped")) and not (tmp_path / "outputs").exists()


def test_a_run_named_null_gets_a_folder_called_null(tmp_path):
    result = deqrun([*FAST, "run_name=null", "task=cifar10", "task.root=/nonexistent"], tmp_path)
    assert_one_line_error(result, "/nonexistent")
    run_dir = tmp_path / "outputs" / "runs" / "null"
    assert strict_metrics(run_dir)["status"] == "failed"
    assert not (tmp_path / "outputs" / "runs" / "None").exists()


def test_a_config_error_on_a_new_name_leaves_no_folder(tmp_path):
    result = deqrun([*FAST, "run_name=1e3", "trainer.device=mps"], tmp_path)
    assert_one_line_error(result, "MPS is not available")
    assert not (tmp_path / "outputs" / "runs" / "1e3").exists()
    assert not (tmp_path / "outputs" / "runs" / "1000.0").exists()


# ---- divergence ----------------------------------------------------------------------------------
def test_a_diverging_run_ends_diverged_without_writing_non_finite_weights(tmp_path):
    args = [*FAST, "task.subset=96", "trainer.batch_size=16", "optim=sgd", "optim.lr=1e6",
            "run_name=blowup", "logger=csv"]
    result = deqrun(args, tmp_path)
    assert_one_line_error(result, "training diverged at step", status=3)
    run_dir = tmp_path / "outputs" / "runs" / "blowup"
    content = strict_metrics(run_dir)
    assert content["status"] == "diverged"
    divergence = content["divergence"]
    assert divergence["step"] >= 2 and divergence["last_finite"]["step"] == divergence["step"] - 1
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert state["progress"]["step"] == divergence["step"] - 1
    assert_strict_files(run_dir)


def test_skip_batch_skips_and_counts_then_stops(tmp_path):
    args = [*FAST, "task.subset=96", "trainer.batch_size=16", "optim=sgd", "optim.lr=1e6",
            "run_name=skipper", "trainer.on_divergence=skip_batch",
            "trainer.max_skipped_batches=2"]
    result = deqrun(args, tmp_path)
    assert_one_line_error(result, "more than 2 batches skipped", status=3)
    run_dir = tmp_path / "outputs" / "runs" / "skipper"
    content = strict_metrics(run_dir)
    assert content["status"] == "diverged" and content["divergence"]["skipped_batches"] == 2
    skipped = [strict_loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert sum(record.get("skipped", 0) for record in skipped) == 2
    assert_strict_files(run_dir)


@pytest.mark.slow
def test_a_sweep_lists_a_diverged_job_as_failed_with_the_reason(tmp_path):
    result = deqrun(["-m", *FAST, "optim=sgd", "optim.lr=0.01,1e6", "trainer.batch_size=16",
                     "task.subset=96", "hydra.sweep.dir=sweep"], tmp_path)
    assert result.returncode == 1
    assert "1 of 2 jobs completed" in result.stderr
    assert "diverged: training diverged at step" in result.stderr
    assert "Traceback" not in result.stderr


# ---- signals -------------------------------------------------------------------------------------
def wait_for_steps(path: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} did not reach {count} steps")


def wait_for_text(path: Path, text: str, process: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.02)
    raise AssertionError(f"{path} never said {text!r}")


def interrupt_during_evaluation(cwd: Path, name: str, signals: list[int]) -> Path:
    """Start a FAST run, signal it once its last training step is logged; check the stop."""
    process = start([*FAST, f"run_name={name}"], cwd)
    run_dir = cwd / "outputs" / "runs" / name
    wait_for_steps(run_dir / "steps.jsonl", 2, process)
    wait_for_text(run_dir / "deqrun.log", "evaluating test", process)
    for signum in signals:
        process.send_signal(signum)
        time.sleep(0.05)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signals[0], stderr
    assert "Traceback" not in stdout + stderr
    assert "evaluation abandoned" in stdout + stderr
    assert [line for line in stderr.splitlines() if line.startswith("deqrun:")] == [
        next(line for line in stderr.splitlines() if line.startswith("deqrun:"))]
    assert strict_metrics(run_dir)["status"] == "interrupted"
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["step"] == 2 and state["progress"]["history"] == []
    assert_strict_files(run_dir)
    return run_dir


def assert_resumes_to(finished_dir: Path, cwd: Path, name: str) -> None:
    resumed = deqrun([*FAST, f"run_name={name}", "trainer.resume=true"], cwd)
    assert resumed.returncode == 0, resumed.stderr
    a = strict_metrics(finished_dir)["final"]
    b = strict_metrics(cwd / "outputs" / "runs" / name)["final"]
    for key in ("test_accuracy", "test_loss", "train_loss", "train_accuracy", "steps",
                "eval_nstep"):
        assert a[key] == b[key], key


def test_a_double_signal_during_evaluation_checkpoints_and_resumes_exactly(finished, tmp_path):
    interrupt_during_evaluation(tmp_path, "twice", [signal.SIGINT, signal.SIGINT])
    assert_resumes_to(finished[0], tmp_path, "twice")


@pytest.mark.slow
def test_sigterm_during_evaluation_then_resume_gives_identical_metrics(finished, tmp_path):
    interrupt_during_evaluation(tmp_path, "term", [signal.SIGTERM])
    assert_resumes_to(finished[0], tmp_path, "term")


# ---- write failures ------------------------------------------------------------------------------
def test_a_failed_write_names_the_path(tmp_path):
    run_dir = tmp_path / "outputs" / "runs" / "blocked"
    (run_dir / "metrics.json.tmp").mkdir(parents=True)
    result = deqrun([*FAST, "run_name=blocked"], tmp_path)
    assert_one_line_error(result, f"cannot write {run_dir / 'metrics.json'}")


def test_write_failures_keep_the_last_good_files(tmp_path):
    write_metrics(tmp_path, status="running", value=1.0)
    good = (tmp_path / "metrics.json").read_bytes()
    (tmp_path / "metrics.json.tmp").mkdir()
    with pytest.raises(WriteError, match=str(tmp_path / "metrics.json")):
        write_metrics(tmp_path, status="completed")
    assert (tmp_path / "metrics.json").read_bytes() == good


def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path):
    from deqrun.runner.checkpoint import save_checkpoint
    from deqrun.runner.progress import Progress

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, model, optimizer, scheduler, Progress(step=1), {"model": {}})
    good = path.read_bytes()
    (tmp_path / "checkpoints" / "last.pt.tmp").mkdir()
    with pytest.raises(WriteError, match=str(path)):
        save_checkpoint(path, model, optimizer, scheduler, Progress(step=2), {"model": {}})
    assert path.read_bytes() == good


# ---- strict files and checks in process ------------------------------------------------------
def test_non_finite_numbers_become_null_with_a_flag(tmp_path):
    write_metrics(tmp_path, status="running", final={"loss": float("nan"), "ok": 1.5},
                  history=[{"x": float("inf")}])
    content = strict_metrics(tmp_path)
    assert content["final"] == {"loss": None, "ok": 1.5}
    assert content["nonfinite"] == ["final.loss", "history[0].x"]
    write_metrics(tmp_path, status="completed", final={"loss": 1.0})
    assert "nonfinite" not in strict_metrics(tmp_path)


@pytest.mark.parametrize("name", ["jsonl", "csv"])
def test_logs_stay_strict_and_resume_drops_records_after_the_checkpoint(tmp_path, name):
    logger = build_logger(name, tmp_path, {}, append=False)
    for step in (1, 2, 3):
        logger.log("step", {"step": step, "epoch": 1, "loss": float("nan") if step == 2 else 1.0})
    logger.close()
    logger = build_logger(name, tmp_path, {}, append=True, resume_at=(1, 0))
    logger.log("step", {"step": 2, "epoch": 1, "loss": 0.5})
    logger.close()
    text = (tmp_path / f"steps.{name}").read_text()
    if name == "jsonl":
        rows = [strict_loads(line) for line in text.splitlines()]
    else:
        rows = list(csv.DictReader(io.StringIO(text)))
    assert [int(row["step"]) for row in rows] == [1, 2]
    assert float(rows[1]["loss"]) == 0.5


def test_the_nan_record_is_flagged_in_both_formats(tmp_path):
    for name in ("jsonl", "csv"):
        logger = build_logger(name, tmp_path, {}, append=False)
        logger.log("step", {"step": 1, "loss": 1.0})
        logger.log("step", {"step": 2, "loss": float("inf")})
        logger.close()
    line = strict_loads((tmp_path / "steps.jsonl").read_text().splitlines()[1])
    assert line["loss"] is None and line["nonfinite"] == ["loss"]
    rows = list(csv.DictReader(io.StringIO((tmp_path / "steps.csv").read_text())))
    assert rows[1]["loss"] == "" and rows[1]["nonfinite"] == "loss"


def test_checkpoint_readers_refuse_damage_in_one_line(tmp_path):
    from deqrun.runner.checkpoint import check_compatible, read_checkpoint

    path = tmp_path / "last.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        read_checkpoint(path, torch.device("cpu"))
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="not a deqrun checkpoint"):
        read_checkpoint(path, torch.device("cpu"))
    state = {"fingerprint": {"model.width": 8, "optim.name": "adam"}}
    resolved = {"model": {"width": 16}, "optim": {"name": "adam"}}
    with pytest.raises(CheckpointError, match=r"model.width \(8 -> 16\)"):
        check_compatible(path, state, resolved, force=False)
    assert check_compatible(path, state, resolved, force=True)


def test_a_live_lock_refuses_and_a_stale_one_is_taken_over(tmp_path):
    from deqrun.runner.folder import acquire_lock

    lock = acquire_lock(tmp_path)
    with pytest.raises(RunFolderError, match="in use by pid"):
        acquire_lock(tmp_path)
    lock.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    assert acquire_lock(tmp_path) == lock
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert read_metrics(tmp_path) is None


# ---- convergence figures in the records ---------------------------------------------------------
@pytest.mark.parametrize("tol,converged", [(1e9, 1.0), (1e-30, 0.0)])
def test_convergence_share_and_median_steps_follow_the_tolerance(tmp_path, tol, converged):
    """A tolerance every solve meets stops all of them after one step; one none can meet leaves
    every sample unconverged at the full eval budget."""
    args = [*FAST, "solver=anderson", "solver.stop_mode=abs", f"solver.f_tol={tol}",
            f"solver.eval_f_tol={tol}", "solver.eval_f_max_iter=7", "run_name=conv"]
    result = deqrun(args, tmp_path)
    assert result.returncode == 0, result.stderr
    final = strict_metrics(tmp_path / "outputs" / "runs" / "conv")["final"]
    assert final["eval_converged"] == converged
    assert final["train_converged"] == converged
    assert final["eval_steps_median"] == (7.0 if converged == 0.0 else 1.0)


def test_metrics_json_is_rewritten_at_evaluations_and_checkpoints_not_every_epoch(
        tmp_path, monkeypatch):
    """A full-batch task has one step per epoch: rewriting the whole history after each would
    cost more than the step. Epochs 3 and 6 are evaluated, none other is checkpointed."""
    from deqrun.runner import loop

    writes = []
    real = loop.write_metrics

    def counted(run_dir, /, fresh=False, **fields):
        if "history" in fields:
            writes.append((fields["status"], len(fields["history"])))
        return real(run_dir, fresh=fresh, **fields)

    monkeypatch.setattr(loop, "write_metrics", counted)
    args = [*FAST, "trainer.epochs=6", "trainer.eval_every=3", "trainer.checkpoint_every=6"]
    result = deqrun([*args, "run_name=cadence"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert writes == [("running", 3), ("running", 6), ("completed", 6)]
    metrics = strict_metrics(tmp_path / "outputs" / "runs" / "cadence")
    assert [h["epoch"] for h in metrics["history"]] == [1, 2, 3, 4, 5, 6]
    writes.clear()
    monkeypatch.setattr(loop, "METRICS_EVERY_S", 0.0)  # due at once: every epoch
    result = deqrun([*args, "run_name=every"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert writes == [("running", n) for n in range(1, 7)] + [("completed", 6)]
