"""Grids of compression runs from one YAML file (tasks × methods × ratios × seeds), resumable.

A sweep first fine-tunes the dense model once per task (the first seed): that run is the start
of every compression run of the task, the reference of "vs dense" and the teacher of KD
variants. Each finished run leaves ``<results>/<run>.json`` (its ``metrics.json`` plus the sweep's
labels); a run whose JSON exists is skipped, and an interrupted one resumes from its checkpoint,
so running the same sweep again finishes it. Model folders are not results: in a new checkout,
a dense start that some remaining run needs is fine-tuned again (same config and seed) and
checked against its recorded score.

Example config (paths are relative to the config file)::

    name: mr-2x
    results: ../results/mr-2x           # one JSON per run
    outputs: ../outputs/sweeps/mr-2x     # model folders (not committed)
    keep_models: false                   # delete compressed models once their JSON is written
    train: {epochs: 1}                   # TrainConfig fields for every run
    dense: {epochs: 3}                   # ... overridden for the dense start
    tasks:
      mr: {}
      sst2: {data_dir: ../../shared/data/glue/SST-2, max_train: 20000}
    methods:
      - svd
      - ds-conventional
      - dsformer
      - {label: dsformer+kd, method: dsformer, teacher: true}
      - {label: svd-stf, method: svd, trainer: stf}
      - {method: nm, ratios: [2], seeds: [0]}   # a method's own axes replace the sweep's
      - {method: dsformer, seeds: [1, 2], tasks: [sst2]}   # ... tasks too (a subset of the sweep's)
    ratios: [2, 2.8]
    seeds: [0, 1, 2]

    >>> from dsformer.harness.sweep import MethodSpec
    >>> MethodSpec.parse({"label": "dsformer+kd", "method": "dsformer", "teacher": True}).teacher
    True
"""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from dsformer.errors import DsformerError
from dsformer.files import atomic_write_text
from dsformer.harness.finetune import RunConfig, check_run, finetune, has_checkpoint
from dsformer.harness.healing import check_lm_run
from dsformer.harness.lm import is_lm_task, task_label
from dsformer.harness.methods import COMPRESSION, POST_TRAINING
from dsformer.harness.results import measured_ratios
from dsformer.harness.tasks import task_spec
from dsformer.harness.training import TrainConfig
from dsformer.stf import Schedule
from dsformer.structures.budget import check_ratio

_TRAIN_FIELDS = {f.name for f in fields(TrainConfig)} - {"seed", "progress"}
_SCHEDULE_FIELDS = {f.name for f in fields(Schedule)}
_TOP_KEYS = {
    *("name", "model", "results", "outputs", "keep_models"),
    *("train", "dense", "tasks", "methods", "ratios", "seeds"),
}


class SweepError(DsformerError):
    """A sweep config that cannot be run."""


