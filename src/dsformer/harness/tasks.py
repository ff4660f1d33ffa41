"""Task registry: the embedded default (MR), GLUE-format folders, and Hugging Face dataset names.

Every task comes as three splits: ``train``; ``validation``, a seeded slice carved from train,
which selects checkpoints; and ``test``, the split that results report (GLUE's dev set, as in
the paper; for MR a fixed seeded tenth). Nothing is ever selected on ``test``.

Example:
    >>> from dsformer.harness.tasks import TASKS
    >>> TASKS["cola"].metrics, TASKS["stsb"].labels
    (('matthews',), None)
"""

from __future__ import annotations

import csv
import io
import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dsformer.errors import DataError
from dsformer.harness.data import squad
from dsformer.harness.data.mr import mr_path


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: str | None
    label: float  # a class index, or a score for regression


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's columns are in its GLUE TSV files, its labels and its official metrics."""

    name: str
    folder: str
    text_a: int
    text_b: int | None
    label: int
    header: bool
    labels: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]  # the first is the main metric
    test_file: str = "dev.tsv"
    hub: tuple[str, str] | None = None  # (dataset, config) on the Hugging Face hub
    kind: str = "sequence"  # "sequence": a label or score per text (pair); "qa": an answer span in a context
    max_length: int = 128  # tokens per example (per window of a QA context)

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        return self.labels is None and self.kind == "sequence"

    @property
    def is_qa(self) -> bool:
        return self.kind == "qa"


def _glue(name, folder, a, b, label, labels, metrics, header=True, test_file="dev.tsv") -> TaskSpec:
    return TaskSpec(name, folder, a, b, label, header, labels, metrics, test_file, ("nyu-mll/glue", name))


BINARY = ("0", "1")
ENTAIL = ("entailment", "not_entailment")
TASKS: dict[str, TaskSpec] = {
    "mr": TaskSpec("mr", "mr", 0, None, 2, True, BINARY, ("accuracy",)),
    "sst2": _glue("sst2", "SST-2", 0, None, 1, BINARY, ("accuracy",)),
    "cola": _glue("cola", "CoLA", 3, None, 1, BINARY, ("matthews",), header=False),
    "mrpc": _glue("mrpc", "MRPC", 3, 4, 0, BINARY, ("f1", "accuracy")),
    "rte": _glue("rte", "RTE", 1, 2, 3, ENTAIL, ("accuracy",)),
    "stsb": _glue("stsb", "STS-B", 7, 8, 9, None, ("pearson", "spearman")),
    "wnli": _glue("wnli", "WNLI", 1, 2, 3, BINARY, ("accuracy",)),
    "qnli": _glue("qnli", "QNLI", 1, 2, 3, ENTAIL, ("accuracy",)),
    "mnli": _glue(
        "mnli", "MNLI", 8, 9, -1, ("entailment", "neutral", "contradiction"), ("accuracy",), test_file="dev_matched.tsv"
    ),
    "qqp": _glue("qqp", "QQP", 3, 4, 5, BINARY, ("f1", "accuracy")),
    # SQuAD v1.1: columns do not apply (JSON); F1 and exact match of the answer text, the official metric
    "squad": TaskSpec(
        "squad",
        "squad",
        0,
        None,
        0,
        False,
        None,
        ("f1", "exact_match"),
        "dev-v1.1.json",
        (squad.HUB_DATASET, "plain_text"),
        kind="qa",
        max_length=384,
    ),
}
ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "sts": "stsb"}


@dataclass
class TaskData:
    """A task's three splits: :class:`Example` lists, or for question answering
    :class:`dsformer.harness.data.squad.Question` lists; ``skipped`` counts what reading dropped, by reason."""

    spec: TaskSpec
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    skipped: dict[str, int] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


def task_spec(name: str) -> TaskSpec:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[key]


def read_tsv(path: Path, spec: TaskSpec) -> list[Example]:
    """Read one GLUE TSV split (quoting off, as GLUE files need); bad rows name the file and line."""
    if not path.exists():
        raise DataError(f"{path} is missing; --data-dir must be a GLUE task folder holding train.tsv and dev.tsv")
    csv.field_size_limit(sys.maxsize)
    wanted = max(spec.text_a, spec.text_b or 0, spec.label if spec.label >= 0 else 0) + 1
    examples = []
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start]:#04x}); GLUE files are UTF-8") from None
    with io.StringIO(text, newline="") as f:  # newline="": line ends stay as written, as csv wants
        for number, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), 1):
            if number == 1 and spec.header:
                continue
            if not row or row == [""]:
                continue
            if len(row) < wanted:
                raise DataError(f"{path}:{number}: expected at least {wanted} tab-separated columns, found {len(row)}")
            examples.append(
                Example(
                    row[spec.text_a],
                    row[spec.text_b] if spec.text_b is not None else None,
                    _label(row[spec.label], spec, path, number),
                )
            )
    if not examples:
        raise DataError(f"{path} has no examples")
    return examples


