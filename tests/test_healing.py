"""Healing a compressed causal LM (``dsformer finetune --task <text>``): STF and conventional trainers, KD from
the dense model, exact resume from the kept start, and the refusals before any work."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from test_lm import tiny_lm
from transformers import AutoModelForCausalLM

from dsformer.checkpoint import load
from dsformer.cli import main
from dsformer.harness.checkpoints import latest_checkpoint
from dsformer.harness.healing import _HealTrainer, heal, lm_distillation_loss
from dsformer.harness.training import TrainConfig
from dsformer.surgery import compact_layers


def heal_args(folder, text, output, *extra) -> list[str]:
    return ["finetune", "--task", str(text), "--model", str(folder), "--ratio", "2", "--tokens", "96",
            "--samples", "4", "--max-length", "16", "--batch-size", "2", "--output", str(output), "--quiet",
            *extra]  # fmt: skip


@pytest.mark.parametrize(
    "method, trainer, layer",
    [("ds-aware", "stf", "DenseSparseLinear"), ("ds-aware-bytes", "conventional", "DenseSparseLinear"),
     ("svd-llm", None, "LowRankLinear"), ("wanda-nm", "stf", "NMLinear")],
)  # fmt: skip
def test_cli_heals_a_compressed_lm_and_saves_it(lm_folder, tmp_path, capsys, method, trainer, layer):
    folder, text = lm_folder
    out = tmp_path / "healed"
    extra = ["--method", method] + (["--trainer", trainer] if trainer else [])
    assert main(heal_args(folder, text, out, *extra)) == 0
    assert "test perplexity" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["protocol"].startswith("the last tenth of")  # one text file: its end is held out for the test
    assert metrics["trainer"] == (trainer or "conventional") and metrics["steps"] == 3 and metrics["tokens"] == 96
    assert metrics["ratios"]["ratio_params"] == pytest.approx(2.0, rel=0.2) and metrics["test"]["perplexity"] > 1
    model = load(out)
    assert {type(m).__name__ for m in compact_layers(model).values()} == {layer}
    recorded = {row["name"]: row["params"] for row in metrics["layers"]}  # each layer's layout and size, kept
    assert recorded == {name: m.value_params() for name, m in compact_layers(model).items()}
    assert not out.with_name(out.name + ".work").exists()


@pytest.mark.parametrize("method", ["ds-aware-global", "svd-llm-global"])
def test_stf_keeps_the_layouts_a_global_budget_gave_each_layer(lm_folder, tmp_path, method):
    folder, text = lm_folder
    fitted, healed = tmp_path / "fitted", tmp_path / "healed"
    assert main(heal_args(folder, text, fitted, "--method", method, "--tokens", "0")) == 0
    assert main(heal_args(folder, text, healed, "--method", method, "--trainer", "stf", "--refresh-every", "1")) == 0
    layouts = [{name: layer.layout() for name, layer in compact_layers(load(out)).items()} for out in (fitted, healed)]
    assert layouts[0] == layouts[1]
    assert len({tuple(v.values()) for v in layouts[0].values()}) > 2  # the layers do have their own ratios


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


def test_distillation_loss_is_the_teachers_kl_over_predicting_positions():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 4, 6, generator=gen), torch.randn(2, 4, 6, generator=gen)
    t, alpha = 2.0, 0.75
    kl = 0.0
    for b in range(2):
        for i in range(3):  # the last position predicts nothing: it is not scored
            p = torch.softmax(teacher[b, i] / t, -1)
            kl += float((p * (p.log() - torch.log_softmax(student[b, i] / t, -1))).sum())
    want = (1 - alpha) * 1.5 + alpha * t * t * kl / 6
    got = lm_distillation_loss(torch.tensor(1.5), student, teacher, alpha, t)
    assert float(got) == pytest.approx(want, rel=1e-5)
    changed = student.clone()
    changed[:, -1] += 5.0
    assert float(lm_distillation_loss(torch.tensor(1.5), changed, teacher, alpha, t)) == pytest.approx(float(got))


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
def test_an_interrupted_healing_resumes_exactly_without_refitting(lm_folder, tmp_path, capsys, monkeypatch, trainer):
    folder, text = lm_folder
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
        (["--method", "dense", "--trainer", "stf"], "dense trains no structure"),
        (["--method", "ds-aware", "--fisher"], "apply to task fine-tuning"),
        (["--method", "svd-llm", "--refresh-every", "3"], "apply to --trainer stf"),
        (["--method", "ds-aware", "--ratio", "0.5"], "ratio"),
        (["--method", "ds-aware", "--max-length", "4096"], "--window 4096"),
        (["--method", "ds-aware", "--batch-size", "500"], "fewer than one batch"),
        (["--method", "ds-aware", "--tokens", "-1"], "tokens must be a whole number of at least 0"),
        (["--method", "ds-aware", "--device", "gpu"], "give cpu, cuda or cuda:N"),
        (["--method", "ds-aware", "--tokens", "0", "--trainer", "stf"], "fits without training"),
    ],
)
def test_bad_healing_runs_are_refused_with_nothing_written(lm_folder, tmp_path, capsys, extra, message):
    folder, text = lm_folder
    out = tmp_path / "never"
    assert main(heal_args(folder, text, out, *extra)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not out.with_name("never.work").exists()


def test_dense_trains_by_the_same_recipe_as_the_reference_of_healed_runs(lm_folder, tmp_path, capsys):
    folder, text = lm_folder
    out = tmp_path / "dense"
    assert main(heal_args(folder, text, out, "--method", "dense")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["ratio"], metrics["trainer"], metrics["steps"], metrics["ratios"]) == (1.0, "-", 3, None)
    assert metrics["model_bytes"] == metrics["dense_model_bytes"] and not compact_layers(load(out))
    before = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    after = load(out).state_dict()
    assert any(not torch.equal(before[name], after[name]) for name in before)  # it trained


def test_zero_tokens_is_the_training_free_fit(lm_folder, tmp_path, capsys):
    folder, text = lm_folder
    fitted, healed = tmp_path / "fitted", tmp_path / "healed"
    args = [a if a != "96" else "0" for a in heal_args(folder, text, fitted, "--method", "ds-aware")]
    assert main(args) == 0
    assert main(heal_args(folder, text, healed, "--method", "ds-aware", "--trainer", "conventional")) == 0
    a, b = (json.loads((out / "metrics.json").read_text()) for out in (fitted, healed))
    assert (a["steps"], a["tokens"], a["trainer"], a["history"]) == (0, 0, "-", [])
    assert b["steps"] == 3 and a["test"]["perplexity"] != b["test"]["perplexity"]
    # the healed run trained from the same fit: its support is the training-free one
    start, trained = (compact_layers(load(out)) for out in (fitted, healed))
    for name, layer in start.items():
        assert torch.equal(layer.indices, trained[name].indices)


def test_a_sweep_heals_an_lm_from_the_pretrained_model(lm_folder, tmp_path, capsys):
    from dsformer.harness.sweep import _select, load_sweep, run_sweep

    folder, text = lm_folder
    config = tmp_path / "lm.yaml"
    config.write_text(
        f"name: lm\nmodel: {folder}\nkeep_models: false\ntrain: {{batch_size: 2, max_length: 16}}\n"
        f"tasks:\n  {text}: {{tokens: 64, samples: 4}}\nratios: [2]\nseeds: [0]\n"
        "methods:\n  - dense\n  - {method: svd-llm}\n  - {label: ds-stf, method: ds-aware-bytes, trainer: stf}\n"
    )
    sweep = load_sweep(config)
    planned = sweep.plan()
    # no dense start: the pretrained model is the teacher; dense trained by the same recipe is a run beside them
    assert [r.label for r in planned] == ["dense", "svd-llm", "ds-stf"] and not any(r.is_start for r in planned)
    assert planned[0].name.endswith("-dense-s0") and planned[0].ratio == 1.0
    assert [r.label for r in _select(sweep, None, None, [2.0])] == ["dense", "svd-llm", "ds-stf"]  # it has no ratio
    assert all(r.config.model == str(folder) and r.config.train.max_length == 16 for r in planned)
    run_sweep(sweep, quiet=True)
    for run in planned:
        record = json.loads(run.result.read_text())
        assert record["metric"] == "perplexity" and record["tokens"] == 64 and record["label"] == run.label
        assert not run.output.exists()  # keep_models: false


def test_a_run_interrupted_after_its_fit_resumes_from_the_fit(lm_folder, tmp_path, capsys, monkeypatch):
    import dsformer.harness.healing as healing

    folder, text = lm_folder
    out = tmp_path / "run"

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(healing, "heal", stop)
    assert main(heal_args(folder, text, out, "--method", "ds-aware")) == 130
    assert "--resume" in capsys.readouterr().err and healing.fitted_start(out.with_name("run.work"))
    monkeypatch.undo()
    monkeypatch.setattr(healing, "compress_calibrated", lambda *a, **k: pytest.fail("fitted again on resume"))
    assert main(heal_args(folder, text, out, "--method", "ds-aware", "--resume")) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


def test_runs_on_a_text_file_are_named_by_its_stem(lm_folder):
    from dsformer.harness.finetune import RunConfig, default_output

    _, text = lm_folder
    config = RunConfig.from_settings({"task": str(text), "method": "ds-aware", "ratio": 2.0})
    assert default_output(config) == Path("outputs") / "corpus-ds-aware-2x"
    assert (config.train.batch_size, config.train.max_length, config.train.checkpoint_every) == (4, 512, 10)
