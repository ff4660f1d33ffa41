"""Task loading: the real GLUE folders (sizes, carving, labels), malformed folders, and MR."""

from __future__ import annotations

import re
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import pytest

from dsformer.harness.data.mr import mr_path
from dsformer.harness.tasks import TASKS, DataError, Example, load_task, read_tsv, task_spec

GLUE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "glue"

# task -> (folder, official train rows, official dev rows)
OFFICIAL = {
    "sst2": ("SST-2", 67_349, 872),
    "cola": ("CoLA", 8_551, 1_043),
    "stsb": ("STS-B", 5_749, 1_500),
    "wnli": ("WNLI", 635, 71),
}
MR_TOTAL = 10_568


def glue_dir(task: str) -> Path:
    folder = GLUE / OFFICIAL[task][0]
    if not (folder / "train.tsv").exists():
        pytest.skip(f"GLUE data not found at {folder}")
    return folder


@cache
def _load(task: str, seed: int = 0, **options):
    return load_task(task, glue_dir(task), seed=seed, **options)


@pytest.mark.parametrize("task", list(OFFICIAL))
def test_glue_sizes(task: str) -> None:
    _, n_train, n_dev = OFFICIAL[task]
    data = _load(task)
    sizes = data.sizes()
    assert sizes["train"] + sizes["validation"] == n_train
    assert sizes["test"] == n_dev
    assert sizes["validation"] == min(2000, round(0.1 * n_train))
    assert data.spec is TASKS[task]


def test_validation_cap() -> None:
    assert _load("sst2").sizes()["validation"] == 2000
    uncapped = _load("sst2", max_validation=None).sizes()
    assert uncapped["validation"] == round(0.1 * 67_349)
    assert uncapped["train"] + uncapped["validation"] == 67_349
    assert _load("wnli", max_validation=10).sizes() == {"train": 625, "validation": 10, "test": 71}


@pytest.mark.parametrize("task", list(OFFICIAL))
def test_validation_is_a_fixed_partition_of_train(task: str) -> None:
    data = _load(task)
    spec = TASKS[task]
    official = read_tsv(glue_dir(task) / "train.tsv", spec)
    # a partition of the official train rows (as multisets: SST-2 repeats some sentences)
    assert Counter(data.train) + Counter(data.validation) == Counter(official)
    assert not {id(e) for e in data.train} & {id(e) for e in data.validation}
    assert _load(task, seed=0).validation == load_task(task, glue_dir(task), seed=0).validation
    # the same slice for every training seed: a dense start trained with seed 0 never saw it
    assert _load(task, seed=1).validation == data.validation
    assert _load(task, seed=1, max_train=50).train != _load(task, seed=0, max_train=50).train
    assert read_tsv(glue_dir(task) / spec.test_file, spec) == data.test  # test is dev, untouched


@pytest.mark.parametrize("task", list(OFFICIAL))
def test_labels_and_columns(task: str) -> None:
    data = _load(task)
    spec = data.spec
    for split in (data.train, data.validation, data.test):
        labels = {e.label for e in split}
        if spec.is_regression:
            assert all(0.0 <= x <= 5.0 for x in labels)
            assert len(labels) > 10
        else:
            assert labels == set(map(float, range(spec.num_labels)))
        assert all(e.text_a for e in split)
        assert all((e.text_b is not None) == (spec.text_b is not None) for e in split)


def test_known_rows() -> None:
    """CoLA has no header (its first row is data); STS-B reads the 10-column layout; WNLI pairs."""
    cola = _load("cola")
    first = "Our friends won't buy this analysis, let alone the next one we propose."
    assert any(e.text_a == first and e.label == 1.0 for e in cola.train + cola.validation)
    stsb = _load("stsb")
    assert any(
        (e.text_a, e.text_b, e.label) == ("A plane is taking off.", "An air plane is taking off.", 5.0)
        for e in stsb.train + stsb.validation
    )


def test_max_train_subsample() -> None:
    data = _load("cola", max_train=100)
    assert data.sizes()["train"] == 100
    full = _load("cola")
    assert set(data.train) <= set(full.train)
    assert data.validation == full.validation
    assert _load("cola", max_train=100).train == load_task("cola", glue_dir("cola"), max_train=100).train