@dataclass(frozen=True)
class MethodSpec:
    """One line of the grid's method axis: a method with its trainer, KD and STF schedule."""

    label: str
    method: str
    trainer: str | None = None
    teacher: bool = False  # distil from the task's dense run
    schedule: dict[str, Any] = field(default_factory=dict)
    ratios: tuple[float, ...] | None = None  # this method's own ratio axis (None: the sweep's)
    seeds: tuple[int, ...] | None = None
    fisher: bool = False  # weight the fits by Fisher information (dsformer.harness.prepare)
    calibrate: bool | None = None  # fit each layer's output on the training inputs (None: the method's default)
    global_budget: bool = False  # the ratio of all targets together, each layer's chosen
    tasks: tuple[str, ...] | None = None  # this method's own tasks (None: every task of the sweep)

    @classmethod
    def parse(cls, entry: str | dict[str, Any]) -> MethodSpec:
        if isinstance(entry, str):
            entry = {"method": entry}
        if not isinstance(entry, dict) or "method" not in entry:
            raise SweepError(f"methods: {entry!r} is neither a method name nor a mapping with 'method'")
        flags = ("fisher", "calibrate", "global_budget")
        known = {"label", "method", "trainer", "teacher", "schedule", "ratios", "seeds", *flags, "tasks"}
        unknown = set(entry) - known
        if unknown:
            raise SweepError(f"methods: unknown key(s) {sorted(unknown)} in {entry!r}")
        # dense: each task's start, planned by the sweep; an LM grid may list it (the pretrained model trained
        # by the grid's recipe, the reference of its healed runs)
        known_methods = [*COMPRESSION, *POST_TRAINING]
        if entry["method"] not in known_methods:
            names = ", ".join(known_methods)
            raise SweepError(f"methods: {entry['method']!r} is not a compression method ({names})")
        schedule = dict(entry.get("schedule") or {})
        if set(schedule) - _SCHEDULE_FIELDS:
            raise SweepError(f"methods: unknown schedule key(s) {sorted(set(schedule) - _SCHEDULE_FIELDS)}")
        teacher = bool(entry.get("teacher", False)) or entry["method"] == "distil"
        where = f"methods: {entry.get('label', entry['method'])}"
        if entry["method"] == "dense" and entry.get("ratios"):
            raise SweepError(f"{where}: dense runs at its own size; drop ratios")
        ratios = tuple(_numbers(entry["ratios"], float, f"{where}: ratios")) if entry.get("ratios") else None
        for ratio in ratios or ():
            check_ratio(ratio)
        seeds = tuple(_numbers(entry["seeds"], int, f"{where}: seeds")) if entry.get("seeds") else None
        label = entry.get("label", entry["method"])
        for flag in flags:
            if flag in entry and not isinstance(entry[flag], bool):
                raise SweepError(f"methods: {flag} must be true or false (got {entry[flag]!r})")
        tasks = entry.get("tasks")
        if tasks is not None and (not isinstance(tasks, list) or not tasks):
            raise SweepError(f"methods: tasks must be a non-empty list of task names (got {tasks!r})")
        tasks = tuple(str(t) for t in tasks) if tasks else None
        return cls(
            label, entry["method"], entry.get("trainer"), teacher, schedule, ratios, seeds,
            entry.get("fisher", False), entry.get("calibrate"), entry.get("global_budget", False), tasks,
        )  # fmt: skip


@dataclass(frozen=True)
class PlannedRun:
    name: str
    task: str
    label: str
    ratio: float
    seed: int
    config: RunConfig
    output: Path
    result: Path
    dense: Path | None  # the dense run this one starts from (None: it is one, or an LM run from the pretrained model)

    @property
    def is_start(self) -> bool:
        """Whether this is a task's dense fine-tuning, the start of the task's other runs (an LM task's dense run
        is a reference beside the others: they start from the pretrained model)."""
        return self.dense is None and self.config.method == "dense" and not is_lm_task(self.task)


