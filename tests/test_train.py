"""The fine-tuning loop on a tiny BERT and a synthetic, separable task: learning, determinism, best-checkpoint
selection, exact resume (with and without STF), errors, KD and atomic checkpoints."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TOY_WORDS, toy_examples, toy_tokenizer
from safetensors.torch import load_file
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

import dsformer.harness.training as train_module
from dsformer.surgery import compact_layers
from dsformer.errors import DsformerError
from dsformer.stf import STF, Schedule, STFLinear
from dsformer.structures import DenseSparseConfig
from dsformer.harness.tasks import TASKS, Example, TaskData
from dsformer.harness.training import (
    STATE_FILE,
    TrainConfig,
    TrainingError,
    _batch,
    _loss,
    _validate,
    encode,
    evaluate,
    train,
)

CHECKPOINT_FILES = {"model.safetensors", "rng.safetensors", "optimizer.pt", "trainer_state.json"}
N_TRAIN, BATCH, EPOCHS = 48, 8, 3
PER_EPOCH = N_TRAIN // BATCH
TOTAL = EPOCHS * PER_EPOCH


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> BertTokenizerFast:
    return toy_tokenizer(tmp_path_factory.mktemp("vocab"))


def classifier(num_labels: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(TOY_WORDS),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def sentences(n: int, seed: int, regression: bool = False) -> list[Example]:
    return toy_examples(n, seed, regression)


def task(regression: bool = False) -> TaskData:
    spec = TASKS["stsb" if regression else "mr"]
    return TaskData(spec, sentences(N_TRAIN, 0, regression), sentences(16, 1, regression), sentences(16, 2, regression))


def config(**options) -> TrainConfig:
    base = dict(epochs=EPOCHS, batch_size=BATCH, lr=1e-2, warmup=0.1, checkpoint_every=0, eval_batch_size=32)
    return TrainConfig(**{**base, "progress": False, **options})


def with_stf(model: torch.nn.Module, polish: float = 0.0) -> STF:
    structure = DenseSparseConfig(ratio=None, gamma=0.5, delta=0.5, iters=2)
    schedule = Schedule(refresh_every=2, iters=1, ramp_steps=8, ramp_start=0.5, polish=polish)
    return STF.wrap(model, structure, schedule=schedule)


POLISH = 0.3  # STF for the first 13 of 18 steps, then the compact factors
HANDOVER = round(TOTAL * (1 - POLISH))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"tensors differ: {different[:5]}"


def fail_at(model: torch.nn.Module, k: int, how: str) -> None:
    """Make the model's k-th training forward raise KeyboardInterrupt (``how="interrupt"``), or return NaN
    logits from the k-th on (``how="nan"``). Evaluation forwards (eval mode) are left alone."""
    original = model.forward
    calls = 0

    def forward(*args, **kwargs):
        nonlocal calls
        if model.training:
            calls += 1
            if calls == k and how == "interrupt":
                raise KeyboardInterrupt
        out = original(*args, **kwargs)
        if model.training and calls >= k and how == "nan":
            out.logits = torch.full_like(out.logits, math.nan)
        return out

    model.forward = forward


def no_temp_folders(folder: Path) -> None:
    names = sorted(p.name for p in folder.iterdir())
    assert set(names) <= {"best", "checkpoint"}, names
    for sub in folder.iterdir():
        assert not any(p.is_dir() for p in sub.iterdir()), sorted(p.name for p in sub.iterdir())


def ckpt_step(folder: Path) -> int:
    return json.loads((folder / "trainer_state.json").read_text())["step"]


# ---------------------------------------------------------------------------- learning and determinism


@pytest.mark.parametrize("regression", [False, True], ids=["classification", "regression"])
def test_learns_the_task(tokenizer, tmp_path: Path, regression: bool) -> None:
    data = task(regression)
    model = classifier(1 if regression else 2)
    cfg = config(epochs=6)
    features = encode(tokenizer, data.train, cfg.max_length)
    batch = _batch(tokenizer, features, [e.label for e in data.train], regression)

    def train_loss() -> float:
        model.eval()
        with torch.no_grad():
            outputs = model(**{k: v for k, v in batch.items() if k != "labels"})
        return float(_loss(outputs, batch, data.spec, None, cfg))

    before = train_loss()
    result = train(model, tokenizer, data, cfg, tmp_path)
    assert train_loss() < before  # the best state, which may come early
    if not regression:  # (the regression head needs more steps to reach the scores' scale, not their order)
        assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]
    assert result.steps == 6 * PER_EPOCH
    assert [h["step"] for h in result.history] == [PER_EPOCH * (i + 1) for i in range(6)]
    if regression:
        assert sorted(result.test) == ["pearson", "spearman"]
        assert result.test["pearson"] > 0.9 and result.validation["pearson"] > 0.9
    else:
        assert sorted(result.test) == ["accuracy"]
        assert result.test["accuracy"] >= 0.9 and result.validation["accuracy"] >= 0.9
    no_temp_folders(tmp_path)


def test_same_seed_same_result(tokenizer, tmp_path: Path) -> None:
    data = task()
    runs = []
    for name in ("a", "b"):
        model = classifier()
        result = train(model, tokenizer, data, config(), tmp_path / name)
        runs.append((result, weights(model)))
    (a, wa), (b, wb) = runs
    assert a.test == b.test and a.validation == b.validation
    assert a.history == b.history and a.best_step == b.best_step
    assert_same_weights(wa, wb)
    other = classifier()
    train(other, tokenizer, data, config(seed=1), tmp_path / "c")
    assert any(not torch.equal(v, wa[k]) for k, v in other.state_dict().items())


def test_best_checkpoint_follows_validation(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model ends in the state with the best validation metric, not the last one."""
    scripted = iter([0.5, 0.9, 0.7])
    real = train_module._validate

    def fake(model, tokenizer, data, cfg, stf):
        value = next(scripted, None)
        return {"accuracy": value} if value is not None else real(model, tokenizer, data, cfg, stf)

    monkeypatch.setattr(train_module, "_validate", fake)
    model = classifier()
    result = train(model, tokenizer, task(), config(), tmp_path)
    assert [(h["step"], h["accuracy"]) for h in result.history] == [(6, 0.5), (12, 0.9), (18, 0.7)]
    assert result.best_step == 2 * PER_EPOCH and result.steps == TOTAL
    best, last = tmp_path / "best", tmp_path / "checkpoint"
    assert ckpt_step(best) == 2 * PER_EPOCH and ckpt_step(last) == TOTAL
    final = weights(model)
    assert_same_weights(final, load_file(str(best / "model.safetensors")))
    last_weights = load_file(str(last / "model.safetensors"))
    assert any(not torch.equal(final[k], last_weights[k]) for k in final)
    state = json.loads((best / "trainer_state.json").read_text())
    assert state["best"] == 0.9 and state["best_step"] == 12


