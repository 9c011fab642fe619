"""deqrun-report: a sweep's run folders -> table.md and table.csv, beside the papers' numbers.

    python -m deqrun.report SWEEP_DIR [--paper NAME ...] [--out DIR]

SWEEP_DIR holds one folder per job (metrics.json and the resolved config in it), as `deqrun
table=...` writes them; a folder of sweeps (e.g. outputs/tables/phantom-smoke) means its newest one.
Runs are grouped into rows by the `row` of their config (experiment/ presets), or else by grad
method with k and lambda; numbers are averaged over the completed seeds. The rows and seeds a
table expects come from the `report` key of the run configs (or of the sweep's multirun.yaml), so
failed, interrupted and missing runs are listed by name, and rows without a finished run still
appear. Paper numbers come from configs/paper/NAME.yaml.

Optional `report` keys for tables swept over more than rows and seeds (the IGNN table: rows x data
sets x folds):
- group_by: config keys (e.g. [task.dataset]); the table has one block of rows per value, with
  speed and memory ratios to the baseline row of the same block and the paper's number looked up
  as rows.<row>.<value> in the paper file (else rows.<row>); groups: the expected values, in order.
- replicate_key: the config key averaged over (default trainer.seed; e.g. task.fold), whose
  expected values are `seeds`.
- paper_group: for a table without group_by, the paper's group to read (rows.<row>.<value>),
  e.g. PPI.
- metrics: `final` keys shown as columns under their own names (mean ± std over the replicates,
  times metric_scale), e.g. [test_accuracy_val_selected, test_accuracy_max_over_epochs], in place
  of the headline and best-epoch columns.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from deqrun.errors import UserError

PACKAGE_DIR = Path(__file__).resolve().parent
EXIT_USER_ERROR = 2
COMPLETED = "completed"


class ReportError(UserError):
    """The sweep folder or the paper numbers cannot make a table; one readable line."""


@dataclass
class Run:
    """One job folder: where it belongs in the table, its status and its final numbers."""

    folder: str
    row: str
    label: str
    method: str
    seed: Any  # the replicate: trainer.seed, or the config value at report.replicate_key
    status: str
    final: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    group: str = ""  # the values of report.group_by ("" without grouping)


@dataclass
class Row:
    """A table row: its runs and the seeds the table expected but found no folder for."""

    id: str
    label: str
    runs: list[Run] = field(default_factory=list)
    missing_seeds: list[Any] = field(default_factory=list)
    expected: int | None = None
    group: str = ""  # the block of a grouped table (report.group_by), "" otherwise

    @property
    def key(self) -> str:
        """Where the row's stats are: its id, or 'group / id' in a grouped table."""
        return row_key(self.group, self.id)

    @property
    def completed(self) -> list[Run]:
        return [run for run in self.runs if run.status == COMPLETED]


def row_key(group: str, row_id: str) -> str:
    return f"{group} / {row_id}" if group else row_id


# ---- reading the sweep -------------------------------------------------------------------------
def is_job_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "metrics.json").is_file()
                              or (path / ".hydra" / "config.yaml").is_file())


def job_folders(sweep: Path) -> list[Path]:
    """The sweep's job folders (hidden ones such as .submitit left out)."""
    return sorted(p for p in sweep.iterdir() if not p.name.startswith(".") and is_job_folder(p))


def find_sweep(path: Path) -> Path:
    """`path` itself if it holds job folders, else its newest sweep (folders sort by timestamp)."""
    if not path.is_dir():
        raise ReportError(f"{path} is not a folder")
    if job_folders(path):
        return path
    sweeps = [p for p in sorted(path.iterdir()) if p.is_dir() and job_folders(p)]
    if not sweeps:
        raise ReportError(f"no runs in {path}: no job folder with metrics.json or .hydra/ in it "
                          "or in its subfolders")
    print(f"deqrun-report: using the newest sweep, {sweeps[-1]}", file=sys.stderr)
    return sweeps[-1]