@dataclass
class Sweep:
    name: str
    results: Path
    outputs: Path
    tasks: dict[str, dict[str, Any]]
    methods: list[MethodSpec]
    ratios: list[float]
    seeds: list[int]
    model: str | None = None
    train: dict[str, Any] = field(default_factory=dict)
    dense: dict[str, Any] = field(default_factory=dict)
    keep_models: bool = True
    source: Path | None = None  # the config file

    def plan(self) -> list[PlannedRun]:
        """Every run in order: each task's dense start, then its grid."""
        runs = []
        first = self.seeds[0]
        for task, options in self.tasks.items():
            base = RunConfig(model=self.model, task=task, **options)
            if is_lm_task(task):
                runs += self._lm_runs(task, base)
                continue
            dense_name = f"{task}-dense-s{first}"
            dense_out = self.outputs / dense_name
            train = {"max_length": task_spec(task).max_length, **self.train}  # the task's window unless set
            dense_train = TrainConfig(**{**train, **self.dense, "seed": first, "progress": True})
            runs.append(
                PlannedRun(
                    dense_name, task, "dense", 1.0, first,
                    replace(base, method="dense", train=dense_train),
                    dense_out, self.results / f"{dense_name}.json", None,
                )
            )  # fmt: skip
            seen = set()
            for spec in (s for s in self.methods if s.tasks is None or task in s.tasks):
                if spec.method == "dense":
                    raise SweepError(
                        f"methods: dense is {task}'s start, which the sweep runs first; an LM task's dense run "
                        "(trained by the healing recipe) needs `tasks:` naming LM tasks only"
                    )
                for ratio in spec.ratios or self.ratios:
                    for seed in spec.seeds or self.seeds:
                        name = f"{task}-{spec.label}-{ratio:g}x-s{seed}"
                        if name in seen:  # a method listed twice with overlapping axes runs once
                            continue
                        seen.add(name)
                        config = replace(
                            base,
                            model=str(dense_out),
                            method=spec.method,
                            ratio=ratio,
                            trainer=spec.trainer,
                            reference=str(dense_out / "metrics.json"),
                            teacher=str(dense_out) if spec.teacher else None,
                            train=TrainConfig(**{**train, "seed": seed, "progress": True}),
                            schedule=Schedule(**spec.schedule),
                            fisher=spec.fisher,
                            calibrate=spec.calibrate,
                            global_budget=spec.global_budget,
                        )
                        runs.append(
                            PlannedRun(
                                name, task, spec.label, ratio, seed, config,
                                self.outputs / name, self.results / f"{name}.json", dense_out,
                            )
                        )  # fmt: skip
        return runs

    def _lm_runs(self, task: str, base: RunConfig) -> list[PlannedRun]:
        """An LM task's grid: every run compresses and heals the pretrained model, its own dense teacher."""
        runs, seen = [], set()
        for spec in (s for s in self.methods if s.tasks is None or task in s.tasks):
            for ratio in (1.0,) if spec.method == "dense" else spec.ratios or self.ratios:
                for seed in spec.seeds or self.seeds:
                    size = "" if spec.method == "dense" else f"-{ratio:g}x"
                    name = f"{task_label(task)}-{spec.label}{size}-s{seed}"
                    if name in seen:
                        continue
                    seen.add(name)
                    train = {"batch_size": 4, "max_length": 512, **self.train, "seed": seed, "progress": True}
                    config = replace(
                        base, method=spec.method, ratio=ratio, trainer=spec.trainer, fisher=spec.fisher,
                        calibrate=spec.calibrate, global_budget=spec.global_budget,
                        teacher="the pretrained model" if spec.teacher else None,  # refused: it is the teacher already
                        train=TrainConfig(**train), schedule=Schedule(**spec.schedule),
                    )  # fmt: skip
                    runs.append(
                        PlannedRun(
                            name, task, spec.label, ratio, seed, config, self.outputs / name,
                            self.results / f"{name}.json", None,
                        )
                    )  # fmt: skip
        return runs


