"""The registry of weight structures: a structure's name to its config class.

Example:
    >>> from dsformer.structures import registry
    >>> registry.names()
    ('ds', 'svd', 'nm')
    >>> registry.structure_config("svd", ratio=2.8).layer.__name__
    'LowRankLinear'
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any

from dsformer.errors import DsformerError
from dsformer.structures.base import Structure

_STRUCTURES: dict[str, type[Structure]] = {}


def register(config_class: type[Structure]) -> type[Structure]:
    """Class decorator: make a structure config known by its ``name`` (checkpoints record it)."""
    if config_class.name in _STRUCTURES and _STRUCTURES[config_class.name] is not config_class:
        raise ValueError(f"structure {config_class.name!r} is registered already")
    _STRUCTURES[config_class.name] = config_class
    return config_class


def names() -> tuple[str, ...]:
    return tuple(_STRUCTURES)


def get(name: str) -> type[Structure]:
    if name not in _STRUCTURES:
        raise DsformerError(f"unknown structure {name!r}; choose one of {', '.join(_STRUCTURES)}")
    return _STRUCTURES[name]


def structure_config(name: str, **options: Any) -> Structure:
    """Build the config of a structure by name, e.g. ``structure_config("ds", ratio=2.8)``."""
    config_class = get(name)
    hints = typing.get_type_hints(config_class)
    known = [f.name for f in dataclasses.fields(config_class)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise DsformerError(f"structure {name} has no option {', '.join(unknown)}; its options are {', '.join(known)}")
    for key, value in options.items():
        if not _fits(value, hints[key]):
            raise DsformerError(f"structure {name}: option {key} must be {_describe(hints[key])} (got {value!r})")
    return config_class(**options)


def _kinds(hint: Any) -> tuple:
    """The plain types a field's annotation allows (``int | None`` -> ``(int, NoneType)``)."""
    return typing.get_args(hint) if typing.get_args(hint) else (hint,)


def _fits(value: Any, hint: Any) -> bool:
    kinds = _kinds(hint)
    if isinstance(value, bool):  # a bool is an int to Python, not to a config
        return bool in kinds
    return any(isinstance(value, kind) or (kind is float and isinstance(value, int)) for kind in kinds)


def _describe(hint: Any) -> str:
    return " or ".join("none" if kind is type(None) else kind.__name__ for kind in _kinds(hint))


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """Structure options written ``KEY=VALUE`` (``k=128``, ``share_basis=true``): JSON values, else strings."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise DsformerError(f"option {pair!r}: give KEY=VALUE, e.g. k=128")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options