@pytest.mark.parametrize(("name", "key"), [("SST-2", "sst2"), ("sts-b", "stsb"), ("STS", "stsb"), ("CoLA", "cola")])
def test_aliases(name: str, key: str) -> None:
    assert task_spec(name) is TASKS[key]


# ---------------------------------------------------------------------------- malformed folders


def write_task(folder: Path, train: str | None, dev: str | None = "sentence\tlabel\nfine\t1\nbad\t0\n") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if train is not None:
        (folder / "train.tsv").write_text(train, encoding="utf-8")
    if dev is not None:
        (folder / "dev.tsv").write_text(dev, encoding="utf-8")
    return folder


SST_TRAIN = "sentence\tlabel\n" + "".join(f"sentence {i}\t{i % 2}\n" for i in range(20))


def stsb_row(i: int, score: str) -> str:
    return "\t".join([str(i), "main", "f", "2012", "0001", "none", "none", f"a {i}", f"b {i}", score]) + "\n"


STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
STSB_DEV = STSB_HEADER + stsb_row(0, "1.0") + stsb_row(1, "2.5")


@pytest.mark.parametrize(
    ("task", "train", "line", "pattern"),
    [
        ("sst2", SST_TRAIN + "no label column\n", 22, r"expected at least 2 tab-separated columns, found 1"),
        ("cola", "src\t1\t\tok\nsrc\t0\n", 2, r"expected at least 4 tab-separated columns, found 2"),
        ("sst2", SST_TRAIN + "too positive\t2\n", 22, r"unknown label '2'; sst2 labels are 0, 1"),
        ("sst2", "sentence\tlabel\nnice\tpositive\n", 2, r"unknown label 'positive'; sst2 labels are 0, 1"),
        ("wnli", "i\ta\tb\tlabel\n0\tx\ty\tentailment\n", 2, r"unknown label 'entailment'; wnli labels are 0, 1"),
        ("stsb", STSB_HEADER + stsb_row(0, "1.5") + stsb_row(1, "high"), 3, r"score 'high' is not a number"),
        ("stsb", STSB_HEADER + stsb_row(0, "1.5") + stsb_row(1, "")[:-2] + "\n", 3, r"found 9"),
    ],
    ids=["short-row", "short-row-no-header", "label-2", "label-word", "wnli-label", "stsb-score", "stsb-9-columns"],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, task: str, train: str, line: int, pattern: str) -> None:
    dev = STSB_DEV if task == "stsb" else ("src\t1\t\tok\n" if task == "cola" else None)
    folder = write_task(tmp_path / task, train, dev) if dev else write_task(tmp_path / task, train)
    with pytest.raises(DataError, match=re.escape(f"{folder / 'train.tsv'}:{line}:") + ".*" + pattern):
        load_task(task, folder)


def test_missing_train_file(tmp_path: Path) -> None:
    folder = write_task(tmp_path / "SST-2", None)
    with pytest.raises(DataError, match=re.escape(str(folder / "train.tsv")) + " is missing"):
        load_task("sst2", folder)


def test_missing_test_file(tmp_path: Path) -> None:
    folder = write_task(tmp_path / "SST-2", SST_TRAIN, None)
    with pytest.raises(DataError, match="dev.tsv is missing"):
        load_task("sst2", folder)


def test_data_dir_not_a_folder(tmp_path: Path) -> None:
    file = tmp_path / "train.tsv"
    file.write_text(SST_TRAIN)
    for bad in (file, tmp_path / "absent"):
        with pytest.raises(DataError, match=re.escape(f"--data-dir {bad} is not a folder")):
            load_task("sst2", bad)


def test_unknown_task() -> None:
    with pytest.raises(DataError, match=r"unknown task 'squad2'; known tasks: mr, sst2, cola"):
        load_task("squad2", "/nonexistent")
    with pytest.raises(DataError):
        task_spec("")


