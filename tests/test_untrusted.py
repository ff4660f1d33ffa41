"""Untrusted files, shared machines, concurrent runs: crafted model folders, a planted kernel library, outputs
that are not ours, a second writer, bad labels and settings. Each gets one clear error and leaves nothing."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import build_bert, fast_structure

import dsformer
from dsformer.cli import main
from dsformer.errors import CheckpointError, DsformerError
from dsformer.files import exclusive, sha256
from dsformer.harness.tasks import TASKS, DataError, read_tsv
from dsformer.kernels import gather, native
from dsformer.surgery import compact_layers

ERROR = "dsformer: error:"


def one_error_line(capsys, argv) -> str:
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(ERROR) and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def saved(tmp_path) -> Path:
    """A tiny BERT compressed with DS at 2x and saved: the folder crafted copies start from."""
    model = build_bert()
    dsformer.compress(model, dsformer.CompressConfig(fast_structure("ds")), progress=False)
    return dsformer.save(model, tmp_path / "model")


def edit_meta(folder: Path, edit) -> None:
    meta = json.loads((folder / "dsformer.json").read_text())
    edit(meta)
    (folder / "dsformer.json").write_text(json.dumps(meta))


@pytest.fixture
def bag_calls(monkeypatch) -> list[tuple[int, int]]:
    """Every call of the sparse stage's bags, as (largest index given, rows it indexes): the compiled kernel
    where it runs, the embedding-bag elsewhere."""
    calls = []
    real = gather._bags

    def spy(rows, index, *args, **kwargs):
        calls.append((int(index.max()) if index.numel() else -1, rows.shape[1]))
        return real(rows, index, *args, **kwargs)

    monkeypatch.setattr(gather, "_bags", spy)
    return calls


# ------------------------------------------------------------------ crafted model folders


CRAFTED = {
    "weights file outside the folder": (lambda m: m["weights"].update(file="../model.safetensors"), "corrupt"),
    "weights file absolute": (lambda m: m["weights"].update(file="/etc/hostname"), "corrupt"),
    "weights file a device": (lambda m: m["weights"].update(file="zero", bytes=0), "not a plain file"),
    "k of 2^31": (lambda m: next(iter(m["layers"].values()))["layout"].update(k=2**31), "does not fit"),
    "k not a number": (lambda m: next(iter(m["layers"].values()))["layout"].update(k="64"), "does not fit"),
    "s above k": (lambda m: next(iter(m["layers"].values()))["layout"].update(s=10_000), "does not fit"),
    "model class a function": (lambda m: m.update(model_class="pipeline"), "is not in this transformers"),
    "a wider layout than its module": (
        lambda m: m["layers"]["encoder.layer.0.output.dense"].update(shape=[64, 256]),
        "does not fit",
    ),
}


@pytest.mark.parametrize("edit, words", CRAFTED.values(), ids=CRAFTED.keys())
def test_a_crafted_folder_is_refused_before_any_kernel_reads_it(saved, bag_calls, edit, words):
    os.symlink("/dev/zero", saved / "zero")
    edit_meta(saved, edit)
    with pytest.raises(CheckpointError, match=words):
        dsformer.load(saved)
    assert not bag_calls


def test_the_kernel_is_never_given_an_index_outside_its_rows(saved, bag_calls):
    model = dsformer.load(saved)
    dsformer.use_backend(model, "gather")
    with torch.no_grad():
        model(input_ids=torch.randint(2, 100, (2, 8)))
    assert bag_calls and all(largest < rows for largest, rows in bag_calls)
    layer = next(layer for layer in compact_layers(model).values() if layer.rows)
    layer.indices[0, 0] = layer.k  # made in memory, past every load check: refused at the layer's first use
    layer.__dict__.pop("_kernel_cache", None)
    bag_calls.clear()
    with pytest.raises(DsformerError, match="reach outside"), torch.no_grad():
        model(input_ids=torch.randint(2, 100, (2, 8)))
    assert all(largest < rows for largest, rows in bag_calls)


def test_a_huge_weight_file_is_hashed_only_up_to_its_recorded_size(saved):
    weights = saved / "model.safetensors"
    assert sha256(weights, limit=10) != sha256(weights) and sha256(weights, limit=10**12) == sha256(weights)


# ------------------------------------------------------------------ the compiled kernel's cache

compiler_only = pytest.mark.skipif(
    not native.shutil.which("cc") and not native.shutil.which("gcc"), reason="needs a C compiler"
)


@compiler_only
def test_a_planted_library_is_never_loaded(tmp_path, monkeypatch):
    """A library in the kernel cache that is not the user's own build (world-writable here) is built over,
    never loaded: its constructor would run."""
    monkeypatch.setenv("DSFORMER_CACHE", str(tmp_path / "cache"))
    compiler = native.shutil.which("cc") or native.shutil.which("gcc")
    marker = tmp_path / "constructor-ran"
    planted_source = tmp_path / "planted.c"
    planted_source.write_text(
        textwrap.dedent(f"""
        #include <stdio.h>
        __attribute__((constructor)) static void run(void) {{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}
        int dsformer_weighted_bags(void) {{ return 0; }}
        """)
    )
    target = native._compiled(compiler, "avx2")  # where a build of this source lands
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(target), str(planted_source)], check=True)
    os.chmod(target, 0o777)  # planted by someone else through a writable cache
    assert native._compiled(compiler, "avx2") == target
    import ctypes

    ctypes.CDLL(str(target))  # what the kernel loader then opens: the real build, not the plant
    assert not marker.exists()
    assert not target.stat().st_mode & 0o022


@compiler_only
def test_a_cache_folder_others_can_write_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("DSFORMER_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "native"
    folder.mkdir(parents=True)
    os.chmod(folder, 0o777)
    with pytest.raises(OSError, match="not yours alone"):
        native._compiled(native.shutil.which("cc") or native.shutil.which("gcc"), "avx2")


def test_an_empty_cache_variable_means_the_default(monkeypatch):
    from dsformer.kernels import cache_dir

    monkeypatch.setenv("DSFORMER_CACHE", "")
    assert cache_dir() == Path.home() / ".cache" / "dsformer"


@pytest.mark.parametrize("content", ["[]", "null", '{"x": 1}'])
def test_a_kernel_cache_that_is_not_ours_is_timed_again(tmp_path, monkeypatch, saved, content):
    monkeypatch.setenv("DSFORMER_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "kernels.json").write_text(content)
    model = dsformer.load(saved)
    dsformer.use_backend(model, "auto")
    with torch.no_grad():
        model(input_ids=torch.randint(2, 100, (1, 8)))
    assert isinstance(json.loads((tmp_path / "cache" / "kernels.json").read_text()), dict)


def test_a_poisoned_cached_choice_of_int8_is_not_taken(tmp_path, monkeypatch, saved):
    monkeypatch.setenv("DSFORMER_CACHE", str(tmp_path / "cache"))
    model = dsformer.load(saved)
    dsformer.use_backend(model, "auto")
    with torch.no_grad():
        model(input_ids=torch.randint(2, 100, (1, 8)))
    cache = tmp_path / "cache" / "kernels.json"
    entries = json.loads(cache.read_text())
    cache.write_text(json.dumps({key: {**entry, "choice": "int8"} for key, entry in entries.items()}))
    fresh = dsformer.load(saved)
    dsformer.use_backend(fresh, "auto")
    with torch.no_grad():
        fresh(input_ids=torch.randint(2, 100, (1, 8)))
    chosen = {c for layer in compact_layers(fresh).values() for c in layer.__dict__["_kernel_choices"].values()}
    assert "int8" not in chosen


# ------------------------------------------------------------------ outputs that are not ours, concurrent runs


def test_a_folder_with_a_stray_manifest_is_not_replaced(capsys, tmp_path, tiny_bert_folder):
    project = tmp_path / "project"
    (project / ".git").mkdir(parents=True)
    (project / "src").mkdir()
    (project / "src" / "main.py").write_text("print('mine')")
    (project / "dsformer.json").write_text("")
    line = one_error_line(capsys, ["compress", "--model", tiny_bert_folder, "--output", project, "--quiet"])
    assert "holds more than a dsformer output" in line
    assert (project / "src" / "main.py").read_text() == "print('mine')" and (project / ".git").is_dir()


def test_a_file_added_to_an_output_keeps_it_from_being_replaced(capsys, tmp_path, tiny_bert_folder):
    out = tmp_path / "out"
    assert main(["compress", "--model", str(tiny_bert_folder), "--output", str(out), "--quiet"]) == 0
    (out / "notes.md").write_text("my notes")
    capsys.readouterr()
    line = one_error_line(capsys, ["compress", "--model", tiny_bert_folder, "--output", out, "--quiet"])
    assert "holds more than a dsformer output" in line and (out / "notes.md").read_text() == "my notes"
    (out / "notes.md").unlink()
    assert main(["compress", "--model", str(tiny_bert_folder), "--output", str(out), "--quiet"]) == 0


def test_a_fine_tuned_run_is_not_replaced_by_a_fit(capsys, tmp_path, tiny_bert_folder):
    out = tmp_path / "run"
    assert main(["compress", "--model", str(tiny_bert_folder), "--output", str(out), "--quiet"]) == 0
    meta = json.loads((out / "dsformer.json").read_text())
    (out / "metrics.json").write_text("{}")  # as `dsformer finetune` leaves it
    meta["files"].append("metrics.json")
    (out / "dsformer.json").write_text(json.dumps(meta))
    capsys.readouterr()
    line = one_error_line(capsys, ["compress", "--model", tiny_bert_folder, "--output", out, "--quiet"])
    assert "holds a fine-tuned run" in line


def test_a_second_writer_of_one_output_stops_at_once(capsys, tmp_path, tiny_bert_folder):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from dsformer.files import exclusive\nimport time\nwith exclusive({str(out)!r}):\n"
         "    print('held', flush=True)\n    time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        line = one_error_line(capsys, ["compress", "--model", tiny_bert_folder, "--output", out, "--quiet"])
        assert "another dsformer process is writing" in line and not out.exists()
    finally:
        holder.kill()
        holder.wait()
    with exclusive(out), exclusive(out):  # re-entrant in one process
        assert (tmp_path / ".out.lock").exists()
    assert not (tmp_path / ".out.lock").exists()


def test_temporary_folders_left_by_a_killed_save_are_cleaned(tmp_path):
    model = build_bert()
    dsformer.compress(model, dsformer.CompressConfig(fast_structure("svd")), progress=False)
    (tmp_path / ".m.abc123.tmp").mkdir()
    (tmp_path / ".m.abc123.tmp" / "model.safetensors").write_bytes(b"half a model")
    (tmp_path / ".m.def456.old").mkdir()
    (tmp_path / "m.txt").write_text("a user's, kept")
    dsformer.save(model, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "m.txt"]


def test_a_full_disk_while_saving_is_one_line_and_publishes_nothing(capsys, tmp_path, tiny_bert_folder, monkeypatch):
    from safetensors import SafetensorError

    import dsformer.checkpoint

    def full(*args, **kwargs):
        raise SafetensorError("No space left on device (os error 28)")

    monkeypatch.setattr(dsformer.checkpoint, "save_model", full)
    line = one_error_line(capsys, ["compress", "--model", tiny_bert_folder, "--output", tmp_path / "out", "--quiet"])
    assert "No space left" in line and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# ------------------------------------------------------------------ bad data and settings


@pytest.mark.parametrize("score", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("split", ["train.tsv", "dev.tsv"])
def test_a_score_that_is_not_finite_is_a_data_error(tmp_path, score, split):
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    rows = [f"{i}\tmain\tf\t2012\t{i}\tn\tn\ta b\tc d\t{1.5 if i != 2 else score}\n" for i in range(4)]
    (tmp_path / split).write_text(head + "".join(rows))
    with pytest.raises(DataError, match=rf"{split}:4: score '{score}' is not a finite number"):
        read_tsv(tmp_path / split, TASKS["stsb"])


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--option", "iters=0"], ["iters must be at least 1"]),
        (["--option", "gamma=2"], ["gamma is a fraction"]),
        (["--targets", "re:["], ["is not a regular expression"]),
    ],
)
def test_bad_compress_settings_are_one_line(capsys, tmp_path, tiny_bert_folder, extra, words):
    line = one_error_line(capsys, ["compress", "--model", tiny_bert_folder, "--output", tmp_path / "o", *extra])
    assert all(w in line for w in words) and not (tmp_path / "o").exists()


def test_a_ratio_that_stores_more_bytes_than_dense_is_refused_before_the_fit(capsys, tmp_path, tiny_bert_folder):
    line = one_error_line(capsys, ["compress", "--model", tiny_bert_folder, "--ratio", "1.0000001", "--output",
                                   tmp_path / "o"])  # fmt: skip
    assert "stores more bytes than the dense weight" in line and not (tmp_path / "o").exists()


def test_bench_of_more_tokens_than_the_model_reads_is_one_line(capsys, tiny_bert_folder):
    line = one_error_line(capsys, ["bench", tiny_bert_folder, "--batch", "1", "--seq", "100000"])
    assert "the model reads at most 512 tokens" in line


def test_a_pickled_checkpoint_is_one_line(capsys, tmp_path, tiny_bert_folder):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_bert_folder / "config.json").read_text())
    torch.save({**build_bert().state_dict(), "args": argparse.Namespace()}, folder / "pytorch_model.bin")  # not data
    line = one_error_line(capsys, ["compress", "--model", folder, "--output", tmp_path / "o", "--quiet"])
    assert "cannot load model" in line and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "schedule, words",
    [({"pull": 2.0}, "pull must be in [0, 1]"), ({"ramp_steps": -1}, "ramp_steps must be at least 0")],
)
def test_stf_settings_out_of_range_are_refused(schedule, words):
    with pytest.raises(DsformerError, match=words.replace("[", r"\[").replace("]", r"\]")):
        dsformer.Schedule(**schedule)


def test_epochs_that_are_not_finite_are_refused():
    from dsformer.harness.training import TrainConfig, TrainingError

    with pytest.raises(TrainingError, match="epochs must be positive"):
        TrainConfig(epochs=float("inf"))


def test_a_metric_is_never_a_nan():
    from dsformer.harness.metrics import compute

    with pytest.raises(DsformerError, match="not finite"):
        compute(("pearson",), [1.0, float("nan"), 2.0], [1.0, 2.0, 3.0])


def test_a_late_ctrl_c_after_a_finished_command_ends_it_quietly(monkeypatch, saved):
    """After the work is done the command line leaves SIGINT to its default: no traceback on the way out."""
    import signal

    previous = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(sys, "argv", ["dsformer", "info", str(saved)])
    try:
        assert main() == 0
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGINT, previous)
