"""Backends by name: `@register_backend("x")` on a KVTransferAgent subclass, `create_agent("x", ...)` to build one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from kvtransfer.base import KVTransferAgent

A = TypeVar("A", bound=type[KVTransferAgent])

_BACKENDS: dict[str, type[KVTransferAgent]] = {}


def register_backend(name: str) -> Callable[[A], A]:
    def deco(cls: A) -> A:
        if name in _BACKENDS and _BACKENDS[name] is not cls:
            raise ValueError(f"KV transfer backend {name!r} is already registered by {_BACKENDS[name].__name__}")
        cls.backend = name
        _BACKENDS[name] = cls
        return cls

    return deco


def known_backends() -> list[str]:
    """Every registered backend, usable here or not."""
    return sorted(_BACKENDS)


def available_backends() -> list[str]:
    """Registered backends whose libraries are installed here."""
    return [name for name in sorted(_BACKENDS) if _BACKENDS[name].is_available()]


def create_agent(backend: str, name: str, kv_cache: torch.Tensor, **options: Any) -> KVTransferAgent:
    """Build the agent of `backend`; unknown options raise TypeError, an unknown backend ValueError."""
    cls = _BACKENDS.get(backend)
    if cls is None:
        raise ValueError(f"unknown KV transfer backend {backend!r}; known backends: {', '.join(known_backends())}")
    return cls(name, kv_cache, **options)