@pytest.mark.parametrize(
    ("train", "dev", "pattern"),
    [
        ("sentence\tlabel\n", None, r"train.tsv has no examples"),
        ("", None, r"train.tsv has no examples"),
        ("sentence\tlabel\n\n\n", None, r"train.tsv has no examples"),
        (SST_TRAIN, "sentence\tlabel\n", r"dev.tsv has no examples"),
        ("sentence\tlabel\nonly one\t1\n", None, r"train split has 1 examples: too few"),
    ],
    ids=["header-only", "empty-file", "blank-lines", "empty-dev", "one-example"],
)
def test_empty_splits(tmp_path: Path, train: str, dev: str | None, pattern: str) -> None:
    folder = write_task(tmp_path / "SST-2", train, dev) if dev is not None else write_task(tmp_path / "SST-2", train)
    with pytest.raises(DataError, match=pattern):
        load_task("sst2", folder)


# ---------------------------------------------------------------------------- parsing details


def test_double_quotes_do_not_join_rows(tmp_path: Path) -> None:
    train = (
        "sentence\tlabel\n"
        'he said "wow\t1\n'  # an unbalanced quote: a quoting parser would swallow the next rows
        "plain\t0\n"
        '"quoted at start\t1\n'
        "a ''double'' quote \"inside\" here\t0\n" + "".join(f"s{i}\t{i % 2}\n" for i in range(16))
    )
    folder = write_task(tmp_path / "SST-2", train)
    rows = read_tsv(folder / "train.tsv", TASKS["sst2"])
    assert len(rows) == 20
    assert [(r.text_a, r.label) for r in rows[:4]] == [
        ('he said "wow', 1.0),
        ("plain", 0.0),
        ('"quoted at start', 1.0),
        ("a ''double'' quote \"inside\" here", 0.0),
    ]
    data = load_task("sst2", folder, validation_fraction=0.25)
    assert data.sizes() == {"train": 15, "validation": 5, "test": 2}


def test_crlf_blank_lines_and_spaces(tmp_path: Path) -> None:
    train = "sentence\tlabel\r\n" + "".join(f"row {i} \t {i % 2}\r\n" for i in range(10)) + "\r\n"
    folder = write_task(tmp_path / "SST-2", train)
    rows = read_tsv(folder / "train.tsv", TASKS["sst2"])
    assert len(rows) == 10
    assert rows[1].text_a == "row 1 "  # text is kept as is
    assert [r.label for r in rows[:2]] == [0.0, 1.0]


def test_stsb_reads_scores(tmp_path: Path) -> None:
    train = STSB_HEADER + "".join(stsb_row(i, f"{i / 4:.3f}") for i in range(20))
    folder = write_task(tmp_path / "STS-B", train, STSB_DEV)
    data = load_task("stsb", folder, validation_fraction=0.2)
    assert sorted(e.label for e in data.train + data.validation) == [i / 4 for i in range(20)]
    assert data.test[1].text_a == "a 1" and data.test[1].text_b == "b 1" and data.test[1].label == 2.5


# ---------------------------------------------------------------------------- MR


def test_mr_sizes_and_fixed_test_split() -> None:
    if not mr_path().exists():
        pytest.skip(f"MR is not prepared ({mr_path()}); run `dsformer data mr`")
    a, b = load_task("mr", seed=0), load_task("mr", seed=1)
    assert sum(a.sizes().values()) == MR_TOTAL
    assert a.sizes()["test"] == round(0.1 * MR_TOTAL)
    assert a.test == b.test and a.validation == b.validation  # neither depends on the training seed
    assert Counter(a.train) + Counter(a.validation) == Counter(b.train) + Counter(b.validation)
    assert {e.label for e in a.train} == {0.0, 1.0}
    assert a.spec.text_b is None and a.test[0].text_b is None


def test_mr_from_a_data_dir(tmp_path: Path) -> None:
    rows = "".join(f"sentence {i}\t{i - 50}\t{int(i >= 50)}\n" for i in range(100))
    (tmp_path / "mr.tsv").write_text("sentence\tscore\tlabel\n" + rows)
    data = load_task("mr", tmp_path)
    assert data.sizes() == {"train": 81, "validation": 9, "test": 10}
    assert load_task("mr", tmp_path, seed=5).test == data.test
    with pytest.raises(DataError, match=r"mr.tsv is missing; run `dsformer data mr`"):
        load_task("mr", tmp_path / "absent")