def test_best_step_is_the_first_maximum_of_history(tokenizer, tmp_path: Path) -> None:
    result = train(classifier(), tokenizer, task(), config(lr=1e-3), tmp_path)
    scores = [h["accuracy"] for h in result.history]
    assert result.best_step == result.history[scores.index(max(scores))]["step"]
    at_best = next(h for h in result.history if h["step"] == result.best_step)
    assert result.validation == {"accuracy": at_best["accuracy"]}  # the reloaded best state scores the same


# ---------------------------------------------------------------------------- resume


def tracker_for(model: torch.nn.Module, stf: str | None) -> STF | None:
    """No STF, STF to the end, or STF then the compact factors (``"polish"``)."""
    return None if stf is None else with_stf(model, polish=POLISH if stf == "polish" else 0.0)


def uninterrupted(tokenizer, folder: Path, stf: str | None, **options):
    model = classifier()
    tracker = tracker_for(model, stf)
    return train(model, tokenizer, task(), config(**options), folder, stf=tracker), weights(model)


@pytest.mark.parametrize(
    ("k", "stf"),
    [
        (1, None),
        (4, None),
        (7, None),
        (15, None),
        (5, "stf"),
        (10, "stf"),
        (5, "polish"),
        (HANDOVER + 1, "polish"),
        (HANDOVER + 3, "polish"),
    ],
    ids=[
        "first-step",
        "mid-epoch-1",
        "first-of-epoch-2",
        "epoch-3",
        "stf-mid-epoch",
        "stf-epoch-2",
        "polish-before-handover",
        "polish-right-after-handover",
        "polish-after-handover",
    ],
)
def test_interrupted_then_resumed_equals_uninterrupted(tokenizer, tmp_path: Path, k: int, stf: str | None) -> None:
    expected, expected_weights = uninterrupted(tokenizer, tmp_path / "a", stf)

    model = classifier()
    tracker = tracker_for(model, stf)
    fail_at(model, k, "interrupt")
    with pytest.raises(KeyboardInterrupt):
        train(model, tokenizer, task(), config(), tmp_path / "b", stf=tracker)
    assert ckpt_step(tmp_path / "b" / "checkpoint") == k - 1
    no_temp_folders(tmp_path / "b")

    fresh = classifier(seed=123)  # a new process: nothing but the checkpoint carries over
    tracker = tracker_for(fresh, stf)
    if stf:
        assert (tmp_path / "b" / "checkpoint" / "stf.safetensors").exists() == (k <= HANDOVER or stf == "stf")
    result = train(fresh, tokenizer, task(), config(), tmp_path / "b", stf=tracker, resume=True)
    assert result.test == expected.test and result.validation == expected.validation
    assert result.history == expected.history and result.best_step == expected.best_step
    assert result.steps == TOTAL
    assert_same_weights(weights(fresh), expected_weights)
    no_temp_folders(tmp_path / "b")


