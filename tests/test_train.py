"""Fine-tuning on transformers.Trainer with a tiny BERT and a synthetic, separable task: learning, determinism,
best-checkpoint selection, exact resume (with and without STF, across STF's hand-over), refused resumes,
errors, KD, signals."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import TOY_WORDS, toy_examples, toy_tokenizer
from safetensors import safe_open
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, Trainer

import dsformer.harness.training as train_module
from dsformer.errors import DsformerError, Interrupted
from dsformer.harness.tasks import TASKS, Example, TaskData
from dsformer.harness.training import (
    HANDOVER_FILE,
    STATE_FILE,
    TrainConfig,
    TrainingError,
    distillation_loss,
    latest_checkpoint,
    train,
)
from dsformer.stf import STF, Schedule, STFLinear
from dsformer.structures import DenseSparseConfig
from dsformer.surgery import compact_layers

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


def task(regression: bool = False) -> TaskData:
    spec = TASKS["stsb" if regression else "mr"]
    return TaskData(
        spec, toy_examples(N_TRAIN, 0, regression), toy_examples(16, 1, regression), toy_examples(16, 2, regression)
    )


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
    """At the model's k-th training forward, send a signal (``how="SIGINT"``/``"SIGTERM"``), or return NaN
    logits from the k-th on (``how="nan"``). Evaluation forwards (eval mode) are left alone."""
    original = model.forward
    calls = 0

    def forward(*args, **kwargs):
        nonlocal calls
        if model.training:
            calls += 1
            if calls == k and how.startswith("SIG"):
                os.kill(os.getpid(), getattr(signal, how))
        out = original(*args, **kwargs)
        if model.training and calls >= k and how == "nan":
            out.logits = torch.full_like(out.logits, math.nan)
            out.loss = out.loss * math.nan
        return out

    model.forward = forward


def step_of(folder: Path) -> int:
    checkpoint = latest_checkpoint(folder)
    return json.loads((checkpoint / STATE_FILE).read_text())["global_step"]


def checkpoint_keys(checkpoint: Path) -> set[str]:
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        return set(f.keys())


# ---------------------------------------------------------------------------- learning and determinism


@pytest.mark.parametrize("regression", [False, True], ids=["classification", "regression"])
def test_learns_the_task(tokenizer, tmp_path: Path, regression: bool) -> None:
    data = task(regression)
    model = classifier(1 if regression else 2)
    result = train(model, tokenizer, data, config(epochs=6), tmp_path)
    assert result.history[-1]["loss"] < 0.5 * result.history[0]["loss"]
    assert result.steps == 6 * PER_EPOCH
    assert [h["step"] for h in result.history] == [PER_EPOCH * (i + 1) for i in range(6)]
    if regression:  # 48 toy scores: the loss halves, but the correlation on 16 examples swings with the seed
        assert sorted(result.test) == ["pearson", "spearman"] and result.validation["pearson"] > 0.3
    else:
        assert sorted(result.test) == ["accuracy"]
        assert result.test["accuracy"] >= 0.9 and result.validation["accuracy"] >= 0.9


def test_same_seed_same_result(tokenizer, tmp_path: Path) -> None:
    runs = []
    for name in ("a", "b"):
        model = classifier()
        result = train(model, tokenizer, task(), config(), tmp_path / name)
        runs.append((result, weights(model)))
    (a, wa), (b, wb) = runs
    assert a.test == b.test and a.validation == b.validation
    assert a.history == b.history and a.best_step == b.best_step
    assert_same_weights(wa, wb)
    other = classifier()
    train(other, tokenizer, task(), config(seed=1), tmp_path / "c")
    assert any(not torch.equal(v, wa[k]) for k, v in other.state_dict().items())


def test_best_checkpoint_follows_validation(tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model ends in the state with the best validation metric, not the last one."""
    scripted = iter([0.5, 0.9, 0.7])
    real = train_module._evaluate

    def fake(model, tokenizer, examples, data, cfg):
        value = next(scripted, None)
        return {"accuracy": value} if value is not None else real(model, tokenizer, examples, data, cfg)

    monkeypatch.setattr(train_module, "_evaluate", fake)
    model = classifier()
    result = train(model, tokenizer, task(), config(), tmp_path)
    assert [(h["step"], h["accuracy"]) for h in result.history] == [(6, 0.5), (12, 0.9), (18, 0.7)]
    assert result.best_step == 2 * PER_EPOCH and result.steps == TOTAL
    best = tmp_path / f"checkpoint-{2 * PER_EPOCH}"
    with safe_open(str(best / "model.safetensors"), framework="pt") as f:
        assert_same_weights(weights(model), {key: f.get_tensor(key) for key in f.keys()})


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
        (PER_EPOCH, None),
        (15, None),
        (5, "stf"),
        (10, "stf"),
        (5, "polish"),
        (HANDOVER, "polish"),
        (HANDOVER + 2, "polish"),
    ],
    ids=[
        "first-step",
        "mid-epoch-1",
        "epoch-end",
        "epoch-3",
        "stf-mid-epoch",
        "stf-epoch-2",
        "polish-before-handover",
        "polish-at-the-handover",
        "polish-after-handover",
    ],
)
def test_stopped_then_resumed_equals_uninterrupted(tokenizer, tmp_path: Path, k: int, stf: str | None) -> None:
    """Ctrl-C at the k-th step: the step finishes, a checkpoint is written, and a new process resumes exactly."""
    expected, expected_weights = uninterrupted(tokenizer, tmp_path / "a", stf)

    model = classifier()
    tracker = tracker_for(model, stf)
    fail_at(model, k, "SIGINT")
    with pytest.raises(Interrupted):
        train(model, tokenizer, task(), config(), tmp_path / "b", stf=tracker)
    assert step_of(tmp_path / "b") == k
    if stf == "polish":  # a checkpoint written from the hand-over on holds the compact model
        compact = not any(key.endswith(".projected") for key in checkpoint_keys(latest_checkpoint(tmp_path / "b")))
        assert compact == (k >= HANDOVER)

    fresh = classifier(seed=123)  # a new process: nothing but the checkpoint carries over
    result = train(fresh, tokenizer, task(), config(), tmp_path / "b", stf=tracker_for(fresh, stf), resume=True)
    assert result.test == expected.test and result.validation == expected.validation
    assert result.history == expected.history and result.best_step == expected.best_step
    assert result.steps == TOTAL
    assert_same_weights(weights(fresh), expected_weights)


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