# ---------------------------------------------------------------------------- Hugging Face datasets
#
# The real ``datasets`` package, offline, reading a local copy of a hub dataset repo written in the
# layout of nyu-mll/glue: a README.md whose configs name each config's parquet files, and a folder
# per config (sst2/train-00000-of-00001.parquet, ...). The hub's test splits carry label -1.

# config -> its columns in nyu-mll/glue, as a function of the row number
HUB_ROWS = {
    "sst2": lambda i: {"sentence": f"film {i}", "label": i % 2, "idx": i},
    "stsb": lambda i: {"sentence1": f"a {i}", "sentence2": f"b {i}", "label": i % 21 / 4, "idx": i},  # scores 0 to 5
    "mnli": lambda i: {"premise": f"p {i}", "hypothesis": f"h {i}", "label": i % 3, "idx": i},
}
HUB_SPLITS = {  # split -> rows (the first row's number and the count)
    "sst2": {"train": (0, 20), "validation": (100, 4), "test": (200, 3)},
    "stsb": {"train": (0, 20), "validation": (100, 4), "test": (200, 3)},
    "mnli": {
        "train": (0, 30),
        "validation_matched": (100, 4),
        "validation_mismatched": (150, 5),
        "test_matched": (200, 3),
    },
}


def hub_rows(config: str, split: str) -> list[dict]:
    start, count = HUB_SPLITS[config][split]
    rows = [HUB_ROWS[config](start + i) for i in range(count)]
    if split.startswith("test"):
        rows = [{**row, "label": -1} for row in rows]
    return rows


def write_hub_copy(folder: Path, splits: dict[str, dict[str, list[dict] | bytes]], readme: bool = True) -> Path:
    """A hub dataset repo's layout: ``{config}/{split}-00000-of-00001.parquet`` and a README.md naming the configs.

    A split given as bytes is written as they are (a file that is not parquet).
    """
    pd = pytest.importorskip("pandas")
    card = ["---", "configs:"]
    for config, rows in splits.items():
        (folder / config).mkdir(parents=True, exist_ok=True)
        card += [f"- config_name: {config}", "  data_files:"]
        for split, table in rows.items():
            file = folder / config / f"{split}-00000-of-00001.parquet"
            if isinstance(table, bytes):
                file.write_bytes(table)
            else:
                pd.DataFrame(table).to_parquet(file, index=False)
            card += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    if readme:
        (folder / "README.md").write_text("\n".join([*card, "---", "", "# A copy of a hub dataset", ""]))
    return folder