def test_resume_of_a_finished_run_reevaluates_the_best(tokenizer, tmp_path: Path) -> None:
    first, first_weights = uninterrupted(tokenizer, tmp_path, stf=None)
    model = classifier(seed=7)
    again = train(model, tokenizer, task(), config(), tmp_path, resume=True)
    assert again.test == first.test and again.best_step == first.best_step and again.steps == TOTAL
    assert_same_weights(weights(model), first_weights)


@pytest.mark.parametrize("change", [{"lr": 1e-3}, {"seed": 1}, {"batch_size": 4}, {"epochs": 4}, {"precision": "bf16"}])
def test_resume_with_other_settings_raises(tokenizer, tmp_path: Path, change: dict) -> None:
    train(classifier(), tokenizer, task(), config(epochs=1), tmp_path)
    with pytest.raises(TrainingError, match=rf"other settings \({next(iter(change))}\)"):
        train(classifier(), tokenizer, task(), config(**{"epochs": 1, **change}), tmp_path, resume=True)


@pytest.mark.parametrize("change", [{"polish": 0.5}, {"refresh_every": 3}, {"polish": 0.0}])
def test_resume_with_another_stf_schedule_raises(tokenizer, tmp_path: Path, change: dict) -> None:
    uninterrupted(tokenizer, tmp_path, stf="polish")
    model = classifier()
    stf = with_stf(model, polish=POLISH)
    stf.schedule = Schedule(**{**dataclasses.asdict(stf.schedule), **change})
    with pytest.raises(TrainingError, match=f"schedule.{next(iter(change))}"):
        train(model, tokenizer, task(), config(), tmp_path, stf=stf, resume=True)


def test_resume_ignores_the_progress_bar_and_settings_a_checkpoint_predates(tokenizer, tmp_path: Path) -> None:
    first = train(classifier(), tokenizer, task(), config(epochs=1), tmp_path)
    state_file = tmp_path / "checkpoint" / STATE_FILE
    state = json.loads(state_file.read_text())
    del state["config"]["precision"]  # written by a version without this setting: its default applies
    state_file.write_text(json.dumps(state))
    again = train(classifier(), tokenizer, task(), config(epochs=1, progress=True), tmp_path, resume=True)
    assert again.test == first.test


def test_unknown_precision_is_refused() -> None:
    with pytest.raises(TrainingError, match="precision 'fp8'"):
        TrainConfig(precision="fp8")


def test_bf16_training_runs_on_cpu(tokenizer, tmp_path: Path) -> None:
    result = train(classifier(), tokenizer, task(), config(epochs=1, precision="bf16"), tmp_path)
    assert result.steps > 0 and 0.0 <= result.test["accuracy"] <= 1.0


def test_resume_without_checkpoint_raises(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"no checkpoint in .*checkpoint; start without --resume"):
        train(classifier(), tokenizer, task(), config(), tmp_path, resume=True)
    assert issubclass(TrainingError, DsformerError) and issubclass(TrainingError, RuntimeError)


