"""The deqrun command in subprocesses, with outputs in a temporary folder."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

FAST = ["trainer.epochs=1", "task.subset=128", "trainer.batch_size=64", "solver.f_max_iter=5",
        "trainer.eval_batch_size=512"]


def deqrun(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "deqrun.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, **kwargs)


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_single_run_writes_metrics_logs_and_checkpoint(tmp_path):
    result = deqrun([*FAST, "run_name=one", "grad=upg", "k=5", "lambda=0.5"], tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "outputs" / "runs" / "one"
    content = metrics(run_dir)
    assert content["status"] == "completed"
    assert content["config"]["grad"] == {"name": "upg", "k": 5, "lambda_": 0.5}
    final = content["final"]
    for key in ("test_accuracy", "samples_per_s", "forward_ms", "backward_ms", "forward_nstep",
                "forward_residual", "saved_bytes", "peak_memory_bytes", "eval_nstep"):
        assert final[key] >= 0, key
    assert 0 < final["forward_nstep"] <= 5 and final["saved_bytes"] > 0
    steps = (run_dir / "steps.jsonl").read_text().splitlines()
    assert len(steps) == 2 and json.loads(steps[0])["step"] == 1
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["step"] == 2


@pytest.mark.parametrize("args,needle", [
    (["model=nope"], "Could not find 'model/nope'"),
    (["grad=upg", "k=-1"], "k must be >= 1"),
    (["solver.f_tol=abc"], "could not be converted to Float"),
    (["typo_key=1"], "typo_key"),
    (["task=cifar10", "task.root=/nonexistent"], "/nonexistent"),
    (["grad=jiio"], "grad=jiio needs a task with an input objective"),
    (["task=image_schema"], "Could not find 'task/image_schema'"),
])
def test_bad_input_exits_non_zero_with_a_readable_message(tmp_path, args, needle):
    result = deqrun(args, tmp_path)
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_multirun_runs_every_combination_and_keeps_results_of_failed_sweeps(tmp_path):
    result = deqrun(["-m", *FAST, "solver=anderson,broyden", "grad=shine,upg",
                     "hydra.sweep.dir=sweep"], tmp_path)
    runs = {p.parent.name: metrics(p.parent)["status"]
            for p in (tmp_path / "sweep").glob("*/metrics.json")}
    assert len(runs) == 4
    failed = [name for name, status in runs.items() if status == "failed"]
    assert len(failed) == 1 and "anderson" in failed[0] and "shine" in failed[0]
    assert result.returncode != 0
    assert "3 of 4 jobs completed" in result.stderr
    assert "Traceback" not in result.stderr


def test_joblib_launcher_sweep(tmp_path):
    result = deqrun(["-m", *FAST, "launcher=joblib", "grad=implicit,jacobian_free",
                     "hydra.sweep.dir=sweep"], tmp_path)
    assert result.returncode == 0, result.stderr
    statuses = [metrics(p.parent)["status"] for p in (tmp_path / "sweep").glob("*/metrics.json")]
    assert statuses == ["completed", "completed"]


def wait_for_steps(path: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= count:
            return
        time.sleep(0.1)
    raise AssertionError(f"{path} did not reach {count} steps")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_killed_run_resumes_to_the_same_final_metrics(tmp_path, signum):
    args = ["trainer.epochs=2", "task.subset=384", "trainer.batch_size=64", "solver.f_max_iter=6"]
    assert deqrun([*args, "run_name=straight"], tmp_path).returncode == 0
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "deqrun.cli", *args, "run_name=cut"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "outputs" / "runs" / "cut"
    wait_for_steps(run_dir / "steps.jsonl", 3, process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, stderr
    assert "trainer.resume=true" in stderr and "Traceback" not in stderr
    assert metrics(run_dir)["status"] == "interrupted"
    stopped_at = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["progress"]
    assert 0 < stopped_at["step_in_epoch"] < 6
    resumed = deqrun([*args, "run_name=cut", "trainer.resume=true"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    a = metrics(tmp_path / "outputs" / "runs" / "straight")["final"]
    b = metrics(run_dir)["final"]
    for key in ("test_accuracy", "test_loss", "train_loss", "train_accuracy", "steps"):
        assert a[key] == b[key], key


def test_resume_without_checkpoint_starts_fresh_but_a_missing_resume_from_is_an_error(tmp_path):
    fresh = deqrun([*FAST, "run_name=never", "trainer.resume=true"], tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    notes = metrics(tmp_path / "outputs" / "runs" / "never")["notes"]
    assert any("started from scratch" in note for note in notes)
    missing = deqrun([*FAST, "trainer.resume_from=/nonexistent/last.pt"], tmp_path)
    assert missing.returncode == 2 and "no checkpoint at /nonexistent/last.pt" in missing.stderr


def test_init_from_starts_a_new_run_from_another_runs_weights(tmp_path):
    first = deqrun([*FAST, "run_name=first"], tmp_path)
    assert first.returncode == 0, first.stderr
    source = tmp_path / "outputs" / "runs" / "first"
    # a learning rate of ~0: the new run's weights stay those it was initialised with
    tuned = deqrun([*FAST, "run_name=tuned", f"trainer.init_from={source}", "optim.lr=1e-12",
                    "trainer.max_steps=1"], tmp_path)
    assert tuned.returncode == 0, tuned.stderr
    run_dir = tmp_path / "outputs" / "runs" / "tuned"
    content = metrics(run_dir)
    assert any(f"initialised from {source}/checkpoints/last.pt" in n for n in content["notes"])
    assert json.loads((run_dir / "steps.jsonl").read_text().splitlines()[0])["step"] == 1
    before = torch.load(source / "checkpoints" / "last.pt", weights_only=True)["model"]
    after = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    params = [k for k in before if "running" not in k and "num_batches" not in k]
    assert all(torch.allclose(before[k], after[k], atol=1e-8) for k in params)
    missing = deqrun([*FAST, "trainer.init_from=/nonexistent"], tmp_path)
    assert missing.returncode == 2
    assert "trainer.init_from=/nonexistent: no checkpoint there" in missing.stderr


def test_max_steps_zero_evaluates_a_trained_run_without_training(tmp_path):
    first = deqrun([*FAST, "run_name=first"], tmp_path)
    assert first.returncode == 0, first.stderr
    source = tmp_path / "outputs" / "runs" / "first"
    again = deqrun([*FAST, "run_name=again", f"trainer.init_from={source}",
                    "trainer.max_steps=0"], tmp_path)
    assert again.returncode == 0, again.stderr
    run_dir = tmp_path / "outputs" / "runs" / "again"
    content, trained = metrics(run_dir), metrics(source)
    assert content["status"] == "completed" and content["final"]["steps"] == 0
    assert content["history"][0]["step"] == 0
    # the same weights evaluated the same way: the trained run's final test metrics
    assert content["final"]["test_accuracy"] == trained["final"]["test_accuracy"]
    assert content["final"]["test_loss"] == pytest.approx(trained["final"]["test_loss"])
    before = torch.load(source / "checkpoints" / "last.pt", weights_only=True)["model"]
    after = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(before[k], after[k]) for k in before)
    done = deqrun([*FAST, "run_name=again", "trainer.max_steps=0", "trainer.resume=true"],
                  tmp_path)
    assert done.returncode == 0 and "nothing to do" in done.stderr
    negative = deqrun([*FAST, "trainer.max_steps=-1"], tmp_path)
    assert negative.returncode == 2 and "trainer.max_steps must be >= 0" in negative.stderr


@pytest.mark.parametrize("logger,files", [("csv", ["steps.csv", "epochs.csv"]),
                                          ("wandb", ["wandb"]), ("tensorboard", ["tensorboard"]),
                                          ("none", [])])
def test_loggers_write_into_the_run_folder(tmp_path, logger, files):
    result = deqrun([*FAST, f"logger={logger}", "run_name=logged"], tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "outputs" / "runs" / "logged"
    for name in files:
        assert (run_dir / name).exists(), name
    if logger == "csv":
        header = (run_dir / "steps.csv").read_text().splitlines()[0].split(",")
        assert {"loss", "forward_ms", "backward_ms", "nstep", "saved_bytes"} <= set(header)
    if logger == "wandb":
        assert list((run_dir / "wandb").glob("offline-run-*"))


def test_trains_on_the_local_cifar10_subset(tmp_path, shared_data):
    root = shared_data / "cifar10-subset"
    result = deqrun(["task=cifar10", f"task.root={root}", "trainer.max_steps=3",
                     "trainer.batch_size=32", "solver.f_max_iter=4", "run_name=cifar",
                     "task.subset=96"], tmp_path)
    assert result.returncode == 0, result.stderr
    content = metrics(tmp_path / "outputs" / "runs" / "cifar")
    assert content["final"]["steps"] == 3 and content["config"]["task"]["name"] == "cifar10"


def test_a_fresh_run_reusing_a_name_starts_its_logs_anew(tmp_path):
    for overwrite in ("false", "true"):
        result = deqrun([*FAST, "run_name=twice", f"trainer.overwrite={overwrite}"], tmp_path)
        assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "outputs" / "runs" / "twice"
    assert len((run_dir / "steps.jsonl").read_text().splitlines()) == 2
    assert len(metrics(run_dir)["history"]) == 1