def _label(raw: str, spec: TaskSpec, path: Path | str, number: int) -> float:
    raw = raw.strip()
    if spec.labels is None:
        try:
            score = float(raw)
        except ValueError:
            raise DataError(f"{path}:{number}: score {raw!r} is not a number") from None
        if not math.isfinite(score):
            raise DataError(f"{path}:{number}: score {raw!r} is not a finite number")
        return score
    if raw not in spec.labels:
        raise DataError(f"{path}:{number}: unknown label {raw!r}; {spec.name} labels are {', '.join(spec.labels)}")
    return float(spec.labels.index(raw))


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _carve(
    examples: list[Example], fraction: float, seed: int, cap: int | None = None
) -> tuple[list[Example], list[Example]]:
    """Split off a seeded ``fraction`` (at least one example, at most ``cap``) as validation."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * fraction))
    n_val = min(n_val, cap) if cap else n_val
    if n_val >= len(examples):
        raise DataError(f"train split has {len(examples)} examples: too few to carve a validation slice from")
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [examples[i] for i in sorted(val)]


VALIDATION_SEED = 0


def load_task(
    name: str = "mr",
    data_dir: str | Path | None = None,
    validation_fraction: float = 0.1,
    seed: int = 0,
    max_train: int | None = None,
    max_validation: int | None = 2000,
) -> TaskData:
    """Load a task's three splits.

    ``mr`` reads the embedded default (``dsformer data mr`` prepares it). A GLUE task reads
    ``data_dir``, which is one of: a folder in the standard GLUE layout (``train.tsv``, ``dev.tsv``);
    a local copy of a Hugging Face dataset repo in the hub's layout (``hf download nyu-mll/glue
    --repo-type dataset --local-dir glue``: a ``README.md`` whose configs map ``sst2`` to
    ``sst2/train-*.parquet``, ...); or a hub dataset name with the same configs. As with
    ``--model``, a ``Path`` or a string that starts with ``.``, ``/`` or ``~`` or names an existing
    path is local; any other string is a hub name. Without ``data_dir``, a GLUE task reads
    ``nyu-mll/glue`` from the hub. ``max_train`` keeps a ``seed``-ed subsample of train (for quick
    CPU runs); the validation slice is a fixed ``validation_fraction`` of train (the same for every
    seed), at most ``max_validation`` examples.
    """
    spec = task_spec(name)
    skipped: dict[str, int] = {}
    if spec.name == "mr":
        train, test = _load_mr(Path(data_dir) if data_dir else None)
    elif spec.is_qa:
        train, test, skipped = _load_squad(data_dir)
    elif data_dir is None:
        train, test = _load_hub(spec)
    elif not _is_local(data_dir):
        train, test = _load_hub(spec, str(data_dir))
    else:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise DataError(
                f"--data-dir {folder} is not a folder; give the GLUE task folder (e.g. glue_data/SST-2)"
                " or a local copy of a hub dataset (e.g. of nyu-mll/glue)"
            )
        if _is_hub_copy(folder, spec):
            train, test = _load_hub(spec, folder)
        else:
            train, test = read_tsv(folder / "train.tsv", spec), read_tsv(folder / spec.test_file, spec)
    # one validation slice for every training seed: a model fine-tuned with one seed (a teacher, the
    # dense start of a compression run) has never trained on the slice that selects another's checkpoints
    train, validation = _carve(train, validation_fraction, VALIDATION_SEED, cap=max_validation)
    if max_train is not None and max_train < len(train):
        train = random.Random(seed + 1).sample(train, max_train)
    data = TaskData(spec, train, validation, test, skipped)
    for split, size in data.sizes().items():
        if size == 0:
            raise DataError(f"{spec.name}: the {split} split is empty")
    return data


def _load_mr(data_dir: Path | None) -> tuple[list[Example], list[Example]]:
    """MR, with a fixed seeded tenth held out as the test split (independent of the training seed)."""
    path = (data_dir / "mr.tsv") if data_dir else mr_path()
    if not path.exists():
        raise DataError(f"{path} is missing; run `dsformer data mr` (or `make setup`) to prepare the MR data")
    spec = TASKS["mr"]
    examples = read_tsv(path, spec)
    return _carve(examples, 0.1, seed=20231221)


def _load_squad(data_dir: str | Path | None) -> tuple[list, list, dict[str, int]]:
    """SQuAD v1.1: a folder with one ``train*.json`` and one ``dev*.json`` official file, or a hub dataset
    (default ``rajpurkar/squad``); what was skipped, counted by split and reason."""
    if data_dir is not None and _is_local(data_dir):
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise DataError(f"--data-dir {folder} is not a folder; give one holding train-v1.1.json and dev-v1.1.json")
        train = squad.read_file(squad.find_split(folder, "train"), train=True)
        test = squad.read_file(squad.find_split(folder, "dev"), train=False)
    else:
        train, test = squad.read_hub(str(data_dir or squad.HUB_DATASET))
    skipped = {f"{split}: {why}": n for split, q in (("train", train), ("test", test)) for why, n in q.skipped.items()}
    return train.questions, test.questions, skipped


def _is_local(data_dir: str | Path) -> bool:
    """Whether ``--data-dir`` names a local path rather than a hub dataset (the rule ``--model`` follows)."""
    return isinstance(data_dir, Path) or data_dir.startswith((".", "/", "~")) or Path(data_dir).exists()


def _is_hub_copy(folder: Path, spec: TaskSpec) -> bool:
    """Whether ``folder`` is a local copy of a hub dataset repo rather than a GLUE task folder.

    A GLUE task folder holds ``train.tsv``; a hub dataset repo holds its dataset card (``README.md``,
    whose configs say where each config's files are) or, as ``nyu-mll/glue`` does, a folder per config.
    """
    if spec.hub is None or (folder / "train.tsv").exists():
        return False
    return (folder / "README.md").is_file() or (folder / spec.hub[1]).is_dir()


def _load_hub(spec: TaskSpec, source: str | Path | None = None) -> tuple[list[Example], list[Example]]:
    """A GLUE task's train and test splits from a Hugging Face dataset; needs the ``datasets`` package.

    ``source`` is a hub dataset name or a local copy of a hub dataset repo (default: the task's own
    hub dataset, ``nyu-mll/glue``); either way ``datasets.load_dataset(source, config)`` reads it,
    ``config`` being the task's config (``sst2``, ``stsb``, ...), so a local copy reads offline
    exactly as the hub name reads online. Test is the ``validation`` split (``validation_matched``
    for MNLI): the hub's ``test`` splits have no labels.
    """
    if spec.hub is None:
        raise DataError(f"{spec.name} has no hub dataset; pass --data-dir")
    dataset, config = spec.hub if source is None else (str(source), spec.hub[1])
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{spec.name}: reading {dataset} needs `pip install datasets` (or dsformer[hub]); or pass --data-dir"
            " a GLUE task folder"
        ) from None
    try:
        ds = datasets.load_dataset(dataset, config)
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; all mean the same to the user
        # the first line of the error and of its cause (datasets wraps a bad file's error in a generic one)
        reason = "; ".join(
            type(e).__name__ + (f": {str(e).strip().splitlines()[0][:200]}" if str(e).strip() else "")
            for e in (err, err.__cause__)
            if e is not None
        )
        raise DataError(
            f"cannot load {config} from {dataset} ({reason}); pass --data-dir a GLUE task folder,"
            f" a local copy of a hub dataset with a {config} config, or a hub dataset name"
        ) from None
    test_split = "validation_matched" if spec.name == "mnli" else "validation"
    missing = [split for split in ("train", test_split) if split not in ds]
    if missing:
        raise DataError(f"{dataset} ({config}) has no {' or '.join(missing)} split; its splits are {', '.join(ds)}")
    columns = ds["train"].column_names
    keys = [k for k in columns if k not in ("label", "idx")]
    if "label" not in columns or len(keys) != (1 if spec.text_b is None else 2):
        texts = "one text column" if spec.text_b is None else "two text columns"
        raise DataError(f"{dataset} ({config}): {spec.name} needs {texts} and a label; found {', '.join(columns)}")

    def convert(split: str) -> list[Example]:
        table = ds[split].to_dict()
        texts_b = table[keys[1]] if len(keys) > 1 else [None] * len(table["label"])
        expected = "a finite score" if spec.is_regression else f"one of 0..{spec.num_labels - 1}"
        examples = []
        for number, (a, b, label) in enumerate(zip(table[keys[0]], texts_b, table["label"], strict=True), 1):
            valid = label in range(spec.num_labels) if not spec.is_regression else _finite(label)
            if label is None or not valid:
                raise DataError(f"{dataset} ({config}) {split} row {number}: label {label!r} is not {expected}")
            examples.append(Example(a, b, float(label)))
        return examples

    return convert("train"), convert(test_split)
