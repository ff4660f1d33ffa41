"""STF from a user's own ``transformers.Trainer`` script (``dsformer.STFCallback``) and from a plain PyTorch loop
(the README's example, run as written)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import TOY_WORDS, toy_examples, toy_tokenizer
from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments

import dsformer
from dsformer.stf import STFLinear
from dsformer.surgery import compact_layers

README = Path(__file__).resolve().parents[1] / "README.md"


def tiny_classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(TOY_WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    return BertForSequenceClassification(config)


def features(tokenizer, n: int, seed: int) -> list[dict]:
    examples = toy_examples(n, seed)
    enc = tokenizer([e.text_a for e in examples])
    return [{**{k: enc[k][i] for k in enc.keys()}, "labels": int(e.label)} for i, e in enumerate(examples)]


def user_trainer(model, tokenizer, folder: Path, stf: dsformer.STF, **options) -> Trainer:
    """What a user's fine-tuning script builds, with one callback added."""
    args = TrainingArguments(
        output_dir=str(folder),
        max_steps=12,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=4,
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **options,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=features(tokenizer, 48, 0),
        eval_dataset=features(tokenizer, 16, 1),
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[dsformer.STFCallback(stf)],
    )


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return toy_tokenizer(tmp_path_factory.mktemp("vocab"))


def wrapped() -> tuple[BertForSequenceClassification, dsformer.STF]:
    model = tiny_classifier()
    structure = dsformer.DenseSparseConfig(ratio=None, gamma=0.5, delta=0.5, iters=2)
    return model, dsformer.STF.wrap(model, structure, schedule=dsformer.Schedule(refresh_every=3, iters=1))


def test_trainer_callback_trains_saves_and_loads(tokenizer, tmp_path: Path) -> None:
    model, stf = wrapped()
    before = {name: layer.projected.clone() for name, (layer, _) in stf.layers.items()}
    refreshes = []
    refresh = stf.refresh
    stf.refresh = lambda *a, **k: refreshes.append(stf.steps) or refresh(*a, **k)
    user_trainer(model, tokenizer, tmp_path / "run", stf).train()
    # a step hook after every optimizer step: re-projected every 3 steps, and before each evaluation
    assert stf.steps == 12 and refreshes == [3, 4, 6, 8, 9, 12]
    assert all(not torch.equal(layer.projected, before[name]) for name, (layer, _) in stf.layers.items())
    model.eval()
    batch = DataCollatorWithPadding(tokenizer)(features(tokenizer, 8, 2))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        evaluated = model(**inputs).logits  # evaluation computes with the projection
    report = stf.finalize(iters=0)
    assert not any(isinstance(m, STFLinear) for m in model.modules()) and len(compact_layers(model)) == 6
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, evaluated, atol=1e-5, rtol=0)
    dsformer.save(model, tmp_path / "compact", tokenizer=tokenizer, report=report)
    loaded = dsformer.load(tmp_path / "compact")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, evaluated, atol=1e-5, rtol=0)
    assert loaded.config.num_labels == 2 and report.ratio_params > 1.5


def test_trainer_resumes_stf_exactly_from_its_own_checkpoint(tokenizer, tmp_path: Path) -> None:
    """The projections' factors are model buffers: Trainer's checkpoints and ``resume_from_checkpoint`` carry them."""
    model, stf = wrapped()
    user_trainer(model, tokenizer, tmp_path / "whole", stf).train()
    whole = {k: v.clone() for k, v in model.state_dict().items()}
    fresh, stf = wrapped()  # a new process resumes the run from its checkpoint at step 8
    checkpoint = tmp_path / "whole" / "checkpoint-8"
    user_trainer(fresh, tokenizer, tmp_path / "resumed", stf).train(resume_from_checkpoint=str(checkpoint))
    assert stf.steps == 12
    for key, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, whole[key]), key


def test_trainer_with_the_best_model_at_end_finalizes_the_best_projection(tokenizer, tmp_path: Path) -> None:
    model, stf = wrapped()
    trainer = user_trainer(model, tokenizer, tmp_path, stf, load_best_model_at_end=True, metric_for_best_model="loss")
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    from safetensors.torch import load_file

    saved = load_file(str(Path(best) / "model.safetensors"))
    stf.finalize(iters=0)
    for name, layer in compact_layers(model).items():  # the compact layers hold the best checkpoint's factors
        assert torch.equal(layer.basis, saved[f"{name}.factor_basis"]), name


def readme_block(heading: str) -> str:
    """The first python block under a README heading."""
    text = README.read_text()
    section = text[text.index(heading) :]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_plain_loop_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code = readme_block("### STF in your own training loop")
    assert 8 <= len(code.strip().splitlines()) <= 20
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the example is ours, run as a user would
    model = namespace["model"]
    assert compact_layers(model) and not any(isinstance(m, STFLinear) for m in model.modules())
    assert (tmp_path / "outputs" / "my-compact-model" / "dsformer.json").exists()
    assert len(compact_layers(dsformer.load(tmp_path / "outputs" / "my-compact-model"))) == len(compact_layers(model))
