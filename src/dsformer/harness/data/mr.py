"""The embedded default task data: MR, the Rotten Tomatoes sentences that SST was built from.

The ``vaderSentiment==3.3.2`` source distribution on PyPI carries 10,605 of these sentences with
crowd sentiment scores (``movieReviewSnippets_GroundTruth.txt``). :func:`prepare` fetches that
sdist with pip (or takes a local copy), and writes ``mr.tsv`` (``sentence``, ``score``, ``label``:
1 for a positive score, 0 for a negative one; zero scores are dropped) into the data home.

Example:
    >>> from dsformer.harness.data.mr import parse_ground_truth
    >>> rows = parse_ground_truth(["1\\t2.27\\tA splash of fun.", "2\\t0\\tMeh.", "3\\t-0.6\\tToo tepid."])
    >>> [(r.label, r.sentence) for r in rows]
    [(1, 'A splash of fun.'), (0, 'Too tepid.')]
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dsformer.errors import DsformerError
from dsformer.files import atomic_write_text

SDIST = "vadersentiment==3.3.2"
SDIST_FILE = "vaderSentiment-3.3.2.tar.gz"
INNER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
EXPECTED_SENTENCES = 10_605


@dataclass(frozen=True)
class Sentence:
    sentence: str
    score: float
    label: int


def data_home() -> Path:
    """Where dsformer keeps prepared data: ``$DSFORMER_HOME`` or ``~/.cache/dsformer``."""
    return Path(os.environ.get("DSFORMER_HOME", Path.home() / ".cache" / "dsformer")) / "data"


def mr_path() -> Path:
    return data_home() / "mr" / "mr.tsv"


def parse_ground_truth(lines: Iterable[str]) -> list[Sentence]:
    """Parse ``id<TAB>score<TAB>sentence`` lines; zero scores have no label and are dropped."""
    rows = []
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line:
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise DsformerError(f"{MEMBER} line {number}: expected 3 tab-separated fields, found {len(parts)}")
        try:
            score = float(parts[1])
        except ValueError:
            raise DsformerError(f"{MEMBER} line {number}: score {parts[1]!r} is not a number") from None
        if score != 0:
            rows.append(Sentence(parts[2].strip(), score, int(score > 0)))
    return rows


def _download_sdist(folder: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-binary",
        ":all:",
        "--no-deps",
        SDIST,
        "-d",
        str(folder),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    path = folder / SDIST_FILE
    if done.returncode != 0 or not path.exists():
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise DsformerError(f"could not download the {SDIST} sdist with pip ({last}); pass the file with --sdist")
    return path


def _read_member(sdist: Path) -> list[str]:
    try:
        with tarfile.open(sdist) as outer:
            inner = outer.extractfile(INNER_ARCHIVE)
            with tarfile.open(fileobj=io.BytesIO(inner.read())) as archive:
                raw = archive.extractfile(MEMBER).read()
    except (tarfile.TarError, KeyError, AttributeError, OSError) as err:
        raise DsformerError(f"{sdist} is not the {SDIST} sdist or is damaged ({err})") from None
    return raw.decode("utf-8").splitlines()


def prepare(sdist: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Write ``mr.tsv`` into the data home (once) and return its path."""
    target = mr_path()
    if target.exists() and not force:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(sdist) if sdist else _download_sdist(Path(tmp))
        lines = _read_member(source)
    if len(lines) != EXPECTED_SENTENCES:
        raise DsformerError(f"{MEMBER} has {len(lines)} lines, expected {EXPECTED_SENTENCES}: not the known release")
    rows = parse_ground_truth(lines)
    lines_out = ["sentence\tscore\tlabel\n"] + [f"{r.sentence}\t{r.score}\t{r.label}\n" for r in rows]
    return atomic_write_text(target, "".join(lines_out))