def load_sweep(path: str | Path) -> Sweep:
    """Read and check a sweep config; every problem is a :class:`SweepError` naming the key."""
    file = Path(path)
    try:
        raw = yaml.safe_load(file.read_text())
    except OSError as err:
        raise SweepError(f"cannot read sweep config {file}: {err.strerror}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise SweepError(f"{file} is not valid YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise SweepError(f"{file}: a sweep config is a mapping (name, tasks, methods, ratios, seeds, ...)")
    unknown = set(raw) - _TOP_KEYS
    if unknown:
        raise SweepError(f"{file}: unknown key(s) {sorted(unknown)}; known: {sorted(_TOP_KEYS)}")
    for key in ("name", "tasks", "methods", "ratios", "seeds"):
        if not raw.get(key):
            raise SweepError(f"{file}: '{key}' is missing or empty")
    here = file.parent

    def local(value: str | None) -> str | None:
        return None if value is None else str((here / Path(value).expanduser()).resolve())

    name = str(raw["name"])
    for key in ("train", "dense"):
        extra = set(raw.get(key) or {}) - _TRAIN_FIELDS
        if extra:
            raise SweepError(f"{file}: unknown {key} setting(s) {sorted(extra)}; known: {sorted(_TRAIN_FIELDS)}")
    if not isinstance(raw["tasks"], dict):
        raise SweepError(f"{file}: tasks is a mapping of task names to their options (for example `mr: {{}}`)")
    tasks = {}
    for task, options in raw["tasks"].items():
        if options is not None and not isinstance(options, dict):
            raise SweepError(f"{file}: task {task}: its options are a mapping (data_dir, max_train), got {options!r}")
        options = dict(options or {})
        allowed = {"data_dir", "tokens", "samples", "max_windows"} if is_lm_task(task) else {"data_dir", "max_train"}
        if set(options) - allowed:
            *some, last = sorted(allowed)
            raise SweepError(f"{file}: task {task}: only {', '.join(some)} and {last} can be set")
        if "data_dir" in options:  # a local folder, relative to the config; anything else names a hub dataset
            options["data_dir"] = _local_or_hub(here, str(options["data_dir"]))
        tasks[str(task)] = options
    for task in tasks:
        if not is_lm_task(task):
            task_spec(task)  # unknown task names fail here
    ratios = _numbers(raw["ratios"], float, f"{file}: ratios")
    for ratio in ratios:
        check_ratio(ratio)
    if not isinstance(raw["methods"], list):
        raise SweepError(f"{file}: methods is a list of method names or mappings")
    methods = [MethodSpec.parse(entry) for entry in raw["methods"]]
    for spec in methods:
        if any(m.label == spec.label and _options(m) != _options(spec) for m in methods):
            # the plan would run one of them under the other's name
            raise SweepError(
                f"{file}: label {spec.label!r} names two different method entries; give one of them its own label"
            )
        stray = sorted(set(spec.tasks or ()) - set(tasks))
        if stray:
            raise SweepError(
                f"{file}: method {spec.label!r} names task(s) {stray} that are not among tasks {sorted(tasks)}"
            )
    model = raw.get("model")
    model = local(model) if model and (here / model).exists() else model
    sweep = Sweep(
        name=name,
        results=Path(local(raw.get("results", f"../results/{name}"))),
        outputs=Path(local(raw.get("outputs", f"../outputs/sweeps/{name}"))),
        tasks=tasks,
        methods=methods,
        ratios=ratios,
        seeds=_numbers(raw["seeds"], int, f"{file}: seeds"),
        model=model,
        train=dict(raw.get("train") or {}),
        dense=dict(raw.get("dense") or {}),
        keep_models=bool(raw.get("keep_models", True)),
        source=file,
    )
    for planned in sweep.plan():  # every run's options, before the first run trains for an hour
        try:
            (check_lm_run if is_lm_task(planned.task) else check_run)(planned.config)
        except DsformerError as err:
            raise SweepError(f"{file}: run {planned.name}: {err}") from None
    return sweep


def _numbers(value: Any, kind: type, where: str) -> list:
    """A YAML list of numbers (one number is a list of one); anything else is a one-line error."""
    values = value if isinstance(value, list) else [value]
    try:
        numbers = [kind(v) for v in values if not isinstance(v, (bool, str))]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != len(values) or any(n != v for n, v in zip(numbers, values, strict=True)):
        raise SweepError(f"{where} must be a list of {'whole ' if kind is int else ''}numbers (got {value!r})")
    return numbers


def _options(spec: MethodSpec) -> tuple:
    """A method entry without its axes: two entries with the same options may share a label."""
    flags = (spec.fisher, spec.calibrate, spec.global_budget)
    return (spec.method, spec.trainer, spec.teacher, sorted(spec.schedule.items()), *flags)


def _local_or_hub(here: Path, value: str) -> str:
    """``value`` relative to the config's folder when it is a path (as ``--data-dir`` tells them apart), else as is."""
    if value.startswith((".", "/", "~")) or (here / value).exists():
        return str((here / Path(value).expanduser()).resolve())
    return value


def run_sweep(
    sweep: Sweep,
    quiet: bool = False,
    dry_run: bool = False,
    echo=print,
    tasks: list[str] | None = None,
    labels: list[str] | None = None,
    ratios: list[float] | None = None,
) -> list[PlannedRun]:
    """Run every planned run that has no result yet; returns the runs done (or, with ``dry_run``, to do).

    ``tasks``, ``labels`` and ``ratios`` run part of the grid (a task's dense start always belongs to it),
    to put what matters first; names the config does not have are an error, not an empty selection.
    """
    planned_runs = _select(sweep, tasks, labels, ratios)
    todo = [r for r in planned_runs if not r.result.exists()]
    echo(f"sweep {sweep.name}: {len(planned_runs) - len(todo)} runs done, {len(todo)} to do")
    # A dense start whose result is recorded but whose model folder is gone (a new checkout: model
    # folders are not committed) is fine-tuned again, with the same config and seed, before the
    # runs that start from it; its recorded result stays the record.
    refits = [
        r
        for r in planned_runs
        if r.is_start
        and r.result.exists()
        and not (r.output / "metrics.json").exists()
        and any(t.dense == r.output for t in todo)
    ]
    for r in refits:
        echo(f"  {r.name}: its model folder {r.output} is missing; it is fine-tuned again first")
    todo = refits + todo
    refitted = {r.name for r in refits}
    if dry_run:
        for r in todo:
            echo(f"  {r.name}")
        return todo
    for i, planned in enumerate(todo, 1):
        resume = has_checkpoint(planned.output)
        echo(f"[{i}/{len(todo)}] {planned.name}" + (" (resuming)" if resume else ""))
        config = replace(planned.config, train=replace(planned.config.train, progress=not quiet))
        try:
            metrics = finetune(config, planned.output, resume=resume)
        except KeyboardInterrupt as interrupt:
            only = {"tasks": tasks, "labels": labels, "ratios": ratios}
            again = ["dsformer", "sweep", "--config", str(sweep.source or sweep.name)]
            for key, values in only.items():
                again += [f"--{key}", *(f"{v:g}" if isinstance(v, float) else v for v in values)] if values else []
            interrupt.hint = f"interrupted; run `{shlex.join(again)}` again to go on where it stopped"
            raise
        if metrics is None:  # a process of a distributed run that does not write
            continue
        if planned.name in refitted:
            _compare_refit(planned, metrics, echo)
            continue
        names = {"sweep": sweep.name, "run": planned.name, "label": planned.label, "seed": planned.seed}
        planned.result.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(planned.result, json.dumps({**names, **metrics}, indent=2) + "\n")
        if not planned.is_start and not sweep.keep_models:
            shutil.rmtree(planned.output, ignore_errors=True)
        ratio = "" if planned.is_start else f" ({measured_ratios(metrics)['ratio_params']:.2f}x)"
        echo(f"    {metrics['metric']} {metrics['test'][metrics['metric']]:.4f}{ratio}")
    return todo


def _compare_refit(planned: PlannedRun, metrics: dict[str, Any], echo) -> None:
    """Say whether a dense start fine-tuned again scores what its recorded result says."""
    recorded = json.loads(planned.result.read_text())
    name = metrics["metric"]
    before, now = recorded.get("test", {}).get(name), metrics["test"][name]
    same = before is not None and abs(before - now) <= 1e-4
    echo(
        f"    {name} {now:.4f}, "
        + (
            "as recorded"
            if same
            else f"recorded {before}: the runs that follow start from a different dense model than earlier runs"
        )
    )


def dense(run: PlannedRun) -> bool:
    """An LM task's dense run: it has no ratio, so a ratio filter keeps it (as it keeps the starts)."""
    return run.config.method == "dense" and not run.is_start


def _select(
    sweep: Sweep, tasks: list[str] | None, labels: list[str] | None, ratios: list[float] | None
) -> list[PlannedRun]:
    planned = sweep.plan()
    runs = [r for r in planned if not r.is_start]
    for name, asked, known in (
        ("task", tasks, {r.task for r in planned}),
        ("label", labels, {r.label for r in runs}),
        ("ratio", ratios, {r.ratio for r in runs}),
    ):
        unknown = set(asked or ()) - known
        if unknown:
            have = ", ".join(f"{k:g}" if isinstance(k, float) else k for k in sorted(known))
            missing = ", ".join(f"{k:g}" if isinstance(k, float) else k for k in sorted(unknown))
            raise SweepError(f"{sweep.name} has no {name} {missing}; it has {have}")

    def asked(r: PlannedRun) -> bool:
        return (labels is None or r.label in labels) and (ratios is None or r.ratio in ratios or dense(r))

    return [r for r in planned if (tasks is None or r.task in tasks) and (r.is_start or asked(r))]
