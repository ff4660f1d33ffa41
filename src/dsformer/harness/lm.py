"""Language-model data and perplexity: WikiText-2 (or any text file) cut into token windows.

Protocol (stated beside every figure): the evaluation text is tokenized once as a whole and cut
into non-overlapping windows of ``window`` tokens (the remainder is dropped); perplexity is the
exponential of the mean negative log-likelihood of every token after the first of each window.
Calibration windows are drawn, seeded, from a different text (WikiText-2's validation split),
never from the evaluation text.

Example:
    >>> import torch
    >>> from dsformer.harness.lm import cut_windows
    >>> cut_windows(torch.arange(10), 4).tolist()
    [[0, 1, 2, 3], [4, 5, 6, 7]]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from dsformer.errors import DsformerError
from dsformer.harness.tasks import DataError


@dataclass(frozen=True)
class TextSource:
    """Where a language-modelling task's text is: files in a ``--data-dir`` folder, or a hub dataset."""

    name: str
    test_file: str
    calibration_file: str
    hub: tuple[str, str]


LM_TASKS = {
    "wikitext2": TextSource("wikitext2", "wiki.test.raw", "wiki.valid.tokens", ("wikitext", "wikitext-2-raw-v1")),
}


def is_lm_task(task: str | None) -> bool:
    """Whether ``task`` names language modelling: a task of :data:`LM_TASKS` or a text file (not a task folder)."""
    return task in LM_TASKS or (task is not None and Path(task).is_file())


def task_label(task: str) -> str:
    """A task's name in run names: a text file's stem (never a path), else the task itself."""
    return Path(task).stem if task not in LM_TASKS and Path(task).is_file() else task


def held_out(text: str, share: float = 0.1) -> tuple[str, str]:
    """A text cut in two at a line break: the first ``1 - share`` to train on, the rest to test on.

    >>> train, test = held_out("".join(f"line {i}\\n" for i in range(20)))
    >>> train.count("\\n"), test
    (18, 'line 18\\nline 19\\n')
    """
    lines = text.splitlines(keepends=True)
    cut = len(lines) - max(1, round(share * len(lines)))
    if cut < 1:
        raise DataError("the text has too few lines to hold some out for testing")
    return "".join(lines[:cut]), "".join(lines[cut:])


def read_text(task: str, split: str, data_dir: str | None = None) -> str:
    """The ``test`` (evaluation) or ``calibration`` text of an LM task, or of a plain text file.

    ``task`` is a name in :data:`LM_TASKS` (its files in ``data_dir``, else the hub dataset, online)
    or the path of a UTF-8 text file (a user's own corpus; then ``split`` is ignored).
    """
    if task not in LM_TASKS:
        path = Path(task)
        if not path.is_file():
            raise DataError(f"{task!r} is neither a language-modelling task ({', '.join(LM_TASKS)}) nor a text file")
        return _read_file(path)
    source = LM_TASKS[task]
    if data_dir is not None:
        name = source.test_file if split == "test" else source.calibration_file
        path = Path(data_dir) / name
        if not path.is_file():
            raise DataError(f"{data_dir} has no {name} (the {source.name} {split} text)")
        return _read_file(path)
    return _hub_text(source, "test" if split == "test" else "validation")


def _read_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not text.strip():
        raise DataError(f"{path} holds no text")
    return text


def _hub_text(source: TextSource, split: str) -> str:
    from datasets import load_dataset

    try:
        rows = load_dataset(*source.hub, split=split)
    except Exception as err:  # offline, or the hub refused: one line, with the way out
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(
            f"cannot load the {source.hub[0]}/{source.hub[1]} dataset ({first}); pass --data-dir with "
            f"{source.test_file} and {source.calibration_file}"
        ) from None
    return "\n\n".join(rows["text"])  # the join that published WikiText-2 perplexities use


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole text as one sequence of token ids (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def cut_windows(ids: torch.Tensor, window: int) -> torch.Tensor:
    """Non-overlapping ``(n, window)`` windows of a token sequence; the remainder is dropped."""
    n = ids.numel() // window
    return ids[: n * window].view(n, window)


def context_length(model: nn.Module, window: int | None) -> int:
    """The evaluation window: ``window``, or the model's context capped at 2,048 tokens; never beyond the context."""
    context = getattr(model.config, "max_position_embeddings", None) or 2048
    if window is None:
        return min(context, 2048)
    if not 2 <= window <= context:
        raise DsformerError(f"--window {window} must be in 2..{context} (the model's context)")
    return window


def eval_windows(tokenizer: Any, text: str, window: int, limit: int | None = None) -> torch.Tensor:
    """The evaluation windows; ``limit`` keeps the first ``limit`` of them (a stated prefix of the text)."""
    windows = cut_windows(tokenize(tokenizer, text), window)
    if len(windows) == 0:
        raise DataError(f"the text has fewer tokens than one window of {window}")
    return windows[:limit] if limit else windows


def calibration_batches(
    tokenizer: Any, text: str, samples: int, window: int, seed: int = 0, batch_size: int = 8
) -> list[dict[str, torch.Tensor]]:
    """``samples`` windows of ``window`` tokens at seeded random offsets of ``text``, in batches."""
    ids = tokenize(tokenizer, text)
    if ids.numel() <= window:
        raise DataError(f"the calibration text has {ids.numel()} tokens, fewer than one window of {window}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - window, (samples,), generator=generator)
    rows = torch.stack([ids[s : s + window] for s in starts.tolist()])
    return [{"input_ids": rows[i : i + batch_size]} for i in range(0, samples, batch_size)]


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = True) -> dict[str, Any]:
    """Perplexity of a causal LM over ``windows`` ``(n, window)``, with the protocol that produced it."""
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise DsformerError(f"a {type(model).__name__} has no language-model head; perplexity needs a causal LM")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    bar = tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress)
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum")
        total += float(nll)
        count += batch[:, 1:].numel()
        bar.update(len(batch))
        bar.set_postfix(ppl=f"{math.exp(total / count):.2f}")
    bar.close()
    model.train(was_training)
    return {
        "perplexity": math.exp(total / count),
        "nll": total / count,
        "tokens": count,
        "windows": len(windows),
        "window": windows.shape[1],
    }
