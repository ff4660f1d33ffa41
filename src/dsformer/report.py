"""The per-layer compression report: a table for people, JSON for tools.

Ratios are stated with what they count. ``ratio_params``: dense weight parameters over stored
values, over the factorized layers (the convention low rank uses, ``r (out + in)``);
``ratio_bytes``: the same with index bytes counted; ``ratio_model_bytes``: every tensor of the
model (embeddings included) before over after.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer, tied tensors counted once."""
    seen, total = set(), 0
    for tensor in model.state_dict().values():
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def format_table(head: tuple[str, ...], rows: list[tuple], left: int | None = None) -> str:
    """A fixed-width text table; the first ``left`` columns align left, the rest right (numbers)."""
    left = len(head) if left is None else left
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    line = "  ".join(f"{{:<{w}}}" if i < left else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join([line.format(*head), line.format(*("-" * w for w in widths))] + [line.format(*r) for r in rows])


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    structure: str
    layout: str
    params: int
    dense_params: int
    bytes: int
    dense_bytes: int
    rel_error: float
    # ||(W - Ŵ) X|| / ||W X|| on the calibration inputs, for data-aware fits
    output_error: float | None = None


@dataclass
class Report:
    layers: list[LayerReport]
    seconds: float
    model_bytes_before: int
    model_bytes_after: int
    # what a reader of the figures should know (a damped calibration, a layer's chosen ratio)
    notes: list[str] = field(default_factory=list)

    @property
    def ratio_params(self) -> float:
        return sum(r.dense_params for r in self.layers) / max(1, sum(r.params for r in self.layers))

    @property
    def ratio_bytes(self) -> float:
        return sum(r.dense_bytes for r in self.layers) / max(1, sum(r.bytes for r in self.layers))

    @property
    def ratio_model_bytes(self) -> float:
        return self.model_bytes_before / max(1, self.model_bytes_after)

    def totals(self) -> dict[str, float]:
        return {
            "ratio_params": self.ratio_params,
            "ratio_bytes": self.ratio_bytes,
            "ratio_model_bytes": self.ratio_model_bytes,
            "seconds": self.seconds,
            "layers": len(self.layers),
            "params": sum(r.params for r in self.layers),
            "dense_params": sum(r.dense_params for r in self.layers),
            "model_bytes_before": self.model_bytes_before,
            "model_bytes_after": self.model_bytes_after,
        }

    def to_json(self) -> dict[str, Any]:
        layers = [{**asdict(r), "shape": list(r.shape)} for r in self.layers]
        return {"layers": layers, "totals": self.totals(), "notes": self.notes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Report:
        layers = [LayerReport(**{**r, "shape": tuple(r["shape"])}) for r in data["layers"]]
        t = data["totals"]
        return cls(layers, t["seconds"], t["model_bytes_before"], t["model_bytes_after"], list(data.get("notes", [])))

    def table(self) -> str:
        """A fixed-width table: one row per layer, then the totals."""
        aware = any(r.output_error is not None for r in self.layers)
        head = ("layer", "shape", "structure", "layout", "ratio", "params", "bytes", "rel_error")
        head += ("output_error",) * aware
        rows = [
            (
                r.name,
                f"{r.shape[0]}x{r.shape[1]}",
                r.structure,
                r.layout,
                f"{r.dense_params / max(1, r.params):.2f}x",
                f"{r.params:,}",
                f"{r.bytes:,}",
                f"{r.rel_error:.4f}",
            )
            + (("-" if r.output_error is None else f"{r.output_error:.4f}"),) * aware
            for r in self.layers
        ]
        out = [format_table(head, rows, left=4)]
        mean_err = sum(r.rel_error for r in self.layers) / max(1, len(self.layers))
        out.append(
            f"{len(self.layers)} layers factorized in {self.seconds:.1f} s; mean relative error {mean_err:.4f}\n"
            f"compression over those layers: {self.ratio_params:.2f}x by parameters, "
            f"{self.ratio_bytes:.2f}x by bytes (indices included)\n"
            f"whole model (embeddings included): {self.model_bytes_before / 2**20:.1f} MiB -> "
            f"{self.model_bytes_after / 2**20:.1f} MiB, {self.ratio_model_bytes:.2f}x by bytes"
        )
        out += [f"note: {note}" for note in self.notes]
        return "\n".join(out)