CORRUPT = [
    pytest.param("trainer_state.json", b"{not json", id="state-json"),
    pytest.param("model.safetensors", None, id="model-missing"),
    pytest.param(
        "model.safetensors",
        b"not a safetensors file",
        id="model-garbage",
    ),
    pytest.param(
        "rng.safetensors",
        b"\x08\x00\x00\x00\x00\x00\x00\x00{}",
        id="rng-garbage",
    ),
    pytest.param(
        "optimizer.pt",
        b"garbage",
        id="optimizer-garbage",
    ),
]


@pytest.mark.parametrize(("file", "content"), CORRUPT)
def test_resume_with_a_corrupt_checkpoint_raises(tokenizer, tmp_path: Path, file: str, content: bytes | None) -> None:
    train(classifier(), tokenizer, task(), config(epochs=1), tmp_path)
    target = tmp_path / "checkpoint" / file
    target.unlink()
    if content is not None:
        target.write_bytes(content)
    with pytest.raises(TrainingError, match=r"checkpoint .* cannot be resumed into this run"):
        train(classifier(), tokenizer, task(), config(epochs=1), tmp_path, resume=True)


# ---------------------------------------------------------------------------- non-finite loss


def test_nan_loss_stops_with_the_step_and_the_last_checkpoint(tokenizer, tmp_path: Path) -> None:
    expected, expected_weights = uninterrupted(tokenizer, tmp_path / "a", stf=None, checkpoint_every=2)
    model = classifier()
    fail_at(model, 5, "nan")
    ckpt = tmp_path / "b" / "checkpoint"
    with pytest.raises(TrainingError, match=r"loss became nan at step 5") as info:
        train(model, tokenizer, task(), config(checkpoint_every=2), tmp_path / "b")
    assert str(ckpt) in str(info.value) and "--resume" in str(info.value)
    assert ckpt_step(ckpt) == 4
    no_temp_folders(tmp_path / "b")
    # the checkpoint written before stays loadable, and resuming from it finishes the run exactly
    fresh = classifier()
    result = train(fresh, tokenizer, task(), config(checkpoint_every=2), tmp_path / "b", resume=True)
    assert result.steps == TOTAL and result.test == expected.test
    assert_same_weights(weights(fresh), expected_weights)


def test_nan_loss_before_any_checkpoint(tokenizer, tmp_path: Path) -> None:
    model = classifier()
    fail_at(model, 1, "nan")
    with pytest.raises(TrainingError, match=r"at step 1; .*not written yet"):
        train(model, tokenizer, task(), config(), tmp_path)


def test_huge_learning_rate_is_caught(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"loss became (nan|inf|-inf) at step \d+"):
        train(classifier(), tokenizer, task(), config(lr=1e30, grad_clip=0.0, warmup=0.0), tmp_path)


# ---------------------------------------------------------------------------- knowledge distillation


@pytest.mark.parametrize("regression", [False, True], ids=["classification", "regression"])
def test_kd_loss_combines_both_terms(tokenizer, regression: bool) -> None:
    data = task(regression)
    labels = [e.label for e in data.train[:8]]
    batch = _batch(tokenizer, encode(tokenizer, data.train[:8], 32), labels, regression)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    n = 1 if regression else 2
    student, teacher = classifier(n, seed=0).eval(), classifier(n, seed=1).eval()
    with torch.no_grad():  # tiny initial logits would make the KD term vanish
        teacher.classifier.weight.mul_(30.0)
        teacher.classifier.bias.copy_(torch.linspace(-1.0, 1.0, n))
    with torch.no_grad():
        s, t = student(**inputs).logits, teacher(**inputs).logits
    outputs = student(**inputs)
    if regression:
        task_loss = torch.nn.functional.mse_loss(s[:, 0], batch["labels"])
        kd = torch.nn.functional.mse_loss(s, t)
    else:
        task_loss = torch.nn.functional.cross_entropy(s, batch["labels"])
        p_t, log_p_s = (t / 2).softmax(-1), (s / 2).log_softmax(-1)
        kd = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 4  # KL(teacher || student) at T=2, times T²
    assert kd > 1e-4  # the two models disagree, so the check below sees the KD term
    cfg = config(kd_alpha=0.3, kd_temperature=2.0)
    torch.testing.assert_close(_loss(outputs, batch, data.spec, teacher, cfg), 0.7 * task_loss + 0.3 * kd)
    torch.testing.assert_close(_loss(outputs, batch, data.spec, None, cfg), task_loss)
    torch.testing.assert_close(_loss(outputs, batch, data.spec, teacher, config(kd_alpha=0.0)), task_loss)
    torch.testing.assert_close(_loss(outputs, batch, data.spec, teacher, config(kd_alpha=1.0)), kd)
    same = copy.deepcopy(student)  # a teacher that agrees: the KD term vanishes
    torch.testing.assert_close(_loss(outputs, batch, data.spec, same, cfg), 0.7 * task_loss, atol=1e-6, rtol=1e-5)


