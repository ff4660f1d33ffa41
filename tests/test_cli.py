"""The ``dsformer`` command line, run in-process on a tiny saved BERT (plus one real subprocess)."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertModel

from dsformer import load
from dsformer.cli import main
from dsformer.harness.models import load_pretrained
from dsformer.surgery import compact_layers

ERROR = "dsformer: error:"


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith(ERROR)]


@pytest.fixture
def empty_folder(tmp_path) -> Path:
    folder = tmp_path / "empty-model"
    folder.mkdir()
    return folder


# (extra arguments, words the error line must contain)
BAD_INPUTS = {
    "ratio 1": (["--ratio", "1"], ["> 1", "1.0"]),
    "ratio 0.5": (["--ratio", "0.5"], ["> 1", "0.5"]),
    "ratio nan": (["--ratio", "nan"], ["> 1"]),
    "ratio 1000 infeasible": (["--ratio", "1000"], ["infeasible", "feasible ratios for this shape are"]),
    "svd ratio 1000 infeasible": (["--structure", "svd", "--ratio", "1000"], ["infeasible"]),
    "unknown target": (["--targets", "nosuchlayer"], ["nosuchlayer", "matches no module"]),
    "non-linear target": (["--targets", "LayerNorm"], ["LayerNorm", "not a linear layer"]),
    "unknown exclusion": (["--exclude", "nosuchlayer"], ["exclusion", "nosuchlayer"]),
    "k out of range": (["--option", "k=1000"], ["k must be in"]),
    "k with svd": (["--structure", "svd", "--option", "k=4"], ["structure svd has no option k", "rank"]),
    "k multiple with nm": (["--structure", "nm", "--option", "k_multiple=16"], ["nm has no option k_multiple"]),
    "k multiple 0": (["--option", "k_multiple=0"], ["k_multiple must be at least 1"]),
    "option without a value": (["--option", "k"], ["option 'k'", "KEY=VALUE"]),
    "option of the wrong type": (["--option", "k=abc"], ["option k must be int or none", "'abc'"]),
    "ratio as an option": (["--option", "ratio=3"], ["--ratio"]),
    "unknown structure": (["--structure", "xyz"], ["unknown structure 'xyz'", "ds, svd, nm"]),
    "model missing": (["--model", "/nonexistent"], ["/nonexistent", "config.json"]),
    "model folder empty": (["--model", "{empty}"], ["config.json"]),
    "output is a file": (["--output", "{file}"], ["not a folder"]),
}


def _args(extra, tiny_bert_folder, empty_folder, tmp_path):
    file = tmp_path / "a-file"
    file.write_text("keep")
    args = ["compress", "--model", tiny_bert_folder, "--quiet"]
    for a in extra:
        args.append(str(a).format(empty=empty_folder, file=file))
    if "--output" not in extra:
        args += ["--output", tmp_path / "out"]
    return args + ["--json", tmp_path / "report.json"]


@pytest.mark.parametrize("extra,words", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_error_line(capsys, tiny_bert_folder, empty_folder, tmp_path, extra, words):
    code, out, err = run(capsys, *_args(extra, tiny_bert_folder, empty_folder, tmp_path))
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert err.rstrip("\n").splitlines()[-1] == lines[0]  # the error is the last thing printed
    for word in words:
        assert word in lines[0]
    assert "Traceback" not in err
    assert out == ""
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "report.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["a-file", "empty-model"])
    assert (tmp_path / "a-file").read_text() == "keep"


@pytest.mark.parametrize("extra", [extra for extra, _ in BAD_INPUTS.values()], ids=list(BAD_INPUTS))
def test_bad_input_stderr_is_exactly_one_line(capsys, tiny_bert_folder, empty_folder, tmp_path, extra):
    code, _, err = run(capsys, *_args(extra, tiny_bert_folder, empty_folder, tmp_path))
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(ERROR), err


@pytest.mark.parametrize("value", ["abc", "", "2x"])
def test_ratio_not_a_number_is_an_argparse_error(capsys, tiny_bert_folder, tmp_path, value):
    with pytest.raises(SystemExit) as info:
        main(["compress", "--model", str(tiny_bert_folder), "--ratio", value, "--output", str(tmp_path / "out")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--ratio" in err and f"expected a number, got {value!r}" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [[], ["nosuchverb"], ["finetune", "--method", "xyz"], ["export", "only-one"]])
def test_bad_command_lines_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_device_cuda_without_cuda(capsys, tiny_bert_folder, tmp_path):
    code, _, err = run(capsys, "compress", "--model", tiny_bert_folder, "--device", "cuda", "--output", tmp_path / "o")
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and "no CUDA device" in err
    assert not (tmp_path / "o").exists()


def test_refused_output_folder_is_left_untouched(capsys, tiny_bert_folder, tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("precious")
    code, _, err = run(
        capsys, "compress", "--model", tiny_bert_folder, "--quiet", "--option", "iters=1", "--output", dest
    )
    assert code == 2
    assert len(error_lines(err)) == 1 and "not empty" in error_lines(err)[0]
    assert [p.name for p in dest.iterdir()] == ["notes.txt"] and (dest / "notes.txt").read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_refused_output_folder_writes_no_report(capsys, tiny_bert_folder, tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("precious")
    code, out, _ = run(
        capsys,
        "compress",
        "--model",
        tiny_bert_folder,
        "--quiet",
        "--option",
        "iters=1",
        "--output",
        dest,
        "--json",
        tmp_path / "r.json",
    )
    assert code == 2
    assert not (tmp_path / "r.json").exists()
    assert out == ""


# --- successful runs --------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["ds", "svd", "nm"])
def factorized(request, tiny_bert_folder, tmp_path_factory):
    """One successful ``dsformer compress`` run per structure: (structure, output folder, report, stdout)."""
    root = tmp_path_factory.mktemp(f"cli-{request.param}")
    argv = ["compress", "--model", str(tiny_bert_folder), "--structure", request.param, "--ratio", "2"]
    argv += ["--output", str(root / "out"), "--json", str(root / "report.json"), "--quiet"]
    if request.param == "ds":
        argv += ["--option", "iters=2"]
    stdout = io.StringIO()  # a module-scoped fixture cannot use capsys
    with contextlib.redirect_stdout(stdout):
        code = main(argv)
    assert code == 0
    return request.param, root / "out", json.loads((root / "report.json").read_text()), stdout.getvalue()


def test_compress_writes_folder_and_report(factorized):
    structure, out, report, stdout = factorized
    assert {"config.json", "model.safetensors", "dsformer.json"} <= {p.name for p in out.iterdir()}
    assert len(report["layers"]) == 12
    assert {row["structure"] for row in report["layers"]} == {structure}
    for row in report["layers"]:
        assert {"name", "shape", "structure", "params", "bytes", "rel_error"} <= set(row)
    assert {"ratio_params", "ratio_bytes", "ratio_model_bytes", "seconds"} <= set(report["totals"])
    assert report["totals"]["ratio_params"] >= 2.0
    assert report["command"].startswith("dsformer compress") and report["hardware"]["cores"] >= 1
    meta = json.loads((out / "dsformer.json").read_text())
    assert meta["report"]["totals"]["ratio_params"] == pytest.approx(report["totals"]["ratio_params"])
    assert "encoder.layer.0.attention.self.query" in stdout and f"saved to {out}" in stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["out", "report.json"]


def test_factorized_folder_loads(factorized):
    _, out, _, _ = factorized
    assert len(compact_layers(load(out))) == 12


def test_info(capsys, factorized):
    _, out, report, _ = factorized
    code, stdout, err = run(capsys, "info", out)
    assert code == 0 and err == ""
    assert "BertModel, 12 compact layers, format 1" in stdout
    assert all(row["name"] in stdout for row in report["layers"])


def test_export(capsys, factorized, tmp_path, tiny_bert_folder):
    _, out, _, _ = factorized
    code, stdout, _ = run(capsys, "export", out, tmp_path / "dense")
    assert code == 0 and "dense Hugging Face model written to" in stdout
    dense = BertModel.from_pretrained(tmp_path / "dense")
    assert not (tmp_path / "dense" / "dsformer.json").exists()
    assert sum(p.numel() for p in dense.parameters()) == sum(
        p.numel() for p in BertModel.from_pretrained(tiny_bert_folder).parameters()
    )


def test_no_save_writes_only_the_report(capsys, tiny_bert_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = run(
        capsys,
        "compress",
        "--model",
        tiny_bert_folder,
        "--structure",
        "svd",
        "--no-save",
        "--quiet",
        "--json",
        "r.json",
    )
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    assert "compression over those layers" in stdout


def test_default_output_folder_name(capsys, tiny_bert_folder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, _ = run(capsys, "compress", "--model", tiny_bert_folder, "--structure", "nm", "--ratio", "2", "--quiet")
    assert code == 0
    assert (tmp_path / "outputs" / "tiny-bert-nm-2x" / "dsformer.json").exists()


@pytest.mark.parametrize("verb", [["info", "{missing}"], ["info", "{plain}"], ["export", "{missing}", "{out}"]])
def test_info_and_export_of_a_bad_folder(capsys, tmp_path, tiny_bert_folder, verb):
    argv = [a.format(missing=tmp_path / "missing", plain=tiny_bert_folder, out=tmp_path / "out") for a in verb]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith(ERROR)
    assert not (tmp_path / "out").exists()


def test_output_equal_to_model_keeps_the_source(capsys, tiny_bert_folder, tmp_path):
    source = tmp_path / "my-model"
    shutil.copytree(tiny_bert_folder, source)
    (source / "README.md").write_text("my notes")
    run(capsys, "compress", "--model", source, "--output", source, "--structure", "svd", "--quiet")
    assert (source / "README.md").read_text() == "my notes"
    assert not (source / "dsformer.json").exists()


def test_model_folder_without_tokenizer_gives_no_tokenizer(tiny_bert_folder):
    _, tokenizer = load_pretrained(str(tiny_bert_folder))
    assert tokenizer is None


# --- the installed command -------------------------------------------------------------------


def _console_script() -> Path:
    script = Path(sys.executable).parent / "dsformer"
    if not script.exists():
        pytest.skip("the dsformer console script is not installed beside this Python")
    return script


def test_console_script_help():
    done = subprocess.run([_console_script(), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    for verb in ("compress", "export", "info", "data"):
        assert verb in done.stdout


def test_console_script_error_is_one_line(tmp_path):
    done = subprocess.run(
        [_console_script(), "compress", "--model", str(tmp_path / "nope"), "--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(ERROR), done.stderr
    assert not (tmp_path / "out").exists()


def test_a_compressed_folder_is_not_taken_for_a_pretrained_model(capsys, tiny_bert_folder, tmp_path):
    out = tmp_path / "compact"
    code, _, _ = run(capsys, "compress", "--model", tiny_bert_folder, "--structure", "svd", "--output", out, "--quiet")
    assert code == 0
    code, _, err = run(capsys, "compress", "--model", out, "--output", tmp_path / "again", "--quiet")
    assert code == 2 and "compressed dsformer model" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("source", ["compact", "dense"])
def test_bench_writes_ratios_against_the_dense_original(capsys, tiny_bert_folder, tmp_path, monkeypatch, source):
    monkeypatch.setenv("DSFORMER_CACHE", str(tmp_path / "cache"))
    model = tiny_bert_folder
    if source == "compact":
        model = tmp_path / "compact"
        argv = ["compress", "--model", tiny_bert_folder, "--quiet", "--option", "iters=2", "--output", model]
        assert run(capsys, *argv)[0] == 0
    out = tmp_path / "bench.json"
    argv = ["bench", model, "--batch", "2", "1", "--seq", "8", "4", "--repeats", "2", "--output", out]
    code, stdout, _ = run(capsys, *argv, *(["--ratio", "2"] if source == "dense" else []))
    assert code == 0, stdout
    record = json.loads(out.read_text())
    assert record["hardware"]["cores"] >= 1 and record["command"].startswith("dsformer bench")
    assert [(r["batch"], r["seq"]) for r in record["runs"]] == [(2, 8), (1, 4)]
    for result in record["runs"]:
        e = result["end_to_end"]
        assert e["speedup"] == pytest.approx(e["dense_ms"] / e["compact_ms"])
        assert len(result["layers"]) == 12
        for row in result["layers"].values():
            assert row["backend"] in ("reference", "dense", "gather")
            assert row["speedup"] == pytest.approx(row["dense_ms"] / row["compact_ms"])
            assert row["of_flop_limit"] == pytest.approx(row["speedup"] / row["flop_limit"])
            assert (row["flop_limit"] == 1) == (row["backend"] == "dense")
        assert sum(p["layers"] for p in result["parts"].values()) == 12
    assert "end to end" in stdout and "ffn linears" in stdout


@pytest.mark.parametrize("structure", ["ds", "svd"])
def test_bench_int8_faces_dense_fp32_and_dense_int8(capsys, tiny_bert_folder, tmp_path, monkeypatch, structure):
    monkeypatch.setenv("DSFORMER_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench.json"
    argv = ["bench", tiny_bert_folder, "--structure", structure, "--ratio", "2", "--backend", "int8"]
    code, stdout, _ = run(capsys, *argv, "--batch", "2", "--seq", "8", "--repeats", "2", "--output", out)
    assert code == 0, stdout
    (result,) = json.loads(out.read_text())["runs"]
    e = result["end_to_end"]
    assert e["speedup_vs_dense_int8"] == pytest.approx(e["dense_int8_ms"] / e["compact_ms"])
    assert {row["backend"] for row in result["layers"].values()} == {"int8"}
    assert "against the dense model with int8 linears" in stdout


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--batch", "1", "2", "--seq", "4", "8", "16"], ["pair up"]),
        (["--device", "cuda"], ["no CUDA device"]),
        (["--device", "gpu"], ["give cpu, cuda or cuda:N"]),
        (["--output", "{folder}"], ["is a folder; give a file name"]),
        (["--backend", "int4"], ["unknown backend 'int4'", "int8"]),
    ],
)
def test_bench_bad_input(capsys, tiny_bert_folder, tmp_path, extra, words):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    code, out, err = run(capsys, "bench", tiny_bert_folder, *(a.format(folder=tmp_path) for a in extra))
    assert code == 2 and len(error_lines(err)) == 1 and out == ""  # refused before any fit or timing
    assert all(w in err for w in words), err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--batch", "0"], ["at least 1"]),
        (["--repeats", "0"], ["at least 1"]),
        (["--seq", "two"], ["whole number"]),
    ],
)
def test_bench_bad_flags_are_argparse_errors(capsys, tiny_bert_folder, extra, words):
    with pytest.raises(SystemExit) as info:
        main(["bench", str(tiny_bert_folder), *extra])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err


@pytest.mark.parametrize(
    "argv, name",
    [
        (["--method", "dense"], "mr-dense"),
        (["--task", "sst2", "--ratio", "2.8"], "sst2-dsformer-2.8x"),
        (["--method", "svd", "--trainer", "stf", "--seed", "2"], "mr-svd-2x-stf-s2"),
        (["--fisher", "--seed", "1"], "mr-dsformer-2x-fisher-s1"),
    ],
)
def test_finetune_default_output_tells_runs_apart(argv, name):
    from dsformer.cli import build_parser
    from dsformer.harness.finetune import RunConfig, default_output

    args = build_parser().parse_args(["finetune", *argv])
    assert default_output(RunConfig.from_settings(vars(args))) == Path("outputs") / name
