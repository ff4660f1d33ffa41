"""Healing a compressed causal LM (``dsformer finetune --task <text>``): STF and conventional trainers, KD from
the dense model, exact resume from the kept start, and the refusals before any work."""

from __future__ import annotations

import json
import os
import random
import signal

import pytest
import torch
from conftest import TOY_NEUTRAL, toy_tokenizer
from test_lm import tiny_lm

from dsformer.checkpoint import load
from dsformer.cli import main
from dsformer.harness.checkpoints import latest_checkpoint
from dsformer.harness.healing import _HealTrainer, heal, lm_distillation_loss
from dsformer.harness.training import TrainConfig
from dsformer.surgery import compact_layers


@pytest.fixture
def lm_corpus(tmp_path):
    """A tiny Llama with a word-level tokenizer, and a text of those words."""
    folder = tmp_path / "tiny-llama"
    tiny_lm("llama").save_pretrained(folder)
    toy_tokenizer(tmp_path).save_pretrained(folder)
    rng = random.Random(0)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choices(TOY_NEUTRAL, k=12)) for _ in range(40)) + "\n")
    return folder, text


def heal_args(folder, text, output, *extra) -> list[str]:
    return ["finetune", "--task", str(text), "--model", str(folder), "--ratio", "2", "--tokens", "96",
            "--samples", "4", "--max-length", "16", "--batch-size", "2", "--output", str(output), "--quiet",
            *extra]  # fmt: skip


@pytest.mark.parametrize(
    "method, trainer, layer",
    [("ds-aware", "stf", "DenseSparseLinear"), ("ds-aware-bytes", "conventional", "DenseSparseLinear"),
     ("svd-llm", None, "LowRankLinear"), ("wanda-nm", "stf", "NMLinear")],
)  # fmt: skip
def test_cli_heals_a_compressed_lm_and_saves_it(lm_corpus, tmp_path, capsys, method, trainer, layer):
    folder, text = lm_corpus
    out = tmp_path / "healed"
    extra = ["--method", method] + (["--trainer", trainer] if trainer else [])
    assert main(heal_args(folder, text, out, *extra)) == 0
    assert "test perplexity" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trainer"] == (trainer or "conventional") and metrics["steps"] == 3 and metrics["tokens"] == 96
    assert metrics["ratios"]["ratio_params"] == pytest.approx(2.0, rel=0.2) and metrics["test"]["perplexity"] > 1
    model = load(out)
    assert {type(m).__name__ for m in compact_layers(model).values()} == {layer}
    assert not out.with_name(out.name + ".work").exists()


def test_healing_lowers_the_distillation_loss(tmp_path):
    torch.manual_seed(0)
    teacher, student = tiny_lm("llama"), tiny_lm("llama")
    with torch.no_grad():  # a damaged copy of the teacher
        for param in student.model.layers.parameters():
            param.add_(0.3 * torch.randn_like(param))
    windows = torch.randint(0, 100, (16, 16))

    def kd(model):
        with torch.no_grad():
            ids = windows[:8]
            logits, target = model(input_ids=ids).logits, teacher(input_ids=ids).logits
            return lm_distillation_loss(torch.tensor(0.0), logits, target, 1.0, 1.0)

    before = kd(student)
    config = TrainConfig(batch_size=4, lr=3e-3, kd_alpha=1.0, kd_temperature=1.0, progress=False)
    result = heal(student, windows, config, steps=12, output_dir=tmp_path / "heal", teacher=teacher)
    assert result.steps == 12 and kd(student) < 0.7 * before


def test_distillation_loss_is_zero_for_the_teacher_itself():
    logits = torch.randn(2, 5, 7)
    assert lm_distillation_loss(torch.tensor(0.0), logits, logits, 1.0, 2.0).abs() < 1e-6
    assert lm_distillation_loss(torch.tensor(3.0), logits, logits, 0.25, 2.0) == pytest.approx(2.25)


def interrupt_at(monkeypatch, k: int) -> None:
    """Ctrl-C during the k-th training step of this process."""
    real, calls = _HealTrainer.compute_loss, [0]

    def compute_loss(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(_HealTrainer, "compute_loss", compute_loss)


@pytest.mark.parametrize("trainer", ["stf", "conventional"])
def test_an_interrupted_healing_resumes_exactly_without_refitting(lm_corpus, tmp_path, capsys, monkeypatch, trainer):
    folder, text = lm_corpus
    extra = ["--method", "ds-aware", "--trainer", trainer, "--refresh-every", "2"] if trainer == "stf" else [
        "--method", "ds-aware", "--trainer", trainer]  # fmt: skip
    whole = tmp_path / "whole"
    assert main(heal_args(folder, text, whole, *extra)) == 0
    interrupt_at(monkeypatch, 2)
    cut = tmp_path / "cut"
    assert main(heal_args(folder, text, cut, *extra)) == 130
    assert "--resume" in capsys.readouterr().err
    work = cut.with_name("cut.work")
    assert latest_checkpoint(work).name == "checkpoint-2" and not cut.exists()
    monkeypatch.undo()
    import dsformer.harness.healing as healing

    monkeypatch.setattr(healing, "compress_calibrated", lambda *a, **k: pytest.fail("fitted again on resume"))
    assert main(heal_args(folder, text, cut, *extra, "--resume")) == 0
    a, b = (json.loads((out / "metrics.json").read_text()) for out in (whole, cut))
    assert a["test"] == b["test"] and a["history"] == b["history"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "dsformer"], "heals a compressed LM: choose --method"),
        (["--method", "dense"], "heals a compressed LM: choose --method"),
        (["--method", "ds-aware", "--fisher"], "apply to task fine-tuning"),
        (["--method", "svd-llm", "--refresh-every", "3"], "apply to --trainer stf"),
        (["--method", "ds-aware", "--ratio", "0.5"], "ratio"),
        (["--method", "ds-aware", "--max-length", "4096"], "--window 4096"),
        (["--method", "ds-aware", "--batch-size", "500"], "fewer than one batch"),
    ],
)
def test_bad_healing_runs_are_refused_with_nothing_written(lm_corpus, tmp_path, capsys, extra, message):
    folder, text = lm_corpus
    out = tmp_path / "never"
    assert main(heal_args(folder, text, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not out.with_name("never.work").exists()
