"""The embedded MR data: parsing the ground-truth file, preparing mr.tsv from a (fake, local) sdist."""

from __future__ import annotations

import csv
import io
import tarfile
from pathlib import Path

import pytest

from dsformer import DsformerError
from dsformer.harness.data import mr
from dsformer.harness.data.mr import Sentence, parse_ground_truth


@pytest.mark.parametrize(
    "lines,expected",
    [
        (["1\t2.27\tA splash of fun."], [Sentence("A splash of fun.", 2.27, 1)]),
        (["1\t-0.6\tToo tepid."], [Sentence("Too tepid.", -0.6, 0)]),
        (["1\t0\tMeh.", "2\t0.0\tFlat.", "3\t-0.0\tNil."], []),  # zero scores carry no label
        (
            ["1\t0.01\tBarely good.", "2\t-0.01\tBarely bad."],
            [Sentence("Barely good.", 0.01, 1), Sentence("Barely bad.", -0.01, 0)],
        ),
        (["1\t1.5\t  padded  \r\n", "", "2\t-1\tcrlf\r\n"], [Sentence("padded", 1.5, 1), Sentence("crlf", -1.0, 0)]),
        (["7\t3e-1\tscientific"], [Sentence("scientific", 0.3, 1)]),
        ([], []),
    ],
    ids=["positive", "negative", "zeros dropped", "small scores", "whitespace and blank lines", "exponent", "empty"],
)
def test_parse_ground_truth(lines, expected):
    assert parse_ground_truth(lines) == expected


@pytest.mark.parametrize(
    "lines,number,words",
    [
        (["1\t1.0\tfine", "2\tonly two fields"], 2, ["expected 3 tab-separated fields, found 2"]),
        (["1\t1.0\tfine", "", "3\t1\ttoo\tmany"], 3, ["found 4"]),
        (["x\tnot-a-number\tsentence"], 1, ["'not-a-number' is not a number"]),
        (["1\t1.0\tok", "2\t1.0\tok", "3\t1.0\tok", "no tabs at all"], 4, ["found 1"]),
    ],
    ids=["two fields", "four fields", "bad score", "no tabs"],
)
def test_parse_ground_truth_malformed_names_line(lines, number, words):
    with pytest.raises(DsformerError, match=rf"line {number}:") as info:
        parse_ground_truth(lines)
    for word in words:
        assert word in str(info.value)


def test_parse_ground_truth_accepts_any_iterable():
    rows = parse_ground_truth(iter(["1\t1\ta", "2\t-1\tb"]))
    assert [r.label for r in rows] == [1, 0]


# --- prepare() with a local sdist (no network) --------------------------------------------------


def _fake_sdist(path: Path, lines: list[str]) -> Path:
    """A tar.gz laid out like the vaderSentiment sdist, holding an inner archive with the member."""
    member = "\n".join(lines).encode("utf-8") + b"\n"
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as archive:
        info = tarfile.TarInfo(mr.MEMBER)
        info.size = len(member)
        archive.addfile(info, io.BytesIO(member))
    data = inner.getvalue()
    with tarfile.open(path, "w:gz") as outer:
        info = tarfile.TarInfo(mr.INNER_ARCHIVE)
        info.size = len(data)
        outer.addfile(info, io.BytesIO(data))
    return path


def _ground_truth(count: int) -> list[str]:
    scores = [1.5, -2.0, 0.0]  # one in three is neutral and dropped
    return [f"{i}\t{scores[i % 3]}\tsentence number {i}" for i in range(1, count + 1)]


@pytest.fixture
def data_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DSFORMER_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "data"


def test_prepare_from_local_sdist(tmp_path, data_home):
    sdist = _fake_sdist(tmp_path / mr.SDIST_FILE, _ground_truth(mr.EXPECTED_SENTENCES))
    path = mr.prepare(sdist)
    assert path == data_home / "mr" / "mr.tsv" == mr.mr_path()
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows[0] == ["sentence", "score", "label"]
    assert len(rows) - 1 == mr.EXPECTED_SENTENCES - mr.EXPECTED_SENTENCES // 3
    assert all(len(r) == 3 and r[2] == str(int(float(r[1]) > 0)) for r in rows[1:])
    assert sorted(p.name for p in path.parent.iterdir()) == ["mr.tsv"]  # no temp file left

    # prepared data is reused, not rebuilt, unless forced
    path.write_text("sentence\tscore\tlabel\n")
    assert mr.prepare(sdist) == path and path.read_text() == "sentence\tscore\tlabel\n"
    mr.prepare(sdist, force=True)
    assert len(path.read_text().splitlines()) == len(rows)


def test_prepare_rejects_an_unknown_release(tmp_path, data_home):
    sdist = _fake_sdist(tmp_path / mr.SDIST_FILE, _ground_truth(100))
    with pytest.raises(DsformerError, match=rf"has 100 lines, expected {mr.EXPECTED_SENTENCES}"):
        mr.prepare(sdist)
    assert not mr.mr_path().exists()


@pytest.mark.parametrize("content", [b"not a tar file", b""])
def test_prepare_rejects_a_damaged_sdist(tmp_path, data_home, content):
    sdist = tmp_path / mr.SDIST_FILE
    sdist.write_bytes(content)
    with pytest.raises(DsformerError, match="is not the vadersentiment==3.3.2 sdist or is damaged"):
        mr.prepare(sdist)
    assert not mr.mr_path().exists()


def test_prepare_rejects_a_tar_without_the_member(tmp_path, data_home):
    sdist = tmp_path / mr.SDIST_FILE
    with tarfile.open(sdist, "w:gz") as outer:
        info = tarfile.TarInfo("something/else.txt")
        outer.addfile(info, io.BytesIO(b""))
    with pytest.raises(DsformerError, match="damaged"):
        mr.prepare(sdist)


def test_data_home_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DSFORMER_HOME", str(tmp_path))
    assert mr.data_home() == tmp_path / "data"
    monkeypatch.delenv("DSFORMER_HOME")
    assert mr.data_home() == Path.home() / ".cache" / "dsformer" / "data"


# --- the real prepared file, when present ---------------------------------------------------------


def test_prepared_mr_file():
    path = mr.mr_path()
    if not path.exists():
        pytest.skip(f"MR data not prepared at {path} (run `dsformer data mr`)")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    assert rows[0] == ["sentence", "score", "label"]
    assert len(rows) == 10_568 + 1
    assert all(len(r) == 3 for r in rows)
    labels = [int(r[2]) for r in rows[1:]]
    assert set(labels) == {0, 1}
    for sentence, score, label in rows[1:]:
        assert sentence and float(score) != 0 and int(label) == int(float(score) > 0)
    assert 0.4 < sum(labels) / len(labels) < 0.6  # MR is roughly balanced
