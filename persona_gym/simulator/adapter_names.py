"""How adapters are named, and which adapter rates a user under a variant.

Training writes ``adapters/<name>/`` folders, the manifest lists them by name, and the rating
model loads them under the same names (peft's ``adapter_name``):

* ``persona-<k>``: persona ``k``'s adapter (variant ``"persona"``: each user gets theirs);
* ``user-<id>``: one user's own adapter (variant ``"user"``);
* ``single-max`` / ``single-min``, or any other name: one adapter for every user (the variant
  is the name);
* ``base``: no adapter, the plain base model (reserved).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

__all__ = [
    "BASE",
    "adapter_of",
    "persona_adapter",
    "persona_of",
    "user_adapter",
    "variant_adapters",
]

BASE = "base"
_PERSONA = "persona-"
_USER = "user-"
T = TypeVar("T")


def persona_adapter(persona: int) -> str:
    """``persona-<k>``."""
    return f"{_PERSONA}{int(persona)}"


def persona_of(adapter: str) -> int | None:
    """The persona of a ``persona-<k>`` adapter name, None for any other name."""
    if adapter.startswith(_PERSONA) and adapter[len(_PERSONA) :].isdigit():
        return int(adapter[len(_PERSONA) :])
    return None


def user_adapter(user_id: int) -> str:
    """``user-<id>``."""
    return f"{_USER}{int(user_id)}"


def adapter_of(variant: str, user_id: int, user_persona: Mapping[int, int]) -> str:
    """The adapter that rates ``user_id`` under ``variant`` (``KeyError`` for a user without a
    persona under ``"persona"``)."""
    if variant == "persona":
        return persona_adapter(user_persona[int(user_id)])
    if variant == "user":
        return user_adapter(user_id)
    return variant


def variant_adapters(variant: str, available: Mapping[str, T]) -> dict[str, T]:
    """Of the ``available`` adapters (name -> anything), those a variant needs loaded."""
    if variant == "persona":
        return {n: v for n, v in available.items() if n.startswith(_PERSONA)}
    if variant == "user":
        return {n: v for n, v in available.items() if n.startswith(_USER)}
    if variant == BASE:
        return {}
    if variant not in available:
        raise ValueError(f"variant {variant!r}: the artifacts have adapters {sorted(available)}")
    return {variant: available[variant]}