@pytest.fixture
def hub_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The real ``datasets``, offline, caching under ``tmp_path`` (not the user's cache); returns the cache folder.

    ``datasets`` and ``huggingface_hub`` read these variables once, at import (an earlier test may have
    imported them), so their settings are pinned to the same values too.
    """
    cache = tmp_path / "hf" / "datasets"
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


@pytest.mark.parametrize(
    ("task", "test_split"), [("sst2", "validation"), ("stsb", "validation"), ("mnli", "validation_matched")]
)
@pytest.mark.parametrize("as_string", [False, True], ids=["path", "str"])
def test_hub_copy_rows_become_examples(
    hub_offline: Path, tmp_path: Path, task: str, test_split: str, as_string: bool
) -> None:
    """A local copy of nyu-mll/glue reads offline as the hub name reads online: train, and validation as test."""
    folder = write_hub_copy(tmp_path / "glue", {task: {split: hub_rows(task, split) for split in HUB_SPLITS[task]}})
    data = load_task(task, str(folder) if as_string else folder, validation_fraction=0.25)
    spec = TASKS[task]
    b = "sentence2" if task == "stsb" else "hypothesis" if task == "mnli" else None
    a = {"sst2": "sentence", "stsb": "sentence1", "mnli": "premise"}[task]

    def examples(split: str) -> list:
        return [Example(r[a], r[b] if b else None, float(r["label"])) for r in hub_rows(task, split)]

    assert data.spec is spec
    assert data.test == examples(test_split)
    assert Counter(data.train) + Counter(data.validation) == Counter(examples("train"))
    n_train, n_validation = HUB_SPLITS[task]["train"][1], round(HUB_SPLITS[task]["train"][1] / 4)
    assert data.sizes() == {"train": n_train - n_validation, "validation": n_validation, "test": 4}
    assert all((e.text_b is not None) == (spec.text_b is not None) for e in data.train + data.test)
    assert all(isinstance(e.label, float) for e in data.train)
    if spec.is_regression:
        assert {e.label for e in data.test} == {4.0, 4.25, 4.5, 4.75}
    else:
        assert {e.label for e in data.train + data.validation} == set(map(float, range(spec.num_labels)))
    assert list(hub_offline.iterdir())  # the arrow cache went under tmp_path


def test_hub_copy_holds_many_configs(hub_offline: Path, tmp_path: Path) -> None:
    """One copy of the repo serves every task, each from its own config; a GLUE TSV folder still reads as one."""
    configs = {c: {s: hub_rows(c, s) for s in HUB_SPLITS[c] if s != "test"} for c in ("sst2", "stsb")}
    folder = write_hub_copy(tmp_path / "glue", configs)
    assert load_task("sst2", folder).test[0] == Example("film 100", None, 0.0)
    assert load_task("stsb", folder).test[0] == Example("a 100", "b 100", 4.0)
    tsv = write_task(tmp_path / "SST-2", SST_TRAIN)
    (tsv / "README.md").write_text("the GLUE download's notes\n")
    assert load_task("sst2", tsv).test == [Example("fine", None, 1.0), Example("bad", None, 0.0)]


SST2_OK = {"train": hub_rows("sst2", "train"), "validation": hub_rows("sst2", "validation")}


@pytest.mark.parametrize(
    ("task", "splits", "readme", "pattern"),
    [
        ("sst2", SST2_OK, False, r"cannot load sst2 from .*glue \(ValueError: BuilderConfig 'sst2' not found"),
        (
            "cola",
            SST2_OK,
            True,
            r"cannot load cola from .*glue \(ValueError: BuilderConfig 'cola' not found",
        ),
        ("sst2", {"train": SST2_OK["train"]}, True, r"glue \(sst2\) has no validation split; its splits are train"),
        (
            "sst2",
            {s: [{"sentence1": "x", "sentence2": "y", "label": 0}] * 8 for s in SST2_OK},
            True,
            r"sst2 needs one text column and a label; found sentence1, sentence2, label",
        ),
        (
            "sst2",
            {**SST2_OK, "train": [*SST2_OK["train"], {"sentence": "odd", "label": 2, "idx": 20}]},
            True,
            r"glue \(sst2\) train row 21: label 2 is not one of 0..1",
        ),
        (
            "sst2",
            {**SST2_OK, "validation": b"not parquet"},
            True,
            r"\(DatasetGenerationError: .*; ArrowInvalid: .*Parquet magic bytes not found",
        ),
    ],
    ids=["no-readme", "no-such-config", "no-validation", "wrong-columns", "label-2", "not-parquet"],
)
def test_bad_hub_copy_is_a_data_error(
    hub_offline: Path, tmp_path: Path, task: str, splits: dict, readme: bool, pattern: str
) -> None:
    """A copy that ``datasets`` cannot read, or whose rows do not fit the task, names the copy and what is wrong."""
    write_hub_copy(tmp_path / "glue", {"sst2": splits}, readme=readme)
    with pytest.raises(DataError, match=pattern):
        load_task(task, tmp_path / "glue")


@pytest.mark.parametrize("name", [None, "someone/glue-copy", "glue_data/SST-2"], ids=["default", "other", "relative"])
def test_hub_name_offline_is_a_data_error(
    hub_offline: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str | None
) -> None:
    """A hub name (the default nyu-mll/glue, another, or a relative path that is not there) reads from the hub."""
    monkeypatch.chdir(tmp_path)
    dataset = name or "nyu-mll/glue"
    with pytest.raises(
        DataError, match=re.escape(f"cannot load sst2 from {dataset} (ConnectionError: ") + ".*pass --data-dir"
    ):
        load_task("sst2", name)


def test_hub_without_datasets_is_a_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where ``datasets`` is not installed (an import that fails), a GLUE task with no --data-dir says what to do."""
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"reading nyu-mll/glue needs `pip install datasets`.*pass --data-dir"):
        load_task("wnli")