def test_resume_without_stf_of_an_stf_run_raises(tokenizer, tmp_path: Path) -> None:
    uninterrupted(tokenizer, tmp_path, stf="stf")
    with pytest.raises(TrainingError, match="schedule"):
        train(classifier(), tokenizer, task(), config(), tmp_path, resume=True)


def test_resume_ignores_the_progress_bar_and_settings_a_record_predates(tokenizer, tmp_path: Path) -> None:
    first = train(classifier(), tokenizer, task(), config(epochs=1), tmp_path)
    record = tmp_path / train_module.SETTINGS_FILE
    settings = json.loads(record.read_text())
    del settings["config"]["precision"]  # written by a version without this setting: its default applies
    record.write_text(json.dumps(settings))
    again = train(classifier(), tokenizer, task(), config(epochs=1, progress=True), tmp_path, resume=True)
    assert again.test == first.test


def test_unknown_precision_and_a_negative_seed_are_refused() -> None:
    with pytest.raises(TrainingError, match="precision 'fp8'"):
        TrainConfig(precision="fp8")
    with pytest.raises(TrainingError, match="seed must be in"):
        TrainConfig(seed=-1)


def test_bf16_training_runs_on_cpu(tokenizer, tmp_path: Path) -> None:
    result = train(classifier(), tokenizer, task(), config(epochs=1, precision="bf16"), tmp_path)
    assert result.steps > 0 and 0.0 <= result.test["accuracy"] <= 1.0


