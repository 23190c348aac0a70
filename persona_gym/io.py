"""Atomic writes: every artifact is written to a temporary file and renamed into place,
so a killed job never leaves a half-written file behind; a full disk is one error naming the
file (:class:`DiskFullError`)."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from persona_gym.errors import PersonaGymError


class DiskFullError(PersonaGymError, OSError):
    """No space left on the device while writing; the message names the path and the fix."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "no space left on the device"


def disk_full(path: str | os.PathLike, then: str = "run the command again") -> DiskFullError:
    """The :class:`DiskFullError` for a write to ``path`` (``errno`` ENOSPC, ``filename`` set)."""
    error = DiskFullError(
        f"no space left on the device while writing {path}: free some space there (or write "
        f"to another folder), then {then}"
    )
    error.errno, error.strerror, error.filename = errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)
    return error


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is the OS's "no space left on the device" (ENOSPC, or EDQUOT: a quota)."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` to ``path`` (same directory).

    Whatever fails, the temporary file is removed; a full disk raises :class:`DiskFullError`
    naming ``path``.
    """
    path = Path(path)
    tmp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp_path = Path(tmp)
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp_path, path)
    except OSError as error:
        if is_disk_full(error) and not isinstance(error, DiskFullError):
            raise disk_full(path) from error
        raise
    finally:
        if tmp_path is not None and tmp_path.exists():
            tmp_path.unlink()
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write JSON (indented, keys in insertion order) atomically."""
    return atomic_write_text(path, json.dumps(data, indent=2, default=json_default) + "\n")


def atomic_write_parquet(path: str | os.PathLike, frame) -> Path:
    """Write a pandas DataFrame as parquet atomically."""
    return atomic_write(path, lambda tmp: frame.to_parquet(tmp, index=False))


def json_default(value: Any) -> Any:
    """``json.dumps``'s ``default``: numpy scalars and arrays as numbers and lists, paths as
    strings; ``TypeError`` for anything else."""
    import numpy as np

    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")
