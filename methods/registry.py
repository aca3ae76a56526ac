"""The method registry: `wsolbench train --method NAME` finds a method here, never in an if-chain."""
from __future__ import annotations

from typing import TypeVar

from wsolbench.errors import WsolbenchError

_METHODS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register_method(cls: T) -> T:
    """Class decorator: register a WSOLMethod subclass under its `name`."""
    if not cls.name or cls.name in _METHODS:
        raise ValueError(f"method name {cls.name!r} is empty or registered twice")
    _METHODS[cls.name] = cls
    return cls


def available_methods() -> tuple[str, ...]:
    return tuple(sorted(_METHODS))


def method_class(name: str) -> type:
    if name not in _METHODS:
        raise WsolbenchError(f"unknown method {name!r}; available: {', '.join(available_methods())}")
    return _METHODS[name]
