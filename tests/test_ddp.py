"""Two CPU processes on gloo train exactly like one process on the whole batch (no dropout, so no noise)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TOY_WORDS, toy_examples, toy_tokenizer
from transformers import BertConfig, BertForSequenceClassification

from dsformer.tasks import TASKS, TaskData
from dsformer.train import TrainConfig, train


def _setup(folder: Path):
    tokenizer = toy_tokenizer(folder)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(TOY_WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(config)
    examples = toy_examples(48, seed=0)
    data = TaskData(TASKS["mr"], examples, examples[:8], examples[:8])
    return model, tokenizer, data


def _worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        model, tokenizer, data = _setup(Path(folder))
        config = TrainConfig(epochs=2, batch_size=8, lr=1e-3, progress=False, checkpoint_every=0)
        result = train(model, tokenizer, data, config, Path(folder) / "run")
        if rank == 0:
            torch.save({"state": model.state_dict(), "test": result.test}, Path(folder) / "ddp.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_match_one_process():
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(2, folder), nprocs=2, join=True)
        ddp = torch.load(Path(folder) / "ddp.pt", weights_only=True)
        model, tokenizer, data = _setup(Path(folder))
        config = TrainConfig(epochs=2, batch_size=8, lr=1e-3, progress=False, checkpoint_every=0)
        single = train(model, tokenizer, data, config, Path(folder) / "single")
        assert ddp["test"] == single.test
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(ddp["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
        assert not any(p.name.startswith(".") for p in (Path(folder) / "run").iterdir())


def test_torchrun_environment_is_detected(monkeypatch):
    """Without WORLD_SIZE the CLI stays single-process (rank 0) and starts no process group."""
    from dsformer.cli import _init_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert _init_distributed("cpu") == 0
    assert not torch.distributed.is_initialized()
    assert os.environ.get("WORLD_SIZE") is None