def read_metrics(folder: Path) -> tuple[dict[str, Any], str | None]:
    """metrics.json's content and, if it is missing or unreadable, the status that says so."""
    path = folder / "metrics.json"
    if not path.is_file():
        return {}, "no metrics.json"
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as error:
        return {}, f"unreadable metrics.json ({error})"
    if not isinstance(content, dict):
        return {}, "unreadable metrics.json (not an object)"
    return content, None


def read_job_config(folder: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """The resolved config from metrics.json, else the job's .hydra/config.yaml (unresolved)."""
    if isinstance(metrics.get("config"), dict):
        return metrics["config"]
    path = folder / ".hydra" / "config.yaml"
    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (OSError, yaml.YAMLError):
        return {}


def grad_signature(grad: dict[str, Any] | None) -> str:
    """'upg k=5 lambda=0.5', 'implicit', ...: the grad method with its k and lambda."""
    if not grad:
        return "unknown"
    parts = [str(grad.get("name", "unknown"))]
    parts += [f"{short}={grad[key]}" for short, key in (("k", "k"), ("lambda", "lambda_"))
              if grad.get(key) is not None]
    return " ".join(parts)


def config_value(config: dict[str, Any], dotted: str) -> Any:
    """config['a']['b'] for 'a.b', None where a key is missing."""
    value: Any = config
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def group_keys(meta: dict[str, Any] | None) -> list[str]:
    keys = (meta or {}).get("group_by") or []
    return [str(keys)] if isinstance(keys, str) else [str(key) for key in keys]


def replicate_key(meta: dict[str, Any] | None) -> str:
    return str((meta or {}).get("replicate_key") or "trainer.seed")


def expected_runs(meta: dict[str, Any]) -> int:
    """Jobs the table expects: rows x groups x seeds (replicates); 0 if it does not say."""
    groups = len(meta.get("groups") or []) if group_keys(meta) else 1
    return len(meta.get("rows") or []) * groups * len(meta.get("seeds") or [])


def load_run(folder: Path, meta: dict[str, Any] | None = None) -> Run:
    """A job folder as a Run; a missing or broken metrics.json becomes its status. `meta` (the
    table's report metadata) says which config keys group runs and which one is the replicate."""
    metrics, problem = read_metrics(folder)
    config = read_job_config(folder, metrics)
    method = grad_signature(config.get("grad"))
    row = config.get("row") or {}
    row = {"id": row} if isinstance(row, str) else row
    seed = config_value(config, replicate_key(meta))
    group = ", ".join(str(config_value(config, key)) for key in group_keys(meta))
    return Run(folder=folder.name, row=str(row.get("id") or method),
               label=str(row.get("label") or row.get("id") or method), method=method,
               seed=seed, status=problem or str(metrics.get("status", "no status")),
               final=metrics.get("final") or {}, error=metrics.get("error"), group=group)


def table_meta(sweep: Path, folders: list[Path]) -> dict[str, Any]:
    """The table's `report` metadata: from a run's config, else from the sweep's multirun.yaml."""
    for folder in folders:
        metrics, _ = read_metrics(folder)
        meta = read_job_config(folder, metrics).get("report")
        if isinstance(meta, dict):
            return meta
    multirun = sweep / "multirun.yaml"
    if multirun.is_file():
        meta = OmegaConf.to_container(OmegaConf.load(multirun), resolve=False).get("report")
        if isinstance(meta, dict):
            return meta
    return {}


# ---- rows and numbers ---------------------------------------------------------------------------
def build_rows(runs: list[Run], meta: dict[str, Any], group: str = "") -> list[Row]:
    """Rows in the table's order, then any others; expected seeds without a folder are missing."""
    seeds = list(meta.get("seeds") or [])
    rows = {str(row_id): Row(id=str(row_id), label=str(row_id), expected=len(seeds) or None,
                             group=group)
            for row_id in meta.get("rows") or []}
    for run in sorted(runs, key=lambda r: (r.seed is None, str(type(r.seed)), r.seed or 0,
                                           r.folder)):
        row = rows.setdefault(run.row, Row(id=run.row, label=run.label, group=group))
        row.label = run.label
        row.runs.append(run)
    for row in rows.values():
        if row.expected:
            found = {run.seed for run in row.runs}
            row.missing_seeds = [seed for seed in seeds if seed not in found]
    return list(rows.values())


def build_groups(runs: list[Run], meta: dict[str, Any]) -> list[Row]:
    """The rows of every group (report.group_by) in the order of report.groups, then others."""
    if not group_keys(meta):
        return build_rows(runs, meta)
    groups = list(dict.fromkeys([str(g) for g in meta.get("groups") or []]
                                + [run.group for run in runs]))
    return [row for group in groups
            for row in build_rows([run for run in runs if run.group == group], meta, group)]


def memory_measure(runs: list[Run]) -> tuple[str, str]:
    """Which bytes to compare (peak GPU memory, or on CPU the bytes saved for backward) and why."""
    kinds = {run.final.get("peak_memory_kind") for run in runs if run.status == COMPLETED}
    if kinds == {"cuda_max_allocated"}:
        return "peak_memory_bytes", ("memory is the peak GPU memory of a training step "
                                     "(torch.cuda.max_memory_allocated).")
    return "saved_bytes", ("CPU runs: memory is the bytes of the tensors autograd saves for "
                           "backward in a training step (saved_bytes), not a peak: the CPU peak "
                           "(process RSS) measures the whole process, not the gradient method, and "
                           "leaves out the backward solver's own buffers.")


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


@dataclass(frozen=True)
class Headline:
    """The table's headline metric, from the `report` metadata (default: test accuracy in %).

    report.metric names the task metric (accuracy, perplexity, f1, psnr, ...); metric_key and
    best_key the `final` entries averaged (default test_<metric>, best_test_<metric>); scale
    multiplies them (100 for accuracy); label and best_label head the columns; the paper's
    number is read under paper_key (default: the metric's name, `accuracy` for accuracy);
    report.metrics, if given, lists the `final` keys shown (each under its own name, mean ± std)
    in place of the headline and best-epoch columns.
    """

    key: str = "test_accuracy"
    best_key: str = "best_test_accuracy"
    scale: float = 100.0
    label: str = "test acc. %"
    best_label: str = "best-epoch acc. %"
    paper_key: str = "accuracy"
    metrics: tuple[str, ...] = ()

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Headline:
        metric = str(meta.get("metric") or "accuracy")
        if metric == "accuracy":
            default = cls()
        else:
            default = cls(f"test_{metric}", f"best_test_{metric}", 1.0, f"test {metric}",
                          f"best-epoch {metric}", metric)
        return cls(key=str(meta.get("metric_key") or default.key),
                   best_key=str(meta.get("best_key") or default.best_key),
                   scale=float(meta.get("metric_scale") or default.scale),
                   label=str(meta.get("metric_label") or default.label),
                   best_label=str(meta.get("best_label") or default.best_label),
                   paper_key=str(meta.get("paper_key") or default.paper_key),
                   metrics=tuple(str(key) for key in meta.get("metrics") or ()))


def row_stats(row: Row, memory_key: str, headline: Headline | None = None,
              ) -> dict[str, float | None]:
    """Means over the row's completed runs (the headline metric with its sample std over seeds)."""
    headline = headline or Headline()

    def values(key: str, scale: float = 1.0) -> list[float]:
        return [run.final[key] * scale for run in row.completed
                if isinstance(run.final.get(key), (int, float))]

    accuracy = values(headline.key, headline.scale)
    extra = {}
    for key in headline.metrics:
        numbers = values(key, headline.scale)
        extra[key] = _mean(numbers)
        extra[f"{key}_std"] = statistics.stdev(numbers) if len(numbers) > 1 else None
    return dict(**extra, accuracy=_mean(accuracy),
                accuracy_std=statistics.stdev(accuracy) if len(accuracy) > 1 else None,
                best_accuracy=_mean(values(headline.best_key, headline.scale)),
                samples_per_s=_mean(values("samples_per_s")),
                forward_ms=_mean(values("forward_ms")), backward_ms=_mean(values("backward_ms")),
                memory_bytes=_mean(values(memory_key)),
                forward_nstep=_mean(values("forward_nstep")),
                backward_nstep=_mean(values("backward_nstep")),
                fallback_fraction=_mean(values("fallback_fraction")),
                grad_cosine=_mean(values("grad_cosine")))


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


def ratios(stats: dict[str, float | None], base: dict[str, float | None]) -> dict[str, Any]:
    """Speed and memory relative to the baseline row: > 1 is faster, resp. more memory."""
    return dict(train_speed=_ratio(stats["samples_per_s"], base["samples_per_s"]),
                backward_speed=_ratio(base["backward_ms"], stats["backward_ms"]),
                peak_memory=_ratio(stats["memory_bytes"], base["memory_bytes"]))


# ---- paper numbers ------------------------------------------------------------------------------
def paper_dir() -> Path:
    """configs/paper inside the installed package, or at the top of a source checkout."""
    for candidate in (PACKAGE_DIR / "configs" / "paper", PACKAGE_DIR.parent / "configs" / "paper"):
        if candidate.is_dir():
            return candidate
    raise ReportError(f"deqrun's configs/paper folder is missing next to {PACKAGE_DIR}")


def load_papers(names: list[str]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Paper numbers per row id (the first paper that has the row wins) and each paper's title
    (with its protocol, if the file states one)."""
    numbers: dict[str, dict[str, Any]] = {}
    titles: dict[str, str] = {}
    for name in names:
        path = paper_dir() / f"{name}.yaml"
        if not path.is_file():
            available = ", ".join(sorted(p.stem for p in paper_dir().glob("*.yaml")))
            raise ReportError(f"no paper numbers named {name!r}; available: {available}")
        content = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        titles[name] = str(content.get("title", name))
        if content.get("protocol"):
            titles[name] += f"; protocol: {content['protocol']}"
        for row_id, values in (content.get("rows") or {}).items():
            numbers.setdefault(str(row_id), dict(values, paper=name))
    return numbers, titles


# ---- the table ----------------------------------------------------------------------------------
@dataclass
class Table:
    """Everything table.md and table.csv show."""

    sweep: Path
    meta: dict[str, Any]
    rows: list[Row]
    stats: dict[str, dict[str, Any]]  # per Row.key (the row id, or 'group / id' when grouped)
    baseline: str
    memory_note: str
    papers: dict[str, dict[str, Any]]
    titles: dict[str, str]
    headline: Headline = field(default_factory=Headline)


def default_baseline(rows: list[Row]) -> str:
    """The first row trained with exact implicit gradients, else 'implicit'."""
    for row in rows:
        if any(run.method == "implicit" for run in row.runs):
            return row.id
    return "implicit"


def build_table(sweep: Path, paper_names: list[str] | None = None) -> Table:
    """Read every job folder of `sweep` and aggregate it into rows beside the papers' numbers."""
    folders = job_folders(sweep) if sweep.is_dir() else []
    if not folders:
        raise ReportError(f"no runs in {sweep}: no job folder with metrics.json or .hydra/")
    meta = table_meta(sweep, folders)
    rows = build_groups([load_run(folder, meta) for folder in folders], meta)
    memory_key, memory_note = memory_measure([run for row in rows for run in row.runs])
    headline = Headline.from_meta(meta)
    stats = {row.key: row_stats(row, memory_key, headline) for row in rows}
    baseline = str(meta.get("baseline") or default_baseline(rows))
    for row in rows:  # ratios to the baseline row of the same group
        base = stats.get(row_key(row.group, baseline))
        stats[row.key].update(ratios(stats[row.key], base) if base else
                              dict.fromkeys(("train_speed", "backward_speed", "peak_memory")))
    names = list(meta.get("papers") or []) if paper_names is None else paper_names
    papers, titles = load_papers(names)
    return Table(sweep=sweep, meta=meta, rows=rows, stats=stats, baseline=baseline,
                 memory_note=memory_note, papers=papers, titles=titles, headline=headline)


def _number(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def paper_entry(table: Table, row: Row) -> dict[str, Any]:
    """The paper's numbers for the row: rows.<row>.<group> when the paper has them per group."""
    entry = table.papers.get(row.id, {})
    group = row.group or str(table.meta.get("paper_group") or "")
    if group and isinstance(entry.get(group), dict):
        return dict(entry[group], paper=entry.get("paper"))
    return entry


def _paper(table: Table, row: Row, key: str) -> str:
    """The paper's number, with its std where the paper file gives one (<key>_std)."""
    entry = paper_entry(table, row)
    value, spread = entry.get(key), entry.get(f"{key}_std")
    if value is None:
        return "–"
    return f"{value} ± {spread}" if spread is not None else str(value)


def _accuracy(stats: dict[str, Any], key: str = "accuracy") -> str:
    if stats[key] is None:
        return "–"
    spread = "" if stats[f"{key}_std"] is None else f" ± {stats[f'{key}_std']:.2f}"
    return f"{stats[key]:.2f}{spread}"


def _grouped(table: Table) -> bool:
    return bool(group_keys(table.meta))


def _group_cells(table: Table, row: Row) -> list[str]:
    return [row.group] if _grouped(table) else []


def _group_header(table: Table) -> list[str]:
    return [" / ".join(group_keys(table.meta))] if _grouped(table) else []


def _methods(row: Row) -> str:
    return " / ".join(dict.fromkeys(run.method for run in row.runs)) or "–"


def _markdown_table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in body]


def main_table(table: Table) -> list[str]:
    """Our accuracy and ratios, each beside the paper's."""
    base = table.baseline
    h = table.headline
    metrics = list(h.metrics) or [h.label, h.best_label]
    header = [*_group_header(table), "row", "method", "runs", *metrics, f"paper {h.paper_key}",
              f"train speed (x {base})", "paper", f"backward speed (x {base})", "paper",
              f"memory (x {base}) [1]", "paper"]
    body = []
    for row in table.rows:
        s = table.stats[row.key]
        runs = f"{len(row.completed)}/{row.expected or len(row.runs)}"
        ours = [_accuracy(s, key) for key in h.metrics] or [_accuracy(s),
                                                            _number(s["best_accuracy"])]
        body.append([*_group_cells(table, row), row.label, _methods(row), runs, *ours,
                     _paper(table, row, h.paper_key),
                     _number(s["train_speed"]), _paper(table, row, "train_speed"),
                     _number(s["backward_speed"]), _paper(table, row, "backward_speed"),
                     _number(s["peak_memory"]), _paper(table, row, "peak_memory")])
    return _markdown_table(header, body)


# Columns of the measured table shown only when some row has the number: (stats key, header,
# scale, digits). SHINE's fallback fraction, and the cosine with the exact gradient
# (trainer.precision_every).
GRADIENT_COLUMNS = (("fallback_fraction", "fallback % [2]", 100.0, 1),
                    ("grad_cosine", "cosine with exact [3]", 1.0, 3))


def gradient_columns(table: Table) -> list[tuple[str, str, float, int]]:
    return [column for column in GRADIENT_COLUMNS
            if any(s.get(column[0]) is not None for s in table.stats.values())]


def measured_table(table: Table) -> list[str]:
    """The absolute numbers behind the ratios (and the gradient columns some row has)."""
    extra = gradient_columns(table)
    header = [*_group_header(table), "row", "samples/s", "forward ms", "backward ms",
              "memory MB [1]", "forward steps", "backward steps", *(column[1] for column in extra)]
    body = []
    for row in table.rows:
        s = table.stats[row.key]
        memory = None if s["memory_bytes"] is None else s["memory_bytes"] / 2**20
        body.append([*_group_cells(table, row), row.label, _number(s["samples_per_s"], 1),
                     _number(s["forward_ms"], 1),
                     _number(s["backward_ms"], 1), _number(memory, 1),
                     _number(s["forward_nstep"], 1), _number(s["backward_nstep"], 1),
                     *(_number(None if s[key] is None else s[key] * scale, digits)
                       for key, _, scale, digits in extra)])
    return _markdown_table(header, body)


def not_averaged(table: Table) -> list[str]:
    """One line per run left out of the averages: failed, interrupted, unfinished or missing."""
    lines = []
    replicate = _replicate_name(table.meta)
    for row in table.rows:
        name = f"{row.group}, {row.label}" if row.group else row.label
        for run in row.runs:
            if run.status != COMPLETED:
                reason = f": {run.error}" if run.error else ""
                lines.append(f"- {name}, {replicate} {run.seed} ({run.folder}): "
                             f"**{run.status}**{reason}")
        lines += [f"- {name}, {replicate} {seed}: **missing** (no run folder in the sweep)"
                  for seed in row.missing_seeds]
    return lines


def _replicate_name(meta: dict[str, Any]) -> str:
    """'seed' for trainer.seed, else the replicate key's last part (task.fold -> fold)."""
    return replicate_key(meta).split(".")[-1]


def runs_section(table: Table) -> list[str]:
    lines = not_averaged(table)
    if not lines:
        total = sum(len(row.runs) for row in table.rows)
        return [f"All {total} runs completed."]
    return ["Runs not in the averages:", "", *lines]


def notes(table: Table) -> list[str]:
    """What each number means, and where the papers' numbers come from."""
    h, replicates = table.headline, f"{_replicate_name(table.meta)}s"
    if h.metrics:
        first = (f"{', '.join(f'`{key}`' for key in h.metrics)}: these entries of each run's "
                 f"final metrics (x {h.scale:g}), mean ± sample standard deviation over the "
                 f"completed {replicates}.")
    else:
        first = (f"{h.label}: the final evaluation's `{h.key}`, mean ± sample "
                 f"standard deviation over the completed seeds; {h.best_label}: "
                 f"`{h.best_key}`, the best evaluated epoch (the phantom paper's protocol).")
    within = (f" (within each {' / '.join(group_keys(table.meta))})" if _grouped(table)
              else "")
    lines = [
        first,
        f"Ratios to the row '{table.baseline}'{within}, from the means over "
        f"{replicates if h.metrics else 'seeds'}: train speed = samples/s"
        f" / {table.baseline}'s; backward speed = {table.baseline}'s backward ms / the row's; "
        f"memory = the row's bytes / {table.baseline}'s. Timings are means per training step, "
        "leaving out the first step and pretraining steps.",
        f"[1] {table.memory_note}",
    ]
    keys = [column[0] for column in gradient_columns(table)]
    if "fallback_fraction" in keys:
        lines.append("[2] SHINE with fallback: the fraction of samples whose SHINE direction was "
                     "replaced by the Jacobian-free one (||w|| > fallback_threshold x ||grad||), "
                     "mean over training steps and seeds; – for rows without a fallback.")
    if "grad_cosine" in keys:
        lines.append("[3] Cosine between the row's parameter gradient and the exact implicit one "
                     "(tight Anderson backward solve) on the same batch and z*, measured every "
                     "`trainer.precision_every` training steps; mean over checks and seeds.")
    if not any(table.stats[row.key]["accuracy"] is not None for row in table.rows
               if row.id == table.baseline):
        lines.append(f"No completed run of the row '{table.baseline}': no ratios.")
    extra = table.meta.get("note") or []
    lines += [str(extra)] if isinstance(extra, str) else [str(line) for line in extra]
    for name, title in table.titles.items():
        rows = list(dict.fromkeys(row.label for row in table.rows
                                  if paper_entry(table, row).get("paper") == name))
        if rows:
            lines.append(f"Paper numbers for {', '.join(rows)}: {title} (configs/paper/{name}.yaml;"
                         " its ratios are to its own implicit row).")
    return [f"- {line}" for line in lines]


def render_markdown(table: Table) -> str:
    title = table.meta.get("title") or f"Sweep {table.sweep.name}"
    lines = [f"# {title}", "", f"Sweep: `{table.sweep}`", "", *main_table(table), "",
             *measured_table(table), "", *runs_section(table), "", "Notes:", "", *notes(table)]
    return "\n".join(lines) + "\n"


CSV_FIELDS = ("row", "label", "method", "metric", "completed", "expected", "accuracy",
              "accuracy_std",
              "best_accuracy", "samples_per_s", "forward_ms", "backward_ms", "memory_bytes",
              "forward_nstep", "backward_nstep", "train_speed", "backward_speed", "peak_memory",
              "fallback_fraction", "grad_cosine", "paper", "paper_accuracy", "paper_train_speed",
              "paper_backward_speed", "paper_peak_memory", "not_averaged")


def csv_fields(table: Table) -> list[str]:
    """CSV_FIELDS, after a `group` column and before the report.metrics columns when set."""
    metrics = [name for key in table.headline.metrics for name in (key, f"{key}_std")]
    return ["group"] * _grouped(table) + list(CSV_FIELDS[:8]) + metrics + list(CSV_FIELDS[8:])


def csv_rows(table: Table) -> list[dict[str, Any]]:
    """One dict per row: our numbers, the paper's, and the runs left out (seed:status)."""
    records = []
    replicate = _replicate_name(table.meta)
    fields = set(csv_fields(table))
    for row in table.rows:
        paper = paper_entry(table, row)
        left_out = [f"{replicate}{run.seed}:{run.status}" for run in row.runs
                    if run.status != COMPLETED]
        left_out += [f"{replicate}{seed}:missing" for seed in row.missing_seeds]
        record = dict(row=row.id, label=row.label, method=_methods(row), metric=table.headline.key,
                      completed=len(row.completed), expected=row.expected or len(row.runs),
                      paper=paper.get("paper", ""), not_averaged=";".join(left_out))
        if _grouped(table):
            record["group"] = row.group
        record.update({k: v for k, v in table.stats[row.key].items() if k in fields})
        record.update({f"paper_{k}": paper.get(k) for k in
                       ("train_speed", "backward_speed", "peak_memory")})
        record["paper_accuracy"] = paper.get(table.headline.paper_key)
        records.append(record)
    return records


def write_report(table: Table, out: Path) -> tuple[Path, Path]:
    """Write table.md and table.csv into `out`; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    markdown, spreadsheet = out / "table.md", out / "table.csv"
    markdown.write_text(render_markdown(table))
    with spreadsheet.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=csv_fields(table))
        writer.writeheader()
        writer.writerows(csv_rows(table))
    return markdown, spreadsheet


# ---- command line -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="deqrun-report", description="Turn a sweep's run folders into table.md and table.csv "
        "beside the papers' numbers.")
    parser.add_argument("sweep_dir", type=Path, help="a sweep folder, or a folder of sweeps "
                        "(its newest is used)")
    parser.add_argument("--paper", action="append", metavar="NAME",
                        help="paper numbers from configs/paper/NAME.yaml (repeatable; default: "
                        "the table's report.papers)")
    parser.add_argument("--out", type=Path, help="where to write table.md and table.csv "
                        "(default: the sweep folder)")
    return parser.parse_args(argv)


def run(argv: list[str] | None = None) -> int:
    """The command: returns the exit status (2 for a folder without runs or unknown papers)."""
    args = parse_args(argv)
    try:
        sweep = find_sweep(args.sweep_dir)
        table = build_table(sweep, args.paper)
    except ReportError as error:
        print(f"deqrun-report: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    markdown, spreadsheet = write_report(table, args.out or sweep)
    print(markdown.read_text())
    print(f"deqrun-report: wrote {markdown} and {spreadsheet}", file=sys.stderr)
    return 0


def main() -> None:
    """Console entry point (deqrun-report)."""
    sys.exit(run())


if __name__ == "__main__":
    main()
