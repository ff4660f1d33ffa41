"""``dsformer finetune`` / ``evaluate`` / ``summary`` end to end, in-process, on a tiny saved BERT (with its
tokenizer) and tiny GLUE-format task folders: every method, trainer crossing, distillation, the dense
reference, the summary table, bad input, and a regression task."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import TOY_NEUTRAL, TOY_WORDS, toy_examples, toy_tokenizer
from transformers import BertConfig, BertForSequenceClassification, BertModel

import dsformer
from dsformer.cli import main
from dsformer.errors import DsformerError
from dsformer.harness.finetune import RunConfig, default_output
from dsformer.harness.methods import METHODS as REGISTRY
from dsformer.harness.prepare import make_student
from dsformer.harness.training import TaskTrainer, latest_checkpoint
from dsformer.surgery import compact_layers

ERROR = "dsformer: error:"
METHODS = [name for name in REGISTRY if name != "distil"]  # distil needs a teacher: tested on its own
DEFAULT_TRAINER = {name: (m.trainers or ("-",))[0] for name, m in REGISTRY.items()}
STRUCTURE = {name: m.structure for name, m in REGISTRY.items()}
METRICS_KEYS = {
    "method",
    "trainer",
    "task",
    "metric",
    "ratio",
    "test",
    "validation",
    "ratios",
    "model_bytes",
    "hardware",
    "config",
    "processes",
}
LAYERS, BLOCK_LINEARS = 2, 6


# ---------------------------------------------------------------- fixtures


def _sentences(n: int, seed: int) -> list[tuple[str, int]]:
    return [(e.text_a, int(e.label)) for e in toy_examples(n, seed)]


def _write_sst2(folder: Path, train_rows: list[str] | None = None) -> Path:
    folder.mkdir(parents=True)
    train = train_rows if train_rows is not None else [f"{s}\t{y}" for s, y in _sentences(64, 0)]
    (folder / "train.tsv").write_text("sentence\tlabel\n" + "".join(row + "\n" for row in train))
    (folder / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t{y}\n" for s, y in _sentences(16, 1)))
    return folder


def _write_stsb(folder: Path) -> Path:
    folder.mkdir(parents=True)
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    for name, n, seed in (("train.tsv", 64, 2), ("dev.tsv", 16, 3)):
        rng = random.Random(seed)
        rows = []
        for i, (text, label) in enumerate(_sentences(n, seed)):
            score = (4.0 if label else 1.0) + rng.uniform(-0.5, 0.5)
            other = " ".join(rng.choices(TOY_NEUTRAL, k=3))
            rows.append(f"{i}\tmain-news\tfile\t2012\t{i}\tnone\tnone\t{text}\t{other}\t{score:.3f}\n")
        (folder / name).write_text(head + "".join(rows))
    return folder


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(scope="module")
def model_dir(root: Path) -> Path:
    """A plain Hugging Face BertModel folder (hidden 32, intermediate 64, 2 layers) with its tokenizer."""
    tokenizer = toy_tokenizer(root)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(TOY_WORDS),
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    folder = root / "tiny-bert"
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sst2_dir(root: Path) -> Path:
    return _write_sst2(root / "SST-2")


@pytest.fixture(scope="module")
def stsb_dir(root: Path) -> Path:
    return _write_stsb(root / "STS-B")


def _compress_args(model_dir: Path, data_dir: Path, output: Path, *extra, task: str = "sst2") -> list[str]:
    args = ["finetune", "--model", model_dir, "--task", task, "--data-dir", data_dir, "--output", output]
    args += ["--quiet", "--epochs", "1", "--batch-size", "8", "--max-length", "16"]
    extra = [str(a) for a in extra]
    method = extra[extra.index("--method") + 1] if "--method" in extra else "dsformer"
    trainer = extra[extra.index("--trainer") + 1] if "--trainer" in extra else None
    if method in REGISTRY and (trainer or (*REGISTRY[method].trainers, "-")[0]) == "stf":
        args += ["--refresh-every", "3"]  # STF re-projects within the few steps of these runs
    return [str(a) for a in [*args, *extra]]


@pytest.fixture(scope="module")
def dense_run(root: Path, model_dir: Path, sst2_dir: Path) -> Path:
    """A finished dense run (the teacher and the reference of the tests below)."""
    output = root / "runs" / "dense"
    assert main(_compress_args(model_dir, sst2_dir, output, "--method", "dense")) == 0
    return output


@pytest.fixture(scope="module")
def svd_run(root: Path, model_dir: Path, sst2_dir: Path) -> Path:
    output = root / "runs" / "svd"
    assert main(_compress_args(model_dir, sst2_dir, output, "--method", "svd", "--ratio", "2")) == 0
    return output


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def interrupt_at(monkeypatch, k: int) -> None:
    """Ctrl-C during the k-th training step of this process (counting across runs)."""
    real, calls = TaskTrainer.compute_loss, [0]

    def compute_loss(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TaskTrainer, "compute_loss", compute_loss)


def work_folder(output: Path) -> Path:
    return output.with_name(output.name + ".work")


def metrics_of(output: Path) -> dict:
    return json.loads((output / "metrics.json").read_text())


def assert_one_error_line(code: int, out: str, err: str) -> str:
    assert code == 2, (out, err)
    lines = err.strip("\n").splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(ERROR), err
    assert "Traceback" not in err
    return lines[0]


def evaluate_line(capsys, folder: Path, *extra: str) -> str:
    code, out, err = run_cli(capsys, ["evaluate", folder, *extra])
    assert code == 0, err
    lines = out.strip().splitlines()
    assert len(lines) == 1, out
    return lines[0]


# ---------------------------------------------------------------- every method


@pytest.mark.parametrize("method", METHODS)
def test_method_runs_saves_and_evaluates(capsys, tmp_path, model_dir, sst2_dir, method):
    output = tmp_path / method
    code, out, err = run_cli(capsys, _compress_args(model_dir, sst2_dir, output, "--method", method, "--ratio", "2"))
    assert code == 0, err
    assert f"saved to {output}" in out
    assert not work_folder(output).exists()  # checkpoints go once the run has finished
    assert not [p.name for p in tmp_path.iterdir() if p.name != method]  # no temporary folders left beside it

    metrics = metrics_of(output)
    assert METRICS_KEYS <= metrics.keys()
    assert metrics["method"] == method
    assert metrics["trainer"] == DEFAULT_TRAINER[method]
    assert metrics["task"] == "sst2"
    assert metrics["metric"] == "accuracy"
    assert metrics["ratio"] == (1.0 if method == "dense" else 2.0)
    assert set(metrics["test"]) == {"accuracy"} and 0.0 <= metrics["test"]["accuracy"] <= 1.0
    assert set(metrics["validation"]) == {"accuracy"}
    assert metrics["config"]["method"] == method and metrics["config"]["data_dir"] == str(sst2_dir)
    assert metrics["config"]["train"]["epochs"] == 1.0 and metrics["config"]["train"]["batch_size"] == 8
    assert isinstance(metrics["hardware"], (dict, str)) and metrics["hardware"]
    assert metrics["sizes"] == {"train": 58, "validation": 6, "test": 16}
    assert metrics["start_sha256"] is None  # a plain Hugging Face start has no recorded checksum
    assert metrics["steps"] == 8  # ceil(58 / 8) for one epoch
    if method == "dense":
        assert metrics["ratios"] is None and metrics["layers"] is None
        assert metrics["model_bytes"] == metrics["dense_model_bytes"]
    else:
        assert metrics["ratios"]["layers"] == len(metrics["layers"]) == LAYERS * BLOCK_LINEARS
        assert metrics["ratios"]["ratio_params"] >= 2.0 - 1e-9
        assert metrics["model_bytes"] < metrics["dense_model_bytes"]

    model = dsformer.load(output)
    assert isinstance(model, BertForSequenceClassification)
    layers = compact_layers(model)
    if method == "dense":
        assert not layers
    else:
        assert len(layers) == LAYERS * BLOCK_LINEARS
        assert {layer.structure for layer in layers.values()} == {STRUCTURE[method]}

    line = evaluate_line(capsys, output)
    assert "test (16 examples)" in line
    # the folder as saved scores what the run reported
    assert f"accuracy {metrics['test']['accuracy']:.4f}" in line
    # int8 on top: the weights round, the folder is left as it was
    record = tmp_path / "int8.json"
    assert "int8 weights" in evaluate_line(capsys, output, "--int8", "--json", str(record))
    saved = json.loads(record.read_text())
    assert saved["int8"]["layers"] == LAYERS * BLOCK_LINEARS and saved["int8"]["ratio"] > 1.5
    assert set(saved["test"]) == {"accuracy"} and saved["command"].startswith("dsformer evaluate")
    assert f"accuracy {metrics['test']['accuracy']:.4f}" in evaluate_line(capsys, output)
    # int8 products (compact layers, or a dense model's block linears): a close score
    record = tmp_path / "int8-path.json"
    assert "int8 backend" in evaluate_line(capsys, output, "--backend", "int8", "--json", str(record))
    saved = json.loads(record.read_text())
    assert saved["backend"] == "int8" and abs(saved["test"]["accuracy"] - metrics["test"]["accuracy"]) <= 0.25


# ---------------------------------------------------------------- trainers


@pytest.mark.parametrize(
    "method,trainer", [("svd", "stf"), ("nm", "conventional"), ("fwsvd", "conventional"), ("dsformer", "stf")]
)
def test_trainer_crossing_works(capsys, tmp_path, model_dir, sst2_dir, method, trainer):
    output = tmp_path / "out"
    argv = _compress_args(model_dir, sst2_dir, output, "--method", method, "--trainer", trainer)
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    metrics = metrics_of(output)
    assert metrics["method"] == method and metrics["trainer"] == trainer
    assert f"{method} ({trainer})" in out
    layers = compact_layers(dsformer.load(output))
    assert len(layers) == LAYERS * BLOCK_LINEARS
    assert {layer.structure for layer in layers.values()} == {STRUCTURE[method]}
    assert not work_folder(output).exists()


@pytest.mark.parametrize(
    "method,trainer,hint",
    [
        ("dsformer", "conventional", "ds-conventional"),
        ("ds-conventional", "stf", "dsformer"),
        ("fwsvd", "stf", "svd"),
    ],
)
def test_trainer_crossing_rejected(capsys, tmp_path, model_dir, sst2_dir, method, trainer, hint):
    output = tmp_path / "out"
    argv = _compress_args(model_dir, sst2_dir, output, "--method", method, "--trainer", trainer)
    line = assert_one_error_line(*run_cli(capsys, argv))
    assert f"--method {hint}" in line
    assert not output.exists() and not work_folder(output).exists()


@pytest.mark.parametrize("method", ["dsformer", "ds-conventional"])
def test_fisher_weights_ds_fits(capsys, tmp_path, model_dir, sst2_dir, method):
    output = tmp_path / "out"
    code, out, err = run_cli(capsys, _compress_args(model_dir, sst2_dir, output, "--method", method, "--fisher"))
    assert code == 0, err
    assert metrics_of(output)["config"]["fisher"] is True
    assert {layer.structure for layer in compact_layers(dsformer.load(output)).values()} == {"ds"}


@pytest.mark.parametrize("method", ["dsformer", "svd"])
def test_calibrated_fits_on_the_training_inputs(capsys, tmp_path, model_dir, sst2_dir, method):
    output = tmp_path / "out"
    code, out, err = run_cli(capsys, _compress_args(model_dir, sst2_dir, output, "--method", method, "--calibrate"))
    assert code == 0, err
    assert metrics_of(output)["config"]["calibrate"] is True
    assert output.name == "out"


@pytest.mark.parametrize(
    ("method", "calibrate", "fit", "suffix"),
    [
        ("dsformer", None, True, ""),  # dsformer fits the layers' outputs by default
        ("dsformer", True, True, ""),
        ("dsformer", False, False, "-weight-fit"),
        ("svd", None, False, ""),
        ("svd", True, True, "-calibrated"),
        ("dense", None, False, ""),
    ],
)
def test_calibration_defaults_to_the_methods_own_and_names_a_departure(method, calibrate, fit, suffix):
    config = RunConfig(method=method, calibrate=calibrate)
    assert config.fits_outputs is fit
    assert default_output(config).name.endswith(("2x" if method != "dense" else method) + suffix)


def test_no_calibrate_fits_dsformer_to_its_weights(capsys, tmp_path, model_dir, sst2_dir):
    output = tmp_path / "out"
    assert run_cli(capsys, _compress_args(model_dir, sst2_dir, output, "--no-calibrate"))[0] == 0
    assert metrics_of(output)["config"]["calibrate"] is False


@pytest.mark.parametrize(("method", "extra"), [("dsformer", ["--calibrate"]), ("ds-conventional", []), ("svd", [])])
def test_global_budget_gives_layers_their_own_ratios_within_the_total(
    capsys, tmp_path, model_dir, sst2_dir, method, extra
):
    output = tmp_path / "out"
    argv = _compress_args(model_dir, sst2_dir, output, "--method", method, "--ratio", "2", "--global-budget", *extra)
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    metrics = metrics_of(output)
    assert metrics["config"]["global_budget"] is True
    layers = compact_layers(dsformer.load(output))
    dense = {name: layer.in_features * layer.out_features for name, layer in layers.items()}
    assert len({round(dense[name] / layer.value_params(), 1) for name, layer in layers.items()}) > 1
    assert sum(dense.values()) / sum(layer.value_params() for layer in layers.values()) >= 2.0 * 0.97
    recorded = {layer["name"]: layer["params"] for layer in metrics["layers"]}  # each layer's choice, in the result
    assert recorded == {name: layer.value_params() for name, layer in layers.items()}
    assert "global" in default_output(RunConfig(method=method, global_budget=True)).name


@pytest.mark.parametrize(("method", "word"), [("nm", "nm"), ("dense", "dense"), ("ds-shared", "shares")])
def test_global_budget_without_per_layer_ratios_is_rejected(capsys, tmp_path, model_dir, sst2_dir, method, word):
    output = tmp_path / "out"
    argv = _compress_args(model_dir, sst2_dir, output, "--method", method, "--global-budget")
    line = assert_one_error_line(*run_cli(capsys, argv))
    assert "--global-budget" in line and word in line
    assert not output.exists() and not work_folder(output).exists()


def test_calibrate_without_a_structure_is_rejected(capsys, tmp_path, model_dir, sst2_dir):
    output = tmp_path / "out"
    argv = _compress_args(model_dir, sst2_dir, output, "--method", "dense", "--calibrate")
    assert "--calibrate" in assert_one_error_line(*run_cli(capsys, argv))
    assert not output.exists()


def test_fisher_without_a_fit_to_weight_is_rejected(capsys, tmp_path, model_dir, sst2_dir):
    output = tmp_path / "out"
    argv = _compress_args(model_dir, sst2_dir, output, "--method", "nm", "--fisher")
    assert "--fisher" in assert_one_error_line(*run_cli(capsys, argv))
    assert not output.exists()


def test_unknown_trainer_is_an_argparse_error(capsys, tmp_path, model_dir, sst2_dir):
    with pytest.raises(SystemExit) as exc:
        main(_compress_args(model_dir, sst2_dir, tmp_path / "out", "--trainer", "magic"))
    assert exc.value.code == 2
    assert "magic" in capsys.readouterr().err


def test_dense_with_a_trainer_is_rejected(capsys, tmp_path, model_dir, sst2_dir):
    output = tmp_path / "out"
    argv = _compress_args(model_dir, sst2_dir, output, "--method", "dense", "--trainer", "stf")
    assert_one_error_line(*run_cli(capsys, argv))
    assert not output.exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--method", "svd", "--polish", "0.3"], "does not train with STF"),
        (["--method", "dsformer", "--polish", "1"], "polish is a fraction"),
        (["--method", "dsformer", "--polish", "-0.2"], "polish is a fraction"),
        (["--method", "ds-shared", "--polish", "0.3"], "ds-shared cannot polish"),
    ],
)
def test_polish_that_cannot_apply_is_rejected(capsys, tmp_path, model_dir, sst2_dir, extra, words):
    output = tmp_path / "out"
    assert words in assert_one_error_line(*run_cli(capsys, _compress_args(model_dir, sst2_dir, output, *extra)))
    assert not output.exists() and not work_folder(output).exists()


def test_dsformer_with_polish_saves_a_compact_model(capsys, tmp_path, model_dir, sst2_dir):
    output = tmp_path / "polished"
    argv = _compress_args(model_dir, sst2_dir, output, "--method", "dsformer", "--polish", "0.5")
    code, _, err = run_cli(capsys, argv)
    assert code == 0, err
    metrics = metrics_of(output)
    assert metrics["config"]["schedule"]["polish"] == 0.5 and metrics["ratios"]["ratio_params"] > 1.5
    assert metrics["best_step"] > metrics["steps"] // 2  # selection ran on the compact model only
    assert compact_layers(dsformer.load(output))


# ---------------------------------------------------------------- distillation and the dense reference


def test_distil_from_a_dense_teacher(capsys, tmp_path, model_dir, sst2_dir, dense_run):
    output = tmp_path / "distil"
    argv = _compress_args(model_dir, sst2_dir, output, "--method", "distil", "--teacher", dense_run)
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    metrics = metrics_of(output)
    assert metrics["method"] == "distil"
    assert metrics["ratios"]["ratio_params"] == pytest.approx(LAYERS / 1)  # every other of 2 layers kept
    assert metrics["ratios"]["ratio_model_bytes"] > 1.0
    model = dsformer.load(output)
    assert model.config.num_hidden_layers == 1 and len(model.bert.encoder.layer) == 1
    assert "accuracy" in evaluate_line(capsys, output)
    assert not work_folder(output).exists()


@pytest.mark.parametrize(("ratio", "kept"), [(2, [0, 2, 4]), (3, [0, 3]), (2.8, [0, 3]), (1.5, [0, 2, 3, 4]), (6, [0])])
def test_student_keeps_evenly_spaced_blocks(ratio, kept):
    config = BertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=6, num_attention_heads=2, intermediate_size=8)
    teacher = BertModel(config)
    for i, block in enumerate(teacher.encoder.layer):
        block.output.dense.bias.data.fill_(i)  # a mark to tell the blocks apart
    student = make_student(teacher, ratio)
    assert [int(b.output.dense.bias[0]) for b in student.encoder.layer] == kept
    assert student.config.num_hidden_layers == len(kept) and teacher.config.num_hidden_layers == 6


@pytest.mark.parametrize("ratio", [1.0, 0.5, 13])
def test_student_of_all_or_no_blocks_is_refused(ratio):
    config = BertConfig(vocab_size=8, hidden_size=8, num_hidden_layers=6, num_attention_heads=2, intermediate_size=8)
    with pytest.raises(DsformerError, match="keeps at least one and fewer than all"):
        make_student(BertModel(config), ratio)


def test_distil_without_teacher_exits_2(capsys, tmp_path, model_dir, sst2_dir):
    output = tmp_path / "distil"
    line = assert_one_error_line(*run_cli(capsys, _compress_args(model_dir, sst2_dir, output, "--method", "distil")))
    assert "--teacher" in line
    assert not output.exists() and not work_folder(output).exists()


def test_teacher_that_is_not_a_saved_model_exits_2(capsys, tmp_path, model_dir, sst2_dir):
    output = tmp_path / "distil"
    argv = _compress_args(model_dir, sst2_dir, output, "--method", "distil", "--teacher", tmp_path / "nope")
    assert_one_error_line(*run_cli(capsys, argv))
    assert not output.exists() and not work_folder(output).exists()


@pytest.mark.parametrize("method", ["dsformer", "ds-conventional"])
def test_compress_starts_from_a_fine_tuned_dense_run(capsys, tmp_path, model_dir, sst2_dir, dense_run, method):
    """The usual pipeline: fine-tune dense, then compress that model (its task head included)."""
    output = tmp_path / "from-dense"
    code, _, err = run_cli(capsys, _compress_args(dense_run, sst2_dir, output, "--method", method))
    assert code == 0, err
    metrics = metrics_of(output)
    assert metrics["config"]["model"] == str(dense_run)
    assert (
        metrics["start_sha256"] == dsformer.checkpoint.read_meta(dense_run)["weights"]["sha256"]
    )  # which start it was
    assert metrics["ratios"]["ratio_params"] == pytest.approx(2.0, rel=0.02)
    start = dsformer.load(dense_run)
    assert metrics["dense_model_bytes"] == sum(t.numel() * t.element_size() for t in start.state_dict().values())


@pytest.mark.parametrize("start, task, words", [("svd", "sst2", "compressed"), ("dense", "stsb", "labels")])
def test_compressing_a_compressed_run_or_another_tasks_model_is_refused(
    capsys, tmp_path, sst2_dir, stsb_dir, svd_run, dense_run, start, task, words
):
    folder, data = (svd_run if start == "svd" else dense_run), (sst2_dir if task == "sst2" else stsb_dir)
    output = tmp_path / f"again-{task}"
    line = assert_one_error_line(*run_cli(capsys, _compress_args(folder, data, output, "--method", "svd", task=task)))
    assert words in line
    assert not output.exists() and not work_folder(output).exists()


def test_reference_adds_difference_to_dense(capsys, tmp_path, model_dir, sst2_dir, dense_run):
    output = tmp_path / "svd"
    reference = dense_run / "metrics.json"
    argv = _compress_args(model_dir, sst2_dir, output, "--method", "svd", "--reference", reference)
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    metrics, dense = metrics_of(output), metrics_of(dense_run)
    assert metrics["dense_test"] == dense["test"]["accuracy"]
    assert metrics["difference_to_dense"] == pytest.approx(metrics["test"]["accuracy"] - dense["test"]["accuracy"])
    assert f"{100 * metrics['difference_to_dense']:+.2f}" in out  # the "vs dense" column
    assert "dense_test" not in dense and "difference_to_dense" not in dense


def test_missing_reference_exits_2_before_training(capsys, tmp_path, model_dir, sst2_dir):
    output = tmp_path / "svd"
    argv = _compress_args(model_dir, sst2_dir, output, "--method", "svd", "--reference", tmp_path / "no.json")
    assert_one_error_line(*run_cli(capsys, argv))
    assert not output.exists()


# ---------------------------------------------------------------- summary


def test_summary_lists_the_runs(capsys, dense_run, svd_run):
    code, out, err = run_cli(capsys, ["summary", dense_run, svd_run, "--no-latency"])
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["method", "ratio", "metric", "test"]
    assert len(lines) == 4  # head, rule, two runs
    assert lines[2].startswith("dense ") and "1.00x" in lines[2]
    assert lines[3].startswith("svd (conventional)")
    assert f"{metrics_of(svd_run)['ratios']['ratio_params']:.2f}x" in lines[3]
    assert "latency:" not in out


def test_summary_json_holds_latency_and_hardware(capsys, tmp_path, dense_run, svd_run):
    out = tmp_path / "summary.json"
    code, _, err = run_cli(capsys, ["summary", dense_run, svd_run, "--json", out])
    assert code == 0, err
    summary = json.loads(out.read_text())
    assert [r["method"] for r in summary["runs"]] == ["dense", "svd"]
    assert all(r["latency_ms"] > 0 for r in summary["runs"]) and summary["hardware"]["cores"] >= 1
    assert summary["runs"][1]["test"] == metrics_of(svd_run)["test"]


def test_summary_without_metrics_exits_2(capsys, tmp_path, dense_run, model_dir):
    line = assert_one_error_line(*run_cli(capsys, ["summary", dense_run, model_dir, "--no-latency"]))
    assert str(model_dir) in line and "metrics.json" in line
    line = assert_one_error_line(*run_cli(capsys, ["summary", tmp_path / "absent", "--no-latency"]))
    assert "metrics.json" in line


def test_summary_of_a_damaged_metrics_json_exits_2(capsys, tmp_path, dense_run):
    broken = tmp_path / "broken"
    shutil.copytree(dense_run, broken)
    (broken / "metrics.json").write_text('{"method": "dense", "te')  # cut short by a full disk
    line = assert_one_error_line(*run_cli(capsys, ["summary", broken, "--no-latency"]))
    assert "metrics.json" in line and "JSONDecodeError" in line
    line = assert_one_error_line(*run_cli(capsys, ["evaluate", broken]))
    assert "not a run's metrics.json" in line


def test_evaluate_of_a_model_without_a_task_head_exits_2(capsys, tmp_path, model_dir, sst2_dir):
    fitted = tmp_path / "fitted"
    assert run_cli(capsys, ["compress", "--model", model_dir, "--ratio", "2", "--output", fitted, "--quiet"])[0] == 0
    argv = ["evaluate", fitted, "--task", "sst2", "--data-dir", sst2_dir]
    line = assert_one_error_line(*run_cli(capsys, argv))
    assert "no task head" in line and "dsformer compress" in line


def test_bench_of_a_dense_run_factorizes_it_first(capsys, dense_run):
    argv = ["bench", dense_run, "--batch", "1", "--seq", "8", "--repeats", "1", "--no-layers", "--ratio", "2"]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    assert "factorizing" in out and "with ds at 2x" in out  # not the dense model timed against itself


@pytest.mark.parametrize("start", ["dense", "svd"])
def test_quantize_writes_a_smaller_folder_and_evaluates_it(capsys, tmp_path, dense_run, svd_run, start):
    folder = dense_run if start == "dense" else svd_run
    output = tmp_path / "int8"
    code, out, err = run_cli(capsys, ["quantize", folder, output])
    assert code == 0, err
    assert "int8 model written to" in out and "test accuracy" in out
    size = {f: (f / "model.safetensors").stat().st_size for f in (folder, output)}
    assert size[output] < size[folder]
    metrics, before = metrics_of(output), metrics_of(folder)
    assert metrics["test_before_int8"] == before["test"] and metrics["int8"]["quantized_from"] == str(folder)
    assert metrics["model_bytes"] < before["model_bytes"] and metrics["method"] == before["method"]
    # the saved folder evaluates to what quantize measured, and the summary lists it
    line = evaluate_line(capsys, output)
    assert f"accuracy {metrics['test']['accuracy']:.4f}" in line
    code, out, err = run_cli(capsys, ["summary", folder, output, "--no-latency"])
    assert code == 0 and len(out.strip().splitlines()) == 4, err


def test_quantize_refuses_an_int8_folder_and_keeps_other_folders(capsys, tmp_path, svd_run):
    output = tmp_path / "int8"
    assert run_cli(capsys, ["quantize", svd_run, output])[0] == 0
    assert "already stored as int8" in assert_one_error_line(*run_cli(capsys, ["quantize", output, tmp_path / "x"]))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert_one_error_line(*run_cli(capsys, ["quantize", svd_run, tmp_path / "mine"]))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# ---------------------------------------------------------------- bad input


def _bad_train(folder: Path, bad_row: str) -> Path:
    rows = [f"{s}\t{y}" for s, y in _sentences(64, 0)]
    rows.insert(4, bad_row)  # file line 6 (after the header)
    return _write_sst2(folder, rows)


# name: (extra arguments, data folder kind, words the error line must contain)
BAD_INPUTS = {
    "unknown task": (["--task", "nosuchtask"], "sst2", ["nosuchtask", "sst2"]),
    "data dir missing": ([], "missing", ["--data-dir", "not a folder"]),
    "malformed row": ([], "malformed", ["train.tsv:6", "columns"]),
    "unknown label": ([], "bad label", ["train.tsv:6", "unknown label", "'2'"]),
    "ratio 1": (["--method", "svd", "--ratio", "1"], "sst2", ["> 1"]),
    "ratio 1 dsformer": (["--method", "dsformer", "--ratio", "1"], "sst2", ["> 1"]),
    "output not ours": ([], "sst2", ["not empty", "more than a dsformer output"]),
    "resume without checkpoint": (["--method", "svd", "--resume"], "sst2", ["--resume", "no checkpoint"]),
    "not utf-8": ([], "latin-1", ["train.tsv:6", "not UTF-8"]),
    "batch size 0": (["--batch-size", "0"], "sst2", ["batch_size must be at least 1", "0"]),
    "negative lr": (["--lr", "-1"], "sst2", ["lr must be positive"]),
    "no epochs": (["--epochs", "0"], "sst2", ["epochs must be positive"]),
    "max train 0": (["--max-train", "0"], "sst2", ["max_train must be at least 1"]),
    "negative seed": (["--seed", "-1"], "sst2", ["seed must be in [0"]),
    "device gpu": (["--device", "gpu"], "sst2", ["give cpu, cuda or cuda:N"]),
    "device cuda:1": (["--device", "cuda:1"], "sst2", ["cuda"]),
    "longer than the model reads": (["--max-length", "64"], "sst2", ["--max-length 64", "at most 32 tokens"]),
    "stf settings without stf": (["--method", "svd", "--pull", "0.1"], "sst2", ["apply to STF", "svd"]),
    "epochs inf": (["--epochs", "inf"], "sst2", ["epochs must be positive"]),
}


def _latin1_row(folder: Path) -> Path:
    train = folder / "train.tsv"
    train.write_bytes(train.read_bytes().replace(b"PLACEHOLDER", b"caf\xe9"))  # Latin-1, not UTF-8
    return folder


@pytest.mark.parametrize("extra,data,words", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_exits_2_and_writes_nothing(capsys, tmp_path, model_dir, sst2_dir, extra, data, words):
    data_dir = {
        "sst2": sst2_dir,
        "missing": tmp_path / "no-such-folder",
        "malformed": lambda: _bad_train(tmp_path / "SST-2", "a row without a label column"),
        "bad label": lambda: _bad_train(tmp_path / "SST-2", "good film\t2"),
        "latin-1": lambda: _latin1_row(_bad_train(tmp_path / "SST-2", "PLACEHOLDER film\t1")),
    }[data]
    data_dir = data_dir() if callable(data_dir) else data_dir
    output = tmp_path / "out"
    if "more than a dsformer output" in words:
        output.mkdir()
        (output / "notes.txt").write_text("keep me")
    line = assert_one_error_line(*run_cli(capsys, _compress_args(model_dir, data_dir, output, *extra)))
    for word in words:
        assert word in line, line
    if "more than a dsformer output" in words:
        assert [p.name for p in output.iterdir()] == ["notes.txt"]
        assert (output / "notes.txt").read_text() == "keep me"
    else:
        assert not output.exists()
    if "--resume" not in extra:
        assert not work_folder(output).exists()
    leftovers = {p.name for p in tmp_path.iterdir()} - {"out", "SST-2", "out.work"}
    assert not leftovers


def test_refused_resume_leaves_no_work_folder(capsys, tmp_path, model_dir, sst2_dir):
    output = tmp_path / "out"
    argv = _compress_args(model_dir, sst2_dir, output, "--method", "svd", "--resume")
    assert_one_error_line(*run_cli(capsys, argv))
    assert not work_folder(output).exists()


def test_rerun_replaces_an_earlier_dsformer_output(capsys, tmp_path, model_dir, sst2_dir):
    output = tmp_path / "out"
    assert run_cli(capsys, _compress_args(model_dir, sst2_dir, output, "--method", "dense"))[0] == 0
    code, _, err = run_cli(capsys, _compress_args(model_dir, sst2_dir, output, "--method", "svd"))
    assert code == 0, err
    assert metrics_of(output)["method"] == "svd"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ---------------------------------------------------------------- regression


def test_regression_task_with_dsformer(capsys, tmp_path, model_dir, stsb_dir):
    output = tmp_path / "stsb"
    argv = _compress_args(model_dir, stsb_dir, output, "--method", "dsformer", task="stsb")
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    metrics = metrics_of(output)
    assert metrics["task"] == "stsb" and metrics["metric"] == "pearson"
    assert set(metrics["test"]) == {"pearson", "spearman"}
    assert -1.0 <= metrics["test"]["pearson"] <= 1.0
    assert metrics["trainer"] == "stf" and metrics["ratios"]["ratio_params"] >= 2.0 - 1e-9
    assert "pearson" in out
    model = dsformer.load(output)
    assert model.config.num_labels == 1
    line = evaluate_line(capsys, output)
    assert "stsb test (16 examples)" in line
    # the same score, to float rounding: loaded, the layers may run on another backend, summing in another order
    shown = float(re.search(r"pearson (-?[0-9.]+)", line).group(1))
    assert shown == pytest.approx(metrics["test"]["pearson"], abs=2e-4)
    assert not work_folder(output).exists()


@pytest.mark.parametrize("method", ["dense", "dsformer"])
def test_interrupted_run_resumes_to_the_same_result(capsys, tmp_path, model_dir, sst2_dir, monkeypatch, method):
    """Ctrl-C mid-epoch: exit 130 with the resume hint; --resume ends exactly where an uninterrupted run does."""

    extra = ["--method", method, "--epochs", "2"]
    whole = tmp_path / "whole"
    assert run_cli(capsys, _compress_args(model_dir, sst2_dir, whole, *extra))[0] == 0

    interrupt_at(monkeypatch, 11)  # Ctrl-C in the second epoch
    cut = tmp_path / "cut"
    code, _, err = run_cli(capsys, _compress_args(model_dir, sst2_dir, cut, *extra))
    assert code == 130 and "--resume" in err and len(err.strip().splitlines()) == 1
    assert latest_checkpoint(work_folder(cut)).name == "checkpoint-11" and not cut.exists()
    monkeypatch.undo()
    state = (latest_checkpoint(work_folder(cut)) / "trainer_state.json").read_bytes()
    # the checkpoint is not lost to a rerun that forgot --resume, nor resumed into another run
    line = assert_one_error_line(*run_cli(capsys, _compress_args(model_dir, sst2_dir, cut, *extra)))
    assert "interrupted run" in line and "--resume" in line
    other = ["--method", "svd" if method == "dsformer" else "dsformer", "--epochs", "2", "--resume"]
    line = assert_one_error_line(*run_cli(capsys, _compress_args(model_dir, sst2_dir, cut, *other)))
    assert "of another run (method" in line
    assert (latest_checkpoint(work_folder(cut)) / "trainer_state.json").read_bytes() == state
    assert run_cli(capsys, _compress_args(model_dir, sst2_dir, cut, *extra, "--resume"))[0] == 0

    a, b = metrics_of(whole), metrics_of(cut)
    assert a["test"] == b["test"] and a["validation"] == b["validation"] and a["history"] == b["history"]
    assert not work_folder(cut).exists()


def test_a_signal_right_after_the_save_says_the_run_was_saved(capsys, tmp_path, model_dir, sst2_dir, monkeypatch):
    import dsformer.harness.finetune as finetune_module

    real = finetune_module.save

    def save_then_signal(*args, **kwargs):
        real(*args, **kwargs)
        raise KeyboardInterrupt  # SIGINT lands just after the atomic swap

    monkeypatch.setattr(finetune_module, "save", save_then_signal)
    output = tmp_path / "run"
    code, _, err = run_cli(capsys, _compress_args(model_dir, sst2_dir, output, "--method", "svd"))
    assert code == 130 and err.strip() == f"dsformer: interrupted after the run was saved to {output}"
    assert metrics_of(output)["method"] == "svd" and not work_folder(output).exists()


# ---------------------------------------------------------------- sweeps and reports


def _sweep_config(folder: Path, model_dir: Path, sst2_dir: Path, **changes) -> Path:
    config = {
        "name": "tiny",
        "model": str(model_dir),
        "results": "results",
        "outputs": "outputs",
        "keep_models": False,
        "train": {"epochs": 1, "batch_size": 8, "max_length": 16},
        "tasks": {"sst2": {"data_dir": str(sst2_dir)}},
        "methods": [
            "svd",
            {"label": "dsformer+kd", "method": "dsformer", "teacher": True, "schedule": {"refresh_every": 3}},
            {"method": "svd", "ratios": [2, 3], "seeds": [0]},  # 2x seed 0 is already planned: only 3x is new
        ],
        "ratios": [2],
        "seeds": [0, 1],
        **changes,
    }
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in config.items() if v is not None}))
    return path


def test_sweep_runs_the_grid_skips_what_is_done_and_reports(capsys, tmp_path, model_dir, sst2_dir, monkeypatch):

    config = _sweep_config(tmp_path, model_dir, sst2_dir)
    interrupt_at(monkeypatch, 8 + 12)  # the dense run takes 8 steps; this is inside the second run
    code, _, err = run_cli(capsys, ["sweep", "--config", config, "--quiet"])
    assert code == 130
    results = tmp_path / "results"
    assert sorted(p.name for p in results.glob("*.json")) == ["sst2-dense-s0.json", "sst2-svd-2x-s0.json"]
    monkeypatch.undo()
    code, out, err = run_cli(capsys, ["sweep", "--config", config, "--quiet"])
    assert code == 0, err
    assert "2 runs done, 4 to do" in out and "(resuming)" in out
    names = sorted(p.stem for p in results.glob("*.json"))
    assert names == [
        "sst2-dense-s0",
        "sst2-dsformer+kd-2x-s0",
        "sst2-dsformer+kd-2x-s1",
        "sst2-svd-2x-s0",
        "sst2-svd-2x-s1",
        "sst2-svd-3x-s0",
    ]
    run = json.loads((results / "sst2-dsformer+kd-2x-s1.json").read_text())
    assert run["label"] == "dsformer+kd" and run["seed"] == 1 and run["config"]["train"]["kd_alpha"] > 0
    assert run["config"]["teacher"] == run["config"]["model"] == str(tmp_path / "outputs" / "sst2-dense-s0")
    assert run["config"]["schedule"]["refresh_every"] == 3 and "difference_to_dense" in run
    assert not (tmp_path / "outputs" / "sst2-svd-2x-s0").exists()  # keep_models: false
    assert (tmp_path / "outputs" / "sst2-dense-s0" / "metrics.json").exists()  # the start is kept
    code, out, _ = run_cli(capsys, ["sweep", "--config", config])
    assert code == 0 and "6 runs done, 0 to do" in out

    md = tmp_path / "docs" / "results.md"
    notes = tmp_path / "notes.md"
    notes.write_text("Runs of this grid started from one dense model.\n")
    code, out, err = run_cli(capsys, ["results", results, "--output", md, "--notes", notes])
    assert code == 0, err
    text = md.read_text()
    assert "Runs of this grid started from one dense model." in text.split("###")[0]  # under the heading
    assert "| svd | conventional |" in text and "| dsformer+kd | stf |" in text and "[n=2]" in text
    assert "[n=1]" in text  # svd at 3x: one seed
    assert (tmp_path / "docs" / "results_sst2.png").stat().st_size > 1000


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"methods": ["nope"]}, "not a compression method"),
        ({"methods": ["dense"]}, "start, which the sweep runs first"),
        ({"methods": [{"method": "dense", "ratios": [2]}]}, "dense runs at its own size"),
        ({"methods": [{"method": "svd", "colour": 1}]}, "unknown key"),
        ({"methods": [{"method": "dsformer", "schedule": {"bogus": 1}}]}, "schedule"),
        ({"methods": [{"method": "dsformer", "fisher": "yes"}]}, "fisher must be true or false"),
        ({"methods": [{"method": "dsformer", "calibrate": 1}]}, "calibrate must be true or false"),
        ({"methods": [{"method": "nm", "global_budget": True}]}, "--global-budget gives each layer"),
        ({"methods": [{"method": "svd", "tasks": "sst2"}]}, "non-empty list of task names"),
        ({"methods": ["svd", {"method": "svd", "trainer": "stf"}]}, "label 'svd' names two different"),
        ({"methods": [{"method": "dsformer", "trainer": "conventional"}]}, "use --method ds-conventional"),
        ({"methods": [{"method": "svd", "trainer": "bogus"}]}, "unknown trainer"),
        ({"methods": [{"method": "svd", "seeds": [0.5]}]}, "seeds must be a list of whole numbers"),
        ({"ratios": ["2x"]}, "ratios must be a list of numbers"),
        ({"seeds": "one"}, "seeds must be a list of whole numbers"),
        ({"tasks": ["sst2"]}, "tasks is a mapping"),
        ({"tasks": {"sst2": "here"}}, "options are a mapping"),
        ({"train": {"batch_size": 0}}, "batch_size must be at least 1"),
        ({"train": {"lr": -1}}, "lr must be positive"),
        ({"methods": [{"method": "svd", "tasks": ["cola"]}]}, "names task(s) ['cola']"),
        ({"ratios": [0.5]}, "ratio"),
        ({"methods": [{"method": "svd", "ratios": [1]}]}, "ratio"),
        ({"seeds": []}, "'seeds' is missing"),
        ({"train": {"epochz": 1}}, "epochz"),
        ({"tasks": {"nope": {}}}, "nope"),
        ({"tasks": {"sst2": {"colour": 1}}}, "data_dir and max_train"),
        ({"extra": 1}, "unknown key"),
    ],
)
def test_bad_sweep_config_exits_2_before_any_run(capsys, tmp_path, model_dir, sst2_dir, changes, words):
    config = _sweep_config(tmp_path, model_dir, sst2_dir, **changes)
    line = assert_one_error_line(*run_cli(capsys, ["sweep", "--config", config]))
    assert words in line
    assert not (tmp_path / "results").exists() and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "only, expected",
    [
        ([], ["sst2-dense-s0", "sst2-svd-2x-s0", "sst2-svd-2x-s1", "sst2-dsformer+kd-2x-s0", "sst2-dsformer+kd-2x-s1",
              "sst2-svd-3x-s0"]),
        (["--labels", "svd"], ["sst2-dense-s0", "sst2-svd-2x-s0", "sst2-svd-2x-s1", "sst2-svd-3x-s0"]),
        (["--ratios", "3"], ["sst2-dense-s0", "sst2-svd-3x-s0"]),
        (["--labels", "dsformer+kd", "--ratios", "2", "--tasks", "sst2"],
         ["sst2-dense-s0", "sst2-dsformer+kd-2x-s0", "sst2-dsformer+kd-2x-s1"]),
    ],
)  # fmt: skip
def test_sweep_runs_part_of_the_grid(capsys, tmp_path, model_dir, sst2_dir, only, expected):
    config = _sweep_config(tmp_path, model_dir, sst2_dir)
    code, out, err = run_cli(capsys, ["sweep", "--config", config, "--dry-run", *only])
    assert code == 0, err
    assert [line.strip() for line in out.splitlines()[1:]] == expected


@pytest.mark.parametrize(
    "only, words",
    [(["--tasks", "cola"], "no task cola; it has sst2"), (["--labels", "nm"], "no label nm"), (["--ratios", "4"], "4")],
)
def test_sweep_part_that_is_not_in_the_config_exits_2(capsys, tmp_path, model_dir, sst2_dir, only, words):
    config = _sweep_config(tmp_path, model_dir, sst2_dir)
    assert words in assert_one_error_line(*run_cli(capsys, ["sweep", "--config", config, *only]))
    assert not (tmp_path / "results").exists()


def test_sweep_data_dir_is_a_folder_next_to_the_config_or_a_hub_name(tmp_path, model_dir, sst2_dir):
    from dsformer.harness.sweep import load_sweep

    (tmp_path / "local").mkdir()
    tasks = {"sst2": {"data_dir": "nyu-mll/glue"}, "cola": {"data_dir": "local"}, "stsb": {"data_dir": "./gone"}}
    sweep = load_sweep(_sweep_config(tmp_path, model_dir, sst2_dir, tasks=tasks))
    assert sweep.tasks["sst2"]["data_dir"] == "nyu-mll/glue"
    assert sweep.tasks["cola"]["data_dir"] == str((tmp_path / "local").resolve())
    assert sweep.tasks["stsb"]["data_dir"] == str((tmp_path / "gone").resolve())


def test_a_method_with_its_own_tasks_runs_only_on_those(capsys, tmp_path, model_dir, sst2_dir):
    tasks = {"sst2": {"data_dir": str(sst2_dir)}, "mr": {}}
    methods = ["svd", {"method": "dsformer", "seeds": [1], "tasks": ["sst2"]}]
    config = _sweep_config(tmp_path, model_dir, sst2_dir, tasks=tasks, methods=methods, seeds=[0])
    code, out, err = run_cli(capsys, ["sweep", "--config", config, "--dry-run"])
    assert code == 0, err
    planned = [line.strip() for line in out.splitlines()[1:]]
    assert planned == ["mr-dense-s0", "mr-svd-2x-s0", "sst2-dense-s0", "sst2-svd-2x-s0", "sst2-dsformer-2x-s1"]


def test_sweep_ratios_given_as_decimals(capsys, tmp_path, model_dir, sst2_dir):
    config = _sweep_config(tmp_path, model_dir, sst2_dir, ratios=[2.8])
    code, out, err = run_cli(capsys, ["sweep", "--config", config, "--dry-run", "--ratios", "2.8", "--labels", "svd"])
    assert code == 0, err
    assert [line.strip() for line in out.splitlines()[1:]] == ["sst2-dense-s0", "sst2-svd-2.8x-s0", "sst2-svd-2.8x-s1"]


def test_sweep_config_that_is_not_yaml_exits_2(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: [unclosed\n")
    assert "not valid YAML" in assert_one_error_line(*run_cli(capsys, ["sweep", "--config", path]))
    assert "cannot read" in assert_one_error_line(*run_cli(capsys, ["sweep", "--config", tmp_path / "none.yaml"]))


def test_report_of_a_folder_without_runs_exits_2(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "x.json").write_text("{}")
    for folder in ("empty", "broken"):
        assert_one_error_line(*run_cli(capsys, ["results", tmp_path / folder, "--output", tmp_path / "r.md"]))
    assert not (tmp_path / "r.md").exists()


def test_report_with_missing_notes_exits_2(capsys, tmp_path):
    (tmp_path / "runs").mkdir()
    run = {"task": "mr", "label": "svd", "method": "svd", "ratio": 2.0, "metric": "accuracy", "test": {"accuracy": 0.8}}
    (tmp_path / "runs" / "a.json").write_text(json.dumps(run))
    argv = ["results", tmp_path / "runs", "--output", tmp_path / "r.md", "--notes", tmp_path / "none.md"]
    assert "none.md" in assert_one_error_line(*run_cli(capsys, argv))
    assert not (tmp_path / "r.md").exists() and not list(tmp_path.glob("*.png"))


@pytest.mark.parametrize(
    "ours, tables, error",
    [
        (None, ["DSFormer"], None),  # the default: dsformer, and dsformer-fisher where it ran (here not)
        (["dsformer+kd", "dsformer"], ["`dsformer+kd`", "DSFormer"], None),
        (["svd"], None, "its runs are method 'svd', a baseline"),
        (["dense"], None, "its runs are the dense reference"),
        (["dsformer-fisher"], None, "no run has that label; DSFormer labels here: dsformer, dsformer+kd"),
    ],
)
def test_report_sets_the_labels_of_ours_against_the_baselines(capsys, tmp_path, ours, tables, error):
    (tmp_path / "runs").mkdir()
    for label, method, ratio, accuracy in [
        ("dense", "dense", 1.0, 0.86),
        ("svd", "svd", 2.0, 0.83),
        ("dsformer", "dsformer", 2.0, 0.85),
        ("dsformer+kd", "dsformer", 2.0, 0.855),
    ]:
        run = {"task": "mr", "label": label, "method": method, "ratio": ratio, "metric": "accuracy"}
        (tmp_path / "runs" / f"{label}.json").write_text(json.dumps(run | {"test": {"accuracy": accuracy}}))
    argv = ["results", tmp_path / "runs", "--output", tmp_path / "r.md"] + (["--ours", *ours] if ours else [])
    if error:
        assert error in assert_one_error_line(*run_cli(capsys, argv))
        assert not (tmp_path / "r.md").exists()
        return
    code, _, err = run_cli(capsys, argv)
    assert code == 0, err
    headings = [line[4:] for line in (tmp_path / "r.md").read_text().splitlines() if line.startswith("### ")]
    assert [h.removesuffix(" against the best baseline") for h in headings if "against" in h] == tables


@pytest.mark.parametrize(
    "curve, dense, expected",
    [
        ([(2.0, 85.5), (2.8, 84.5)], 86.0, 2.4),
        ([(2.0, 85.5), (2.8, 85.2), (3.57, 85.0)], 86.0, 3.57),  # never drops: the largest measured
        ([(2.0, 84.9)], 86.0, None),
        ([(2.8, 84.0), (2.0, 86.0)], 86.0, 2.4),  # order does not matter
        ([(1.5, 84.8), (2.0, 85.3), (2.8, 84.3)], 86.0, 2.24),  # a dip before the last point within is noise
    ],
)
def test_ratio_at_one_point_drop(curve, dense, expected):
    from dsformer.harness.results import ratio_at_drop

    assert ratio_at_drop(curve, dense) == (pytest.approx(expected) if expected is not None else None)


def test_versus_names_the_best_baseline_and_leaves_out_dsformer_variants():
    from dsformer.harness.results import Cell, versus, versus_markdown

    def cell(label: str, ratio: float, *scores: float, method: str | None = None) -> Cell:
        return Cell("mr", "accuracy", label, "-", ratio, ratio, scores, ("x.json",), method or label)

    cells = [
        cell("dense", 1.0, 86.0),
        cell("svd", 2.0, 83.0),
        cell("ds-conventional", 2.0, 85.0, 86.0),
        cell("ds-shared", 2.0, 90.0),  # a variant of ours, not a baseline
        cell("my-ds-variant", 2.0, 91.0, method="dsformer"),  # ours by its method, whatever its label
        cell("svd-stf", 2.8, 79.0, method="svd"),  # a baseline by its method
        cell("dsformer", 2.0, 85.0),
        cell("svd", 2.8, 80.0),
        cell("dsformer", 2.8, 82.0),
        cell("dsformer", 3.57, 81.0),  # no baseline ran there: no row
    ]
    rows = versus(cells)
    got = [(r["ratio"], r["best"], r["difference"]) for r in rows]
    assert got == [(2.0, "ds-conventional", -0.5), (2.8, "svd", 2.0)]
    text = versus_markdown(cells)
    assert "**loses**" in text and "| wins |" in text and "ahead of every baseline in 1 of 2" in text


def test_versus_marks_differences_within_two_standard_errors_as_noise():
    """With several seeds on both sides the table gives the difference's standard error and says when it is noise."""
    from dsformer.harness.results import Cell, versus, versus_markdown

    def cell(label: str, ratio: float, *scores: float) -> Cell:
        return Cell("mr", "accuracy", label, "-", ratio, ratio, scores, ("x.json",), label)

    cells = [
        cell("dsformer", 2.0, 85.0, 86.0, 87.0),
        cell("ds-conventional", 2.0, 84.0, 85.0, 86.0),  # +1.00 ± 0.82: noise
        cell("dsformer", 2.8, 90.0, 90.5),
        cell("svd", 2.8, 80.0, 80.5),  # +10.00 ± 0.35: decided
        cell("dsformer", 3.57, 80.0),
        cell("svd", 3.57, 81.0, 82.0),  # one seed on our side: no standard error
    ]
    assert [None if r["se"] is None else round(r["se"], 2) for r in versus(cells)] == [0.82, 0.35, None]
    text = versus_markdown(cells)
    assert "| +1.00 ± 0.82 | wins (within noise) |" in text
    assert "| +10.00 ± 0.35 | wins |" in text
    assert "| -1.50 | **loses** |" in text
    assert (
        "(2 cells; difference ± its standard error), 1 of them differ by more than two standard errors (1 won, 0 lost)"
        in text
    )


