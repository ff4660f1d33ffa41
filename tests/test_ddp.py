"""Two CPU processes on gloo (the Trainer's DDP through accelerate) train like one process on the whole batch
(no dropout, so no noise), and a run that one process stops resumes exactly."""

from __future__ import annotations

import gc
import os
import socket
import tempfile
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import TOY_WORDS, toy_examples, toy_tokenizer
from transformers import BertConfig, BertForSequenceClassification

from dsformer.harness.tasks import TASKS, TaskData
from dsformer.harness.training import TrainConfig, latest_checkpoint, train


def _setup(folder: Path, dropout: float = 0.0):
    # each process writes its own vocab.txt: two writers of one file let a reader see it half-written
    own = Path(tempfile.mkdtemp(dir=folder))
    tokenizer = toy_tokenizer(own)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(TOY_WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    model = BertForSequenceClassification(config)
    examples = toy_examples(48, seed=0)
    data = TaskData(TASKS["mr"], examples, examples[:8], examples[:8])
    return model, tokenizer, data


def _join(rank: int, world: int, port: int) -> None:
    """What torchrun sets for each process; accelerate (inside the Trainer) joins the group from it."""
    torch.set_num_threads(1)
    env = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
    os.environ.update({key: str(value) for key, value in env.items()})
    # a short timeout: processes that disagree fail the test in minutes, not gloo's default half hour
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(minutes=3))


def _leave() -> None:
    """Leave the group with no gloo work alive: the Trainer's DDP wrapper, freed only at interpreter exit, let
    a process abort now and then ('terminate called without an active exception')."""
    gc.collect()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, folder: str, port: int) -> None:
    _join(rank, world, port)
    try:
        model, tokenizer, data = _setup(Path(folder))
        config = TrainConfig(epochs=2, batch_size=8, lr=1e-3, progress=False, checkpoint_every=0)
        result = train(model, tokenizer, data, config, Path(folder) / "run")
        if rank == 0:
            torch.save({"state": model.state_dict(), "test": result.test}, Path(folder) / "ddp.pt")
        torch.distributed.barrier()
    finally:
        _leave()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_match_one_process():
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(2, folder, _free_port()), nprocs=2, join=True)
        ddp = torch.load(Path(folder) / "ddp.pt", weights_only=True)
        model, tokenizer, data = _setup(Path(folder))
        config = TrainConfig(epochs=2, batch_size=8, lr=1e-3, progress=False, checkpoint_every=0)
        single = train(model, tokenizer, data, config, Path(folder) / "single")
        assert ddp["test"] == single.test
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(ddp["state"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
        assert not any(p.name.startswith(".") for p in (Path(folder) / "run").iterdir())


def _resume_worker(rank: int, world: int, folder: str, run: str, interrupt_at: int, resume: bool, port: int) -> None:
    """Train with dropout; with ``interrupt_at``, only rank 1 gets SIGTERM at that training forward."""
    import signal

    from dsformer.errors import Interrupted

    _join(rank, world, port)
    torch.manual_seed(1000 + rank)  # what each process's generator holds before train() seeds it
    try:
        model, tokenizer, data = _setup(Path(folder), dropout=0.3)
        config = TrainConfig(epochs=2, batch_size=8, lr=1e-3, progress=False, checkpoint_every=0)
        forward, calls = model.forward, [0]

        def signalled(*args, **kwargs):
            if model.training:
                calls[0] += 1
                if rank == 1 and calls[0] == interrupt_at:
                    os.kill(os.getpid(), signal.SIGTERM)
            return forward(*args, **kwargs)

        model.forward = signalled
        try:
            train(model, tokenizer, data, config, Path(folder) / run, resume=resume)
        except Interrupted:
            pass
        else:
            if rank == 0:
                torch.save(model.state_dict(), Path(folder) / f"{run}.pt")
        torch.distributed.barrier()
    finally:
        _leave()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_ddp_run_stopped_by_one_process_resumes_exactly():
    """SIGTERM to one process: both stop at the same step; resuming restores each process's own dropout stream."""
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_resume_worker, args=(2, folder, "whole", 0, False, _free_port()), nprocs=2, join=True)
        mp.spawn(_resume_worker, args=(2, folder, "cut", 5, False, _free_port()), nprocs=2, join=True)
        assert latest_checkpoint(Path(folder) / "cut").name == "checkpoint-5"  # both stopped after step 5
        mp.spawn(_resume_worker, args=(2, folder, "cut", 0, True, _free_port()), nprocs=2, join=True)
        whole = torch.load(Path(folder) / "whole.pt", weights_only=True)
        cut = torch.load(Path(folder) / "cut.pt", weights_only=True)
        for name, tensor in whole.items():
            assert torch.equal(cut[name], tensor), name