def test_resume_without_checkpoint_raises(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match=r"no checkpoint in .*; start without --resume"):
        train(classifier(), tokenizer, task(), config(), tmp_path, resume=True)
    assert issubclass(TrainingError, DsformerError) and issubclass(TrainingError, RuntimeError)


CORRUPT = [
    pytest.param(STATE_FILE, b"{not json", id="state-json"),
    pytest.param("model.safetensors", None, id="model-missing"),
    pytest.param("model.safetensors", b"not a safetensors file", id="model-garbage"),
    pytest.param("rng_state.pth", b"garbage", id="rng-garbage"),
    pytest.param("optimizer.pt", b"garbage", id="optimizer-garbage"),
    pytest.param("scheduler.pt", None, id="scheduler-missing"),
]


@pytest.mark.parametrize(("file", "content"), CORRUPT)
def test_resume_with_a_corrupt_checkpoint_raises(tokenizer, tmp_path: Path, file: str, content: bytes | None) -> None:
    train(classifier(), tokenizer, task(), config(epochs=1), tmp_path)
    target = latest_checkpoint(tmp_path) / file
    target.unlink()
    if content is not None:
        target.write_bytes(content)
    with pytest.raises(TrainingError, match=r"checkpoint .* cannot be resumed into this run"):
        train(classifier(), tokenizer, task(), config(epochs=1), tmp_path, resume=True)


def test_resume_into_another_model_raises(tokenizer, tmp_path: Path) -> None:
    train(classifier(), tokenizer, task(), config(epochs=1), tmp_path)
    with pytest.raises(TrainingError, match="its model does not match this one"):
        train(classifier(num_labels=3), tokenizer, task(), config(epochs=1), tmp_path, resume=True)


