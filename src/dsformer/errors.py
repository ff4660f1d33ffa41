"""Exceptions raised by dsformer. Each message says what was wrong, what was expected and the fix."""

from __future__ import annotations


class DsformerError(Exception):
    """Base class of every error dsformer raises on bad input; the CLI prints it and exits 2."""


class InfeasibleRatioError(DsformerError, ValueError):
    """A compression ratio that no layout of the requested structure reaches for a layer shape."""


class TargetError(DsformerError, KeyError):
    """Target module names or patterns that match nothing, or match modules that cannot be compressed."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataError(DsformerError, ValueError):
    """Task data that cannot be read: a missing file, a malformed row, an unknown label, an empty split."""


class CheckpointError(DsformerError, OSError):
    """A saved folder that is missing, corrupt, truncated or does not match its model."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM: the CLI exits with 130 or 143 and prints ``hint``."""

    def __init__(self, signum: int = 2, hint: str | None = None) -> None:
        super().__init__()
        self.signum = signum
        if hint is not None:
            self.hint = hint
