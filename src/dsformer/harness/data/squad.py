"""SQuAD v1.1 questions from the official JSON files or the hub dataset ``rajpurkar/squad``, checked.

Every question is checked before training sees it. A training question must have an answer whose
text is the context's own text at its ``answer_start``; one without answers, or with an answer
that does not match, is skipped and counted (``Questions.skipped``), never trained on with a
wrong span. Evaluation questions keep every gold answer (the metric takes the best); one without
any is skipped and counted too. A file that is not SQuAD v1.1 JSON is a one-line error.

Example:
    >>> from dsformer.harness.data.squad import questions_of
    >>> data = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.",
    ...     "qas": [{"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]},
    ...             {"id": "q2", "question": "Why?", "answers": [{"text": "Spain", "answer_start": 12}]}]}]}]}
    >>> found = questions_of(data, "train.json", train=True)
    >>> [q.id for q in found.questions], dict(found.skipped)
    (['q1'], {'answer not at its answer_start': 1})
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsformer.errors import DataError

HUB_DATASET = "rajpurkar/squad"


@dataclass(frozen=True)
class Question:
    """One SQuAD question on its context: the gold answers' texts and character offsets."""

    id: str
    question: str
    context: str
    answers: tuple[str, ...]
    starts: tuple[int, ...]


@dataclass
class Questions:
    questions: list[Question]
    skipped: Counter = field(default_factory=Counter)  # reason: count


def _expect(value: Any, kind: type, where: str, what: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool):
        raise DataError(f"{where}: {what} must be a {kind.__name__} (got {type(value).__name__})")
    return value


def _question(qa: Any, context: str, where: str, train: bool, skipped: Counter) -> Question | None:
    _expect(qa, dict, where, "a question")
    qid = str(_expect(qa.get("id"), str, where, "'id'"))
    text = _expect(qa.get("question"), str, f"{where} ({qid})", "'question'")
    answers = _expect(qa.get("answers", []), list, f"{where} ({qid})", "'answers'")
    if qa.get("is_impossible"):
        raise DataError(f"{where} ({qid}): an unanswerable question is SQuAD v2.0; dsformer reads v1.1")
    texts, starts = [], []
    for answer in answers:
        _expect(answer, dict, f"{where} ({qid})", "an answer")
        texts.append(_expect(answer.get("text"), str, f"{where} ({qid})", "an answer's 'text'"))
        starts.append(_expect(answer.get("answer_start"), int, f"{where} ({qid})", "'answer_start'"))
    if not texts:
        skipped["no answer"] += 1
        return None
    if train:  # one span to learn: the first answer, where the file says it is
        if not texts[0].strip() or context[starts[0] : starts[0] + len(texts[0])] != texts[0]:
            skipped["answer not at its answer_start"] += 1
            return None
        texts, starts = texts[:1], starts[:1]
    return Question(qid, text, context, tuple(texts), tuple(starts))


def questions_of(data: Any, where: str, train: bool) -> Questions:
    """The questions of a parsed SQuAD v1.1 file (``where`` names it in errors)."""
    _expect(data, dict, where, "the file's top level")
    version = str(data.get("version", "1.1"))
    if version.lstrip("v") != "1.1":
        raise DataError(f"{where}: SQuAD version {version}; dsformer reads SQuAD v1.1 files")
    found = Questions([])
    for a, article in enumerate(_expect(data.get("data"), list, where, "'data'")):
        here = f"{where}: article {a}"
        for p, paragraph in enumerate(_expect(_expect(article, dict, here, "an article").get("paragraphs"), list,
                                              here, "'paragraphs'")):  # fmt: skip
            spot = f"{here}, paragraph {p}"
            _expect(paragraph, dict, spot, "a paragraph")
            context = _expect(paragraph.get("context"), str, spot, "'context'")
            for qa in _expect(paragraph.get("qas"), list, spot, "'qas'"):
                question = _question(qa, context, spot, train, found.skipped)
                if question is not None:
                    found.questions.append(question)
    if not found.questions:
        raise DataError(f"{where} has no usable questions")
    return found


def read_file(path: Path, train: bool) -> Questions:
    if not path.is_file():
        raise DataError(f"{path} is missing")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not JSON ({str(err).splitlines()[0][:120]}); expected a SQuAD v1.1 file") from None
    except RecursionError:
        raise DataError(f"{path}: nested too deeply to be a SQuAD file") from None
    return questions_of(data, str(path), train)


def find_split(folder: Path, split: str) -> Path:
    """The one ``<split>*.json`` file in ``folder`` (``train-v1.1.json``, ``dev-v1.1.json``, ...)."""
    found = sorted(folder.glob(f"{split}*.json"))
    if len(found) != 1:
        have = ", ".join(p.name for p in found) or "none"
        raise DataError(f"{folder}: expected one {split}*.json SQuAD file (like {split}-v1.1.json), found {have}")
    return found[0]


def read_hub(source: str) -> tuple[Questions, Questions]:
    """Train and validation questions of a hub dataset in ``rajpurkar/squad``'s layout (or a local copy)."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"reading {source} needs `pip install datasets`; or pass --data-dir a SQuAD folder") from None
    try:
        ds = datasets.load_dataset(source)
    except Exception as err:  # noqa: BLE001 - the hub raises many kinds; all mean the same to the user
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot load {source} ({first}); pass --data-dir a folder of SQuAD v1.1 JSON files") from None
    missing = [split for split in ("train", "validation") if split not in ds]
    if missing:
        raise DataError(f"{source} has no {' or '.join(missing)} split; its splits are {', '.join(ds)}")

    def convert(split: str) -> Questions:
        paragraphs = [
            {"context": row["context"], "qas": [{"id": row["id"], "question": row["question"], "answers": [
                {"text": t, "answer_start": s} for t, s in zip(row["answers"]["text"], row["answers"]["answer_start"],
                                                             strict=True)]}]}
            for row in ds[split]
        ]  # fmt: skip
        return questions_of({"data": [{"paragraphs": paragraphs}]}, f"{source} {split}", train=split == "train")

    return convert("train"), convert("validation")
