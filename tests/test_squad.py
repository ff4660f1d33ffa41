"""SQuAD v1.1: the official metric on hand-made cases, reading (and refusing) files, windows and span decoding,
and every method through the command line on a tiny model."""

# ruff: noqa: F401, F811 - the tiny model's and data's fixtures come from test_pipeline, by name

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import minilm_available, toy_tokenizer
from test_pipeline import _compress_args, assert_one_error_line, metrics_of, model_dir, root, run_cli, sst2_dir
from transformers import BertConfig, BertModel
from transformers.modeling_outputs import QuestionAnsweringModelOutput

from dsformer.errors import DataError
from dsformer.harness.data.squad import Question, questions_of
from dsformer.harness.metrics import answer_f1, normalize_answer, squad_scores
from dsformer.harness.squad import predict_answers, training_windows
from dsformer.harness.tasks import load_task

SQUAD = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "squad"
needs_squad = pytest.mark.skipif(not SQUAD.is_dir(), reason="the shared SQuAD files are not here")


# the official v1.1 script's definitions, worked by hand
@pytest.mark.parametrize(
    ("text", "normal"),
    [
        ("The Eiffel Tower", "eiffel tower"),
        ("  an   apple,  a pear. ", "apple pear"),
        ("Theatre", "theatre"),  # an article only as a whole word
        ("U.S.A.", "usa"),
        ("rock 'n' roll", "rock n roll"),
        ("A", ""),
    ],
)
def test_normalization_follows_the_official_script(text, normal):
    assert normalize_answer(text) == normal


@pytest.mark.parametrize(
    ("prediction", "gold", "f1"),
    [
        ("the cat sat", "cat sat", 1.0),
        ("cat", "cat sat", 2 * 1.0 * 0.5 / 1.5),  # precision 1, recall 1/2
        ("cat cat dog", "cat sat", 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2)),  # one shared token, counted once
        ("dog", "cat", 0.0),
        ("", "cat", 0.0),
        ("the", "a", 0.0),  # both normalize to nothing: no token in common
    ],
)
def test_answer_f1(prediction, gold, f1):
    assert answer_f1(prediction, gold) == pytest.approx(f1)


def test_scores_take_the_best_gold_answer_and_average_over_questions():
    scores = squad_scores(["Denver Broncos", "1858", "Paris"], [["Broncos", "Denver Broncos"], ["in 1858"], ["Rome"]])
    assert scores["exact_match"] == pytest.approx(1 / 3, abs=1e-6)
    assert scores["f1"] == pytest.approx((1.0 + 2 * 1.0 * 0.5 / 1.5 + 0.0) / 3, abs=1e-6)
    with pytest.raises(ValueError):
        squad_scores(["x"], [[]])


def _file(qas: list, context: str = "Paris is in France.", version: str = "1.1") -> dict:
    return {"version": version, "data": [{"title": "t", "paragraphs": [{"context": context, "qas": qas}]}]}


def _qa(qid: str, text: str, start: int | str) -> dict:
    return {"id": qid, "question": "Where?", "answers": [{"text": text, "answer_start": start}]}