def test_a_checkpoint_written_half_way_is_passed_over(
    tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint whose write failed (the Trainer writes its state last) is not resumed from."""
    real, calls = Trainer._save_rng_state, []

    def flaky(self, output_dir):
        calls.append(output_dir)
        if len(calls) == 2:  # the second checkpoint (step 4): model and optimizer written, rng and state not
            raise OSError("disk full")
        return real(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", flaky)
    with pytest.raises(OSError, match="disk full"):
        train(classifier(), tokenizer, task(), config(checkpoint_every=2), tmp_path)
    assert step_of(tmp_path) == 2 and (tmp_path / "checkpoint-4").is_dir()
    monkeypatch.setattr(Trainer, "_save_rng_state", real)
    expected, expected_weights = uninterrupted(tokenizer, tmp_path / "a", stf=None, checkpoint_every=2)
    fresh = classifier()
    result = train(fresh, tokenizer, task(), config(checkpoint_every=2), tmp_path, resume=True)
    assert result.steps == TOTAL and result.history == expected.history
    assert_same_weights(weights(fresh), expected_weights)


# ---------------------------------------------------------------------------- non-finite loss


def test_nan_loss_stops_with_the_step_and_the_last_checkpoint(tokenizer, tmp_path: Path) -> None:
    expected, expected_weights = uninterrupted(tokenizer, tmp_path / "a", stf=None, checkpoint_every=2)
    model = classifier()
    fail_at(model, 5, "nan")
    with pytest.raises(TrainingError, match=r"loss became nan at step 5") as info:
        train(model, tokenizer, task(), config(checkpoint_every=2), tmp_path / "b")
    assert str(tmp_path / "b" / "checkpoint-4") in str(info.value) and "--resume" in str(info.value)
    assert step_of(tmp_path / "b") == 4
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
def test_kd_loss_combines_both_terms(regression: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    n = 1 if regression else 2
    s, t = torch.randn(8, n, generator=gen), 5 * torch.randn(8, n, generator=gen)
    task_loss = torch.tensor(0.7)
    spec = TASKS["stsb" if regression else "mr"]
    if regression:
        kd = torch.nn.functional.mse_loss(s, t)
    else:
        p_t, log_p_s = (t / 2).softmax(-1), (s / 2).log_softmax(-1)
        kd = (p_t * (p_t.log() - log_p_s)).sum(-1).mean() * 4  # KL(teacher || student) at T=2, times T²
    assert kd > 1e-4
    cfg = config(kd_alpha=0.3, kd_temperature=2.0)
    torch.testing.assert_close(distillation_loss(task_loss, s, t, spec, cfg), 0.7 * task_loss + 0.3 * kd)
    torch.testing.assert_close(distillation_loss(task_loss, s, t, spec, config(kd_alpha=0.0)), task_loss)
    torch.testing.assert_close(distillation_loss(task_loss, s, t, spec, config(kd_alpha=1.0)), kd)
    same = distillation_loss(task_loss, s, s.clone(), spec, cfg)  # a teacher that agrees: the KD term vanishes
    torch.testing.assert_close(same, 0.7 * task_loss, atol=1e-6, rtol=1e-5)


def test_training_with_a_teacher(tokenizer, tmp_path: Path) -> None:
    data = task()
    teacher = classifier(seed=1)
    train(teacher, tokenizer, data, config(epochs=6), tmp_path / "teacher")  # a teacher sure of its answers
    teacher.train()  # training must put the teacher in eval mode itself
    teacher_weights = weights(teacher)
    student = classifier()
    result = train(student, tokenizer, data, config(kd_alpha=0.5, epochs=6), tmp_path / "student", teacher=teacher)
    assert not teacher.training
    assert_same_weights(weights(teacher), teacher_weights)  # the teacher is never updated
    assert result.test["accuracy"] >= 0.9
    plain = classifier()
    train(plain, tokenizer, data, config(kd_alpha=0.5, epochs=6), tmp_path / "plain")
    assert any(not torch.equal(v, weights(plain)[k]) for k, v in student.state_dict().items())


# ---------------------------------------------------------------------------- STF and its hand-over


def test_stf_trains_and_evaluates_the_projection(tokenizer, tmp_path: Path) -> None:
    model = classifier()
    stf = with_stf(model)
    result = train(model, tokenizer, task(), config(), tmp_path, stf=stf)
    report = stf.finalize(iters=0)  # the best state's projection, as validation scored it
    assert report.ratio_params > 1 and not any(isinstance(m, STFLinear) for m in model.modules())
    again = train_module._evaluate(model, tokenizer, task().validation, task(), config())
    assert again == result.validation


@pytest.mark.parametrize("polish", [POLISH, 1 / 3], ids=["mid-epoch", "at-an-epoch-end"])
def test_polish_hands_over_to_the_compact_factors(
    tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, polish: float
) -> None:
    """With ``polish`` the last steps train the compact layers' own factors, with the support frozen."""
    handover = round(TOTAL * (1 - polish))
    model = classifier()
    stf = with_stf(model, polish=polish)
    supports, moments = {}, {}
    finalize = STF.finalize

    def remember(self, iters=None):
        report = finalize(self, iters)
        for name, layer in compact_layers(model).items():
            supports[name] = (layer.indices.clone(), layer.values.detach().clone())
        return report

    monkeypatch.setattr(STF, "finalize", remember)
    real_hand_over = train_module._Run.hand_over

    def check_moments(self, stf, step):
        before = {id(p) for p in model.parameters()}  # the STF model's
        checkpoint = real_hand_over(self, stf, step)
        saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        scheduler = torch.load(checkpoint / "scheduler.pt", weights_only=True)
        moments["lr"] = ([g["lr"] for g in saved["param_groups"]], scheduler["_last_lr"])
        moments["kept"] = len(saved["state"])
        moments["surviving"] = sum(id(p) in before for p in model.parameters())
        return checkpoint

    monkeypatch.setattr(train_module._Run, "hand_over", check_moments)
    result = train(model, tokenizer, task(), config(), tmp_path, stf=stf)
    layers = compact_layers(model)
    assert layers and set(supports) == set(layers) and not any(isinstance(m, STFLinear) for m in model.modules())
    last = latest_checkpoint(tmp_path)
    with safe_open(str(last / "model.safetensors"), framework="pt") as f:
        for name, layer in layers.items():
            indices, values = supports[name]
            assert torch.equal(layer.indices, indices) and torch.equal(f.get_tensor(f"{name}.indices"), indices)
            assert not torch.equal(f.get_tensor(f"{name}.values"), values)  # the values trained
    assert moments["kept"] == moments["surviving"] > 0  # survivors keep their moments; the factors start theirs
    assert moments["lr"][0] == moments["lr"][1]  # the first compact step takes the schedule's rate, not the peak
    assert result.best_step > handover  # only the compact model's evaluations compete
    assert stf.finalize() is stf.report and stf.report.ratio_params > 1
    assert json.loads((tmp_path / HANDOVER_FILE).read_text()) == stf.report.to_json()


@pytest.mark.parametrize("polish", [-0.1, 1.0, 1.5])
def test_polish_outside_zero_to_one_is_refused(polish: float) -> None:
    with pytest.raises(DsformerError, match="polish is a fraction"):
        Schedule(polish=polish)


def test_checkpoints_carry_the_stf_factors(tokenizer, tmp_path: Path) -> None:
    model = classifier()
    stf = with_stf(model)
    train(model, tokenizer, task(), config(epochs=1, checkpoint_every=4), tmp_path, stf=stf)
    keys = checkpoint_keys(latest_checkpoint(tmp_path))
    for name in stf.layers:
        assert {f"{name}.{key}" for key in ("weight", "projected", "anchor", "factor_basis", "factor_indices")} <= keys


# ---------------------------------------------------------------------------- signals


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("where", ["optimizer", "refresh"])
def test_signal_mid_step_finishes_the_step_then_resumes_exactly(tokenizer, tmp_path: Path, signame, where) -> None:
    """A real signal after the optimizer moved the weights (or during a re-projection) must not leave a
    checkpoint that resumes differently: training finishes that step, checkpoints and stops."""
    expected, expected_weights = uninterrupted(tokenizer, tmp_path / "a", stf="stf")
    # what the process had (SIG_IGN for SIGINT when started in the background by a shell)
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    model = classifier()
    tracker = with_stf(model)
    real = tracker.step

    def signalling_step(step=None, refresh=False):
        if step == 6 and where == "optimizer":  # after step 6's optimizer update, before its re-projection
            os.kill(os.getpid(), getattr(signal, signame))
        result = real(step, refresh=refresh)
        if step == 6 and where == "refresh":
            os.kill(os.getpid(), getattr(signal, signame))
        return result

    tracker.step = signalling_step
    with pytest.raises(Interrupted) as stopped:
        train(model, tokenizer, task(), config(), tmp_path / "b", stf=tracker)
    assert stopped.value.signum == getattr(signal, signame)
    assert step_of(tmp_path / "b") == 6  # the step the signal arrived in was completed
    assert {sig: signal.getsignal(sig) for sig in before} == before  # handlers restored

    fresh = classifier(seed=123)
    result = train(fresh, tokenizer, task(), config(), tmp_path / "b", stf=with_stf(fresh), resume=True)
    assert result.test == expected.test and result.history == expected.history
    assert_same_weights(weights(fresh), expected_weights)


def test_second_signal_stops_at_once(tokenizer, tmp_path: Path) -> None:
    model = classifier()
    tracker = with_stf(model)
    real = tracker.step

    def twice(step=None, refresh=False):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)  # impatient: raises inside this step
        return real(step, refresh=refresh)

    tracker.step = twice
    with pytest.raises(Interrupted):
        train(model, tokenizer, task(), config(), tmp_path, stf=tracker)
    assert latest_checkpoint(tmp_path) is None  # stopped inside step 3: no checkpoint was written


def test_examples_with_one_label_train(tokenizer, tmp_path: Path) -> None:
    """A split whose examples all carry one label still trains (the collator pads, the labels stay ints)."""
    examples = [Example("good film", None, 1.0)] * 16
    data = TaskData(TASKS["mr"], examples, examples[:4], examples[:4])
    assert train(classifier(), tokenizer, data, config(epochs=1), tmp_path).steps == 2