def test_training_with_a_teacher(tokenizer, tmp_path: Path) -> None:
    data = task()
    teacher = classifier(seed=1)
    train(teacher, tokenizer, data, config(), tmp_path / "teacher")
    teacher.train()  # train() must put the teacher in eval mode itself
    teacher_weights = weights(teacher)
    student = classifier()
    result = train(student, tokenizer, data, config(kd_alpha=0.5), tmp_path / "student", teacher=teacher)
    assert not teacher.training
    assert_same_weights(weights(teacher), teacher_weights)  # the teacher is never updated
    assert result.test["accuracy"] >= 0.9
    plain = classifier()
    train(plain, tokenizer, data, config(kd_alpha=0.5), tmp_path / "plain")
    assert any(not torch.equal(v, weights(plain)[k]) for k, v in student.state_dict().items())


# ---------------------------------------------------------------------------- STF hooks and checkpoint files


def test_validation_uses_the_projection_and_restores_the_ramp(tokenizer) -> None:
    data = task()
    model = classifier().eval()
    stf = with_stf(model)
    stf.set_step(2)
    ramps = [layer.ramp for layer, _ in stf.layers.values()]
    assert all(r < 1.0 for r in ramps)
    calls = []
    original = model.forward

    def forward(*args, **kwargs):
        calls.append([layer.ramp for layer, _ in stf.layers.values()])
        return original(*args, **kwargs)

    model.forward = forward
    metrics = _validate(model, tokenizer, data, config(), stf)
    assert calls and all(set(c) == {1.0} for c in calls)
    assert [layer.ramp for layer, _ in stf.layers.values()] == ramps
    stf.set_step(100)
    assert metrics == evaluate(model, tokenizer, data.validation, data.spec, config())


@pytest.mark.parametrize("polish", [POLISH, 1 / 3], ids=["mid-epoch", "at-an-epoch-end"])
def test_polish_hands_over_to_the_compact_factors(
    tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, polish: float
) -> None:
    """With ``polish`` the last steps train the compact layers' own factors, with the support frozen."""
    handover = round(TOTAL * (1 - polish))
    model = classifier()
    stf = with_stf(model, polish=polish)
    hand_over = train_module._hand_over

    def check_the_optimizer(stf, model, config, total, state, optimizer=None):
        before = dict(optimizer.state)
        new, scheduler = hand_over(stf, model, config, total, state, optimizer)
        kept = dict(new.state)
        assert kept and all(before[p] is st for p, st in kept.items())  # survivors keep their moments
        assert scheduler.get_last_lr()[0] == pytest.approx(config.lr * (total - handover) / (total - 2))
        return new, scheduler

    monkeypatch.setattr(train_module, "_hand_over", check_the_optimizer)
    supports = {}
    finalize = STF.finalize

    def remember(self, iters=None):
        report = finalize(self, iters)
        for name, layer in compact_layers(model).items():
            supports[name] = (layer.indices.clone(), layer.values.detach().clone())
        return report

    monkeypatch.setattr(STF, "finalize", remember)
    result = train(model, tokenizer, task(), config(), tmp_path, stf=stf)
    layers = compact_layers(model)
    assert layers and set(supports) == set(layers) and not any(isinstance(m, STFLinear) for m in model.modules())
    last = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))  # the state after the last step
    for name, layer in layers.items():
        indices, values = supports[name]
        assert torch.equal(layer.indices, indices) and torch.equal(last[f"{name}.indices"], indices)  # support kept
        assert not torch.equal(last[f"{name}.values"], values)  # the values trained
    assert result.best_step >= handover  # only the compact model's evaluations compete
    assert stf.finalize() is stf.report and stf.report.ratio_params > 1
    state = json.loads((tmp_path / "checkpoint" / STATE_FILE).read_text())
    assert state["handover_step"] == handover and state["stf_report"] == stf.report.to_json()