@pytest.mark.parametrize(
    ("qas", "train", "kept", "skipped"),
    [
        ([_qa("a", "France", 12)], True, ["a"], {}),
        ([_qa("a", "France", 11)], True, [], {"answer not at its answer_start": 1}),  # one character off
        ([{"id": "a", "question": "Why?", "answers": []}], True, [], {"no answer": 1}),
        ([_qa("a", "France", 11), _qa("b", "Paris", 0)], True, ["b"], {"answer not at its answer_start": 1}),
        ([_qa("a", "France", 11)], False, ["a"], {}),  # evaluation scores the text; answer_start is not read
    ],
)
def test_reading_counts_what_it_skips(qas, train, kept, skipped):
    if not kept:
        with pytest.raises(DataError, match="no usable questions"):
            questions_of(_file(qas), "f.json", train)
        return
    found = questions_of(_file(qas), "f.json", train)
    assert [q.id for q in found.questions] == kept and dict(found.skipped) == skipped


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", "not JSON"),
        (b"[1, 2", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "top level must be a dict"),
        (json.dumps(_file([_qa("a", "France", 12)], version="v2.0")).encode(), "version v2.0"),
        (json.dumps(_file([{**_qa("a", "France", 12), "is_impossible": True}])).encode(), "SQuAD v2.0"),
        (json.dumps(_file([_qa("a", "France", "12")])).encode(), "'answer_start' must be a int"),
        (json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}).encode(), "'context' must be a str"),
        (json.dumps({"data": {}}).encode(), "'data' must be a list"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_bad_squad_files_are_one_line_errors(tmp_path, content, words):
    (tmp_path / "train-v1.1.json").write_bytes(content)
    (tmp_path / "dev-v1.1.json").write_text(json.dumps(_file([_qa("a", "France", 12)])))
    with pytest.raises(DataError, match=words.replace("(", r"\(").replace(")", r"\)")) as err:
        load_task("squad", tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("files", [[], ["train-v1.1.json"], ["train-a.json", "train-b.json", "dev.json"]])
def test_a_folder_needs_one_train_and_one_dev_file(tmp_path, files):
    for name in files:
        (tmp_path / name).write_text(json.dumps(_file([_qa("a", "France", 12)])))
    with pytest.raises(DataError, match=r"expected one (train|dev)\*\.json"):
        load_task("squad", tmp_path)


@needs_squad
def test_the_shared_files_read_whole():
    data = load_task("squad", SQUAD)
    assert len(data.train) + len(data.validation) == 11_877 and len(data.test) == 10_570
    assert data.skipped == {} and data.spec.metrics == ("f1", "exact_match") and data.spec.max_length == 384
    assert not {q.id for q in data.validation} & {q.id for q in data.train}


def _word_tokenizer(tmp_path: Path):
    return toy_tokenizer(tmp_path)


CONTEXT = " ".join(["movie was"] * 12 + ["good plot"] + ["acting it"] * 12)  # 50 words; "good plot" in the middle
ANSWER_AT = CONTEXT.index("good plot")


@pytest.mark.parametrize(("max_length", "stride"), [(64, 8), (24, 6), (16, 4)])
def test_a_long_context_is_windowed_and_only_windows_holding_the_answer_point_at_it(tmp_path, max_length, stride):
    tok = _word_tokenizer(tmp_path)
    question = Question("q", "good film", CONTEXT, ("good plot",), (ANSWER_AT,))
    windows, dropped = training_windows(tok, [question], max_length, stride)
    assert dropped == 0 and (len(windows) > 1) == (max_length < 60)
    holding = [w for w in windows if w["start_positions"] > 0]
    assert holding, "some window holds the answer"
    for w in holding:
        assert tok.decode(w["input_ids"][w["start_positions"] : w["end_positions"] + 1]) == "good plot"
    assert all(len(w["input_ids"]) <= max_length for w in windows)


def test_a_question_whose_answer_fits_no_window_is_dropped_and_counted(tmp_path):
    tok = _word_tokenizer(tmp_path)
    long_answer = " ".join(["good plot"] * 8)
    context = "bad film " + long_answer + " acting it"
    fits = Question("a", "film", "bad film good plot", ("good plot",), (9,))
    too_long = Question("b", "film", context, (long_answer,), (9,))
    windows, dropped = training_windows(tok, [fits, too_long], max_length=12, stride=2)
    assert dropped == 1 and windows and all(w["start_positions"] > 0 for w in windows)


def test_an_empty_context_gets_an_empty_answer(tmp_path):
    from transformers import BertForQuestionAnswering

    tok = _word_tokenizer(tmp_path)
    model = BertForQuestionAnswering(BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1,
                                                num_attention_heads=2, intermediate_size=32))  # fmt: skip
    questions = [Question("e", "good film", "", ("plot",), (0,)), Question("f", "good", "the plot", ("plot",), (4,))]
    answers = predict_answers(model, tok, questions, max_length=16, stride=4)
    assert answers[0] == "" and answers[1] in ("the", "plot", "the plot")


class Oracle(torch.nn.Module):
    """Start and end logits that point at the labels of the window (looked up by its tokens): what a perfect
    reader would output, to check that decoding maps windows back to the context's characters."""

    def __init__(self, windows: list[dict]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.labels = {tuple(w["input_ids"]): (w["start_positions"], w["end_positions"]) for w in windows}

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        start, end = torch.full(input_ids.shape, -10.0), torch.full(input_ids.shape, -10.0)
        for row, ids in enumerate(input_ids.tolist()):
            length = int(attention_mask[row].sum()) if attention_mask is not None else len(ids)
            s, e = self.labels[tuple(ids[:length])]
            start[row, s], end[row, e] = 10.0 + 5.0 * (s > 0), 10.0 + 5.0 * (e > 0)  # the span beats [CLS]
        return QuestionAnsweringModelOutput(start_logits=start, end_logits=end)


@pytest.mark.skipif(not minilm_available() or not SQUAD.is_dir(), reason="needs MiniLM's tokenizer and SQuAD")
@pytest.mark.parametrize(("max_length", "stride"), [(384, 128), (96, 32)])
def test_decoding_a_perfect_readers_windows_gives_the_gold_answers(minilm_path, max_length, stride):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path)
    questions = load_task("squad", SQUAD).train[:300]
    windows, dropped = training_windows(tok, questions, max_length, stride)
    answers = predict_answers(Oracle(windows), tok, questions, max_length, stride, batch_size=16)
    scores = squad_scores(answers, [q.answers for q in questions])
    # a few gold answers start or end inside a word piece's word: the token span then holds a little more
    assert dropped == 0 and scores["exact_match"] >= 0.97 and scores["f1"] >= 0.99


def _tiny_squad(folder: Path, questions: int = 24) -> Path:
    """The first questions of the shared files (or made-up ones without them), in the official layout."""
    folder.mkdir(parents=True)
    for split, source in (("train", "train-subset-v1.1.json"), ("dev", "dev-v1.1.json")):
        if SQUAD.is_dir():
            paragraphs = json.loads((SQUAD / source).read_text())["data"][0]["paragraphs"][:4]
            data = {"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}
            keep = questions if split == "train" else questions // 3
            for p in paragraphs:
                p["qas"], keep = p["qas"][:keep], max(0, keep - len(p["qas"]))
            data["data"][0]["paragraphs"] = [p for p in paragraphs if p["qas"]]
        else:
            data = _file([_qa(f"{split}{i}", "France", 12) for i in range(questions)])
        (folder / f"{split}-v1.1.json").write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def squad_dir(tmp_path_factory) -> Path:
    return _tiny_squad(tmp_path_factory.mktemp("squad") / "squad")


def _squad_args(model_dir, squad_dir, output, *extra) -> list[str]:
    args = _compress_args(model_dir, squad_dir, output, *extra, task="squad")
    return [*args, "--max-length", "32", "--doc-stride", "8"]


@pytest.fixture(scope="module")
def dense_squad(model_dir, squad_dir, tmp_path_factory) -> Path:
    from dsformer.cli import main

    output = tmp_path_factory.mktemp("squad-runs") / "dense"
    assert main(_squad_args(model_dir, squad_dir, output, "--method", "dense")) == 0
    return output


def test_dense_question_answering_reports_exact_match_and_f1(dense_squad):
    metrics = metrics_of(dense_squad)
    assert metrics["task"] == "squad" and metrics["metric"] == "f1" and set(metrics["test"]) == {"f1", "exact_match"}
    assert metrics["config"]["train"]["max_length"] == 32 and metrics["config"]["train"]["doc_stride"] == 8


@pytest.mark.parametrize(
    "extra",
    [
        ["--method", "svd"],
        ["--method", "fwsvd"],
        ["--method", "nm"],
        ["--method", "ds-conventional"],
        ["--method", "dsformer", "--calibrate"],
        ["--method", "distil", "--teacher", "DENSE"],
        ["--method", "dsformer", "--teacher", "DENSE"],
    ],
)
def test_every_method_trains_and_evaluates_on_squad(capsys, tmp_path, model_dir, squad_dir, dense_squad, extra):
    extra = [str(dense_squad) if e == "DENSE" else e for e in extra]
    output = tmp_path / "out"
    start = ["--model", str(dense_squad)] if "distil" not in extra else []
    code, out, err = run_cli(capsys, [*_squad_args(model_dir, squad_dir, output, *extra), *start])
    assert code == 0, err
    assert "exact_match" in out and set(metrics_of(output)["test"]) == {"f1", "exact_match"}
    code, out, err = run_cli(capsys, ["evaluate", output, "--data-dir", squad_dir])
    assert code == 0, err
    assert "exact_match" in out and "f1" in out


def test_a_classifier_is_refused_for_squad_and_a_reader_for_a_classification_task(
    capsys, tmp_path, model_dir, squad_dir, dense_squad, sst2_dir
):
    argv = _compress_args(model_dir, sst2_dir, tmp_path / "out", "--method", "svd", "--model", dense_squad)
    assert "not a model with a classification head" in assert_one_error_line(*run_cli(capsys, argv))
    argv = ["evaluate", dense_squad, "--task", "sst2", "--data-dir", sst2_dir]
    assert "no head for sst2" in assert_one_error_line(*run_cli(capsys, argv))
    assert not (tmp_path / "out").exists()


def test_a_bad_squad_folder_fails_before_any_training(capsys, tmp_path, model_dir):
    folder = tmp_path / "squad"
    folder.mkdir()
    (folder / "train-v1.1.json").write_text("")
    (folder / "dev-v1.1.json").write_text("{}")
    output = tmp_path / "out"
    line = assert_one_error_line(*run_cli(capsys, _squad_args(model_dir, folder, output, "--method", "dense")))
    assert "not JSON" in line and not output.exists()


def test_a_stride_of_half_the_window_is_refused(capsys, tmp_path, model_dir, squad_dir):
    argv = [*_squad_args(model_dir, squad_dir, tmp_path / "out", "--method", "dense"), "--doc-stride", "16"]
    assert "--doc-stride 16" in assert_one_error_line(*run_cli(capsys, argv))


def test_the_model_loads_with_a_span_head(model_dir):
    from dsformer.harness.models import load_pretrained

    model, _ = load_pretrained(str(model_dir), task_head=True, kind="qa")
    assert type(model).__name__ == "BertForQuestionAnswering" and isinstance(model.bert, BertModel)
    assert isinstance(model.config, BertConfig)


def test_an_interrupted_squad_run_resumes_to_the_same_result(capsys, tmp_path, model_dir, squad_dir, monkeypatch):
    """Batches grouped by length (QA's sampler) are drawn the same after a resume as in one go."""
    from test_pipeline import interrupt_at

    extra = ["--method", "dense", "--epochs", "2"]
    whole = tmp_path / "whole"
    assert run_cli(capsys, _squad_args(model_dir, squad_dir, whole, *extra))[0] == 0
    interrupt_at(monkeypatch, metrics_of(whole)["steps"] // 2 + 1)  # in the second epoch
    cut = tmp_path / "cut"
    assert run_cli(capsys, _squad_args(model_dir, squad_dir, cut, *extra))[0] == 130
    monkeypatch.undo()
    assert run_cli(capsys, _squad_args(model_dir, squad_dir, cut, *extra, "--resume"))[0] == 0
    a, b = metrics_of(whole), metrics_of(cut)
    assert a["test"] == b["test"] and a["history"] == b["history"]
