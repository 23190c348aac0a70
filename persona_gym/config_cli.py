"""Command-line options generated from a config dataclass, so a field is declared once.

Each field of the dataclass becomes ``--field-name`` with the field's type and default, and its
help is the field's entry in the class docstring's ``Attributes:`` section (as CleanRL's
``tyro.cli(Args)`` does). :func:`config_from_args` builds the config back from the namespace.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from typing import Any, TypeVar

__all__ = ["add_config_arguments", "config_from_args", "field_help"]

C = TypeVar("C")
_ENTRY = re.compile(r"^(\s+)([a-z_][a-z0-9_]*(?:, [a-z_][a-z0-9_]*)*):\s*(.*)$")


_ROLE = re.compile(r":(?:class|func|meth|mod|attr):`~?([^`]+)`")


def plain(text: str) -> str:
    """Docstring text as ``--help`` shows it: ````x```` -> x, :class:`~a.B` -> B, no bold marks."""
    text = _ROLE.sub(
        lambda m: m.group(1).rsplit(".", 1)[-1] if "~" in m.group(0) else m.group(1), text
    )
    return text.replace("``", "").replace("**", "")


def field_help(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Attributes:`` section of ``cls``'s docstring (an entry may
    name several fields, ``a, b: text``; continuation lines are joined)."""
    doc = inspect.getdoc(cls) or ""
    lines = doc.split("Attributes:", 1)[1].splitlines() if "Attributes:" in doc else []
    out: dict[str, str] = {}
    names: list[str] = []
    indent = None
    for line in lines:
        match = _ENTRY.match(line)
        if match and (indent is None or len(match.group(1)) == indent):
            indent = len(match.group(1))
            names = match.group(2).split(", ")
            for name in names:
                out[name] = match.group(3).strip()
        elif (
            line.strip()
            and names
            and indent is not None
            and len(line) - len(line.lstrip()) > indent
        ):
            for name in names:
                out[name] += " " + line.strip()
        elif line.strip():
            break  # the section ended
    return out


def add_config_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    skip: tuple[str, ...] = (),
    choices: dict[str, typing.Sequence[Any]] | None = None,
    defaults: dict[str, Any] | None = None,
    flags: dict[str, str] | None = None,
) -> None:
    """Add ``--name`` for each field of the dataclass ``cls`` not in ``skip``.

    ``choices`` restricts a field's values; ``defaults`` replaces a field's default on the
    command line (``None``: "not given", so a caller can tell); ``flags`` renames an option
    (``{"env_id": "--env"}``). Supported field types: ``int``,
    ``float``, ``str``, ``bool`` (``--name`` / ``--no-name``), their ``| None`` forms and
    ``tuple[int, ...]`` / ``tuple[str, ...]`` (several values).
    """
    hints = typing.get_type_hints(cls)
    helps = field_help(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = _default(f)
        if defaults and f.name in defaults:
            default = defaults[f.name]
        kind, optional = _unwrap(hints[f.name])
        option = (flags or {}).get(f.name, f"--{f.name.replace('_', '-')}")
        text = plain(helps.get(f.name, "")).replace("%", "%%")
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": default,
            "help": f"{text} (default: {default})" if text else None,
        }
        if choices and f.name in choices:
            kwargs["choices"] = list(choices[f.name])
        if kind is bool:
            parser.add_argument(option, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(kind) is tuple:
            item = typing.get_args(kind)[0]
            parser.add_argument(option, type=item, nargs="+", **kwargs)
        elif kind in (int, float, str):
            parser.add_argument(option, type=kind, **kwargs)
        else:
            raise TypeError(
                f"{cls.__name__}.{f.name}: no command-line form for {hints[f.name]} "
                f"(optional={optional}); pass it in skip"
            )


def config_from_args(cls: type[C], args: argparse.Namespace, **extra: Any) -> C:
    """The dataclass ``cls`` from the parsed options (tuples restored), with ``extra`` fields;
    options left at ``None`` fall back to the field's default."""
    values: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in extra or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value is None and f.default is not None:
            continue
        kind, _ = _unwrap(hints[f.name])
        values[f.name] = (
            tuple(value) if typing.get_origin(kind) is tuple and value is not None else value
        )
    return cls(**values, **extra)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """``(type, optional)`` of ``T`` or ``T | None``."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return hint, False