@pytest.mark.parametrize("polish", [-0.1, 1.0, 1.5])
def test_polish_outside_zero_to_one_is_refused(polish: float) -> None:
    with pytest.raises(DsformerError, match="polish is a fraction"):
        Schedule(polish=polish)


def test_checkpoint_folders_hold_everything(tokenizer, tmp_path: Path) -> None:
    model = classifier()
    stf = with_stf(model)
    train(model, tokenizer, task(), config(epochs=1, checkpoint_every=4), tmp_path, stf=stf)
    no_temp_folders(tmp_path)
    for name in ("best", "checkpoint"):
        files = {p.name for p in (tmp_path / name).iterdir()}
        assert files == CHECKPOINT_FILES | {"stf.safetensors"}
    state = json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == PER_EPOCH and state["config"]["checkpoint_every"] == 4
    assert set(load_file(str(tmp_path / "checkpoint" / "stf.safetensors"))) == set(stf.factor_state())


def test_a_failed_checkpoint_write_leaves_the_previous_one(
    tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Checkpoints are written atomically: a write that fails half-way leaves the last one whole."""
    real = train_module.save_file
    calls = 0

    def flaky(tensors, path, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 4:  # the second checkpoint (step 4): model written, rng not
            raise OSError("disk full")
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(train_module, "save_file", flaky)
    with pytest.raises(OSError, match="disk full"):
        train(classifier(), tokenizer, task(), config(checkpoint_every=2), tmp_path)
    no_temp_folders(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert ckpt_step(tmp_path / "checkpoint") == 2
    assert {p.name for p in (tmp_path / "checkpoint").iterdir()} == CHECKPOINT_FILES
    monkeypatch.setattr(train_module, "save_file", real)
    result = train(classifier(), tokenizer, task(), config(checkpoint_every=2), tmp_path, resume=True)
    assert result.steps == TOTAL


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("where", ["optimizer", "refresh"])
def test_signal_mid_step_finishes_the_step_then_resumes_exactly(tokenizer, tmp_path: Path, signame, where) -> None:
    """A real signal after the optimizer moved the weights (or during a re-projection) must not leave a
    checkpoint that resumes differently: training finishes that step, checkpoints and stops."""
    import os
    import signal

    from dsformer.errors import Interrupted

    expected, expected_weights = uninterrupted(tokenizer, tmp_path / "a", stf="stf")
    # what the process had (SIG_IGN for SIGINT when started in the background by a shell)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    model = classifier()
    tracker = with_stf(model)
    calls = {"n": 0}
    real = tracker.maybe_refresh

    def signalling_refresh(step, force=False):
        calls["n"] += 1
        if calls["n"] == 6 and where == "optimizer":  # after step 6's optimizer update, before its re-projection
            os.kill(os.getpid(), getattr(signal, signame))
        result = real(step, force=force)
        if calls["n"] == 6 and where == "refresh":
            os.kill(os.getpid(), getattr(signal, signame))
        return result

    tracker.maybe_refresh = signalling_refresh
    with pytest.raises(Interrupted) as stopped:
        train(model, tokenizer, task(), config(), tmp_path / "b", stf=tracker)
    assert stopped.value.signum == getattr(signal, signame)
    assert ckpt_step(tmp_path / "b" / "checkpoint") == 6  # the step the signal arrived in was completed
    assert {sig: signal.getsignal(sig) for sig in before} == before  # handlers restored

    fresh = classifier(seed=123)
    result = train(fresh, tokenizer, task(), config(), tmp_path / "b", stf=with_stf(fresh), resume=True)
    assert result.test == expected.test and result.history == expected.history
    assert_same_weights(weights(fresh), expected_weights)


def test_second_signal_stops_at_once(tokenizer, tmp_path: Path) -> None:
    import os
    import signal

    from dsformer.errors import Interrupted

    model = classifier()
    tracker = with_stf(model)
    real = tracker.maybe_refresh

    def twice(step, force=False):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # impatient: raises inside this step
        return real(step, force=force)

    tracker.maybe_refresh = twice
    with pytest.raises(Interrupted):
        train(model, tokenizer, task(), config(), tmp_path, stf=tracker)
    # stopped after the optimizer update of step 3: nothing consistent to save, so no checkpoint yet
    assert not (tmp_path / "checkpoint").exists()