def test_a_cell_off_its_asked_ratio_says_the_ratio_it_measured():
    """N:M rounds N, so "nm at 2.8x" is 2.91x: both tables say so rather than file it silently under 2.8x."""
    from dsformer.harness.results import Cell, markdown, versus_markdown

    cells = [
        Cell("mr", "accuracy", "dense", "-", 1.0, 1.0, (86.0,), ("d.json",), "dense"),
        Cell("mr", "accuracy", "nm", "stf", 2.8, 2.909, (82.78,), ("n.json",), "nm"),
        Cell("mr", "accuracy", "dsformer", "stf", 2.8, 2.79, (84.0,), ("s.json",), "dsformer"),
    ]
    table = markdown(cells)
    assert "82.78 (-3.22) [n=1] at 2.91x" in table
    assert "84.00 (-2.00) [n=1] |" in table  # within 2% of what was asked: no note
    assert "| nm at 2.91x 82.78 [n=1] |" in versus_markdown(cells)


OURS_24 = [(2.0, 85.5), (2.8, 84.5)]  # dense 86.0: within 1 point up to 2.40x
OURS_OPEN = [(2.0, 85.5), (2.8, 85.1)]  # still within at 2.8x


@pytest.mark.parametrize(
    "curves, expected",
    [
        # ours crosses 85.0 halfway between 2x and 2.8x, fwsvd at 2.16x, svd never within 1 point
        (
            {"dsformer": OURS_24, "svd": [(2.0, 84.0)], "fwsvd": [(2.0, 85.2), (2.8, 84.2)]},
            ("2.40x", "fwsvd 2.16x", "1.11x", "fwsvd 2.16x", "1.11x"),
        ),
        # both never drop below 85.0: neither curve shows where it would; svd bounds low rank below 2x
        (
            {"dsformer": OURS_OPEN, "svd": [(2.0, 80.0)], "nm": [(2.0, 85.6), (2.8, 85.5)]},
            (
                "≥ 2.80x",
                "nm ≥ 2.80x",
                "unknown: both are within 1 point at every ratio measured",
                "none within 1 point (all < 2.00x)",
                "> 1.40x",
            ),
        ),
        # no low-rank run within 1 point even at its smallest ratio: all below the largest of those
        (
            {"dsformer": OURS_24, "svd": [(1.5, 84.5), (2.0, 84.0)], "fwsvd": [(2.0, 84.9)]},
            ("2.40x", "none within 1 point (all < 2.00x)", "> 1.20x", "none within 1 point (all < 2.00x)", "> 1.20x"),
        ),
        (
            {"dsformer": OURS_24, "svd": [(1.5, 84.5), (2.0, 84.0)]},
            ("2.40x", "none within 1 point (all < 1.50x)", "> 1.60x", "none within 1 point (all < 1.50x)", "> 1.60x"),
        ),
        # a dip at a smaller ratio (noise) does not hide that svd is within 1 point at 2x
        (
            {"dsformer": OURS_24, "svd": [(1.5, 84.8), (2.0, 85.3)]},
            ("2.40x", "svd ≥ 2.00x", "≤ 1.20x", "svd ≥ 2.00x", "≤ 1.20x"),
        ),
        # nm is within up to 1.35x, but svd was measured only from 2.8x: the best baseline may be svd
        (
            {"dsformer": OURS_24, "nm": [(1.2, 85.5), (1.5, 84.5)], "svd": [(2.8, 84.0)]},
            (
                "2.40x",
                "nm 1.35x (others unmeasured below 2.80x)",
                "≤ 1.78x",
                "none within 1 point (all < 2.80x)",
                "> 0.85x",
            ),
        ),
        (
            {"dsformer": OURS_OPEN, "nm": [(1.2, 85.5), (1.5, 84.5)], "svd": [(2.8, 84.0)]},
            (
                "≥ 2.80x",
                "nm 1.35x (others unmeasured below 2.80x)",
                "≥ 1.00x",
                "none within 1 point (all < 2.80x)",
                "> 1.00x",
            ),
        ),
        # ours never drops: a lower bound, rounded down
        (
            {"dsformer": OURS_OPEN, "fwsvd": [(2.0, 85.2), (2.8, 84.2)]},
            ("≥ 2.80x", "fwsvd 2.16x", "≥ 1.29x", "fwsvd 2.16x", "≥ 1.29x"),
        ),
        # the baseline's only ratio measured is still within: an upper bound
        (
            {"dsformer": OURS_24, "fwsvd": [(2.0, 85.2)]},
            ("2.40x", "fwsvd ≥ 2.00x", "≤ 1.20x", "fwsvd ≥ 2.00x", "≤ 1.20x"),
        ),
        (
            {"dsformer": [(2.0, 80.0)], "svd": [(2.0, 79.0)]},
            (
                "never",
                "none within 1 point (all < 2.00x)",
                "neither is within 1 point",
                "none within 1 point (all < 2.00x)",
                "neither is within 1 point",
            ),
        ),
        (
            {"dsformer": [(2.0, 80.0)], "nm": [(2.0, 85.5)]},
            ("never", "nm ≥ 2.00x", "below it", "-", "no such baseline ran"),
        ),
    ],
)
def test_compression_within_one_point_against_the_baselines(curves, expected):
    from dsformer.harness.results import Cell, compression_markdown

    method = {"dsformer": "dsformer", "svd": "svd", "fwsvd": "fwsvd", "nm": "nm"}
    cells = [Cell("mr", "accuracy", "dense", "-", 1.0, 1.0, (86.0,), ("d.json",), "dense")]
    for label, points in curves.items():
        for ratio, score in points:
            cells.append(Cell("mr", "accuracy", label, "-", ratio, ratio, (score,), ("x.json",), method[label]))
    row = compression_markdown(cells).splitlines()[-1]
    cols = [c.strip() for c in row.strip("|").split("|")]
    assert cols[0] == "mr"
    assert tuple(cols[1:]) == expected


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path, model_dir, sst2_dir):
    """What a scheduler's stop (or `kill`) does to a real process: exit 143, checkpoint kept, --resume finishes."""
    import subprocess
    import sys
    import time

    output = tmp_path / "run"
    argv = [sys.executable, "-m", "dsformer", *_compress_args(model_dir, sst2_dir, output, "--method", "dsformer")]
    argv[argv.index("--epochs") + 1] = "40"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 240
    while not list(work_folder(output).glob("checkpoint-*/trainer_state.json")) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 143, err
    assert "--resume" in err and len(err.strip().splitlines()) == 1
    assert latest_checkpoint(work_folder(output)) is not None and not output.exists()
    steps = json.loads((latest_checkpoint(work_folder(output)) / "trainer_state.json").read_text())["global_step"]
    assert 0 < steps < 320
    done = subprocess.run([*argv, "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert metrics_of(output)["steps"] == 320 and not work_folder(output).exists()


def test_sweep_fine_tunes_a_missing_dense_start_again_and_keeps_its_record(capsys, tmp_path, model_dir, sst2_dir):
    # A new checkout has the committed results but not the (uncommitted) model folders.
    config = _sweep_config(tmp_path, model_dir, sst2_dir, methods=["svd"], seeds=[0])
    assert run_cli(capsys, ["sweep", "--config", config, "--quiet"])[0] == 0
    results, outputs = tmp_path / "results", tmp_path / "outputs"
    record = (results / "sst2-dense-s0.json").read_text()
    shutil.rmtree(outputs)
    code, out, _ = run_cli(capsys, ["sweep", "--config", config, "--quiet"])
    assert code == 0 and "2 runs done, 0 to do" in out and "fine-tuned again" not in out  # nothing needs it
    (results / "sst2-svd-2x-s0.json").unlink()
    code, out, _ = run_cli(capsys, ["sweep", "--config", config, "--dry-run"])
    assert code == 0 and "is missing; it is fine-tuned again first" in out and "  sst2-dense-s0\n" in out
    code, out, err = run_cli(capsys, ["sweep", "--config", config, "--quiet"])
    assert code == 0, err
    assert "as recorded" in out, out  # same config and seed on the same machine: the same model
    assert (outputs / "sst2-dense-s0" / "metrics.json").exists() and (results / "sst2-svd-2x-s0.json").exists()
    assert (results / "sst2-dense-s0.json").read_text() == record
