"""Stages never mix their results with an earlier run's: prepared or swapped-in directories."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from persona_gym.artifacts.manifest import MANIFEST, STAGE_PRODUCTS, read_manifest, verify_artifacts
from persona_gym.errors import StageError

log = logging.getLogger(__name__)


# -- stages --------------------------------------------------------------------------------------
def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _remove_leftovers(root: Path) -> None:
    """Delete what killed writes leave behind: hidden ``*.tmp`` files (``persona_gym.io``) and
    hidden partial folders (``.tmp-*``, ``adapters/.<name>-*``)."""
    for folder in (root, root / "adapters", root / "embeddings"):
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            if child.name.startswith(".") and (child.name.endswith(".tmp") or child.is_dir()):
                log.info("removing %s (left by a killed run)", child)
                _remove(child)


def prepare_stage(
    root: str | Path, stage: str, force: bool = False, same_run: bool = False
) -> None:
    """Get ``root`` ready for ``stage`` (``"personas"``, ``"train"`` or ``"evaluate"``) to write.

    When the stage's results already exist it refuses (:class:`StageError`), unless
    ``same_run`` (the caller resumes or extends a run with the same settings; its files are
    verified first, so nothing changed since is built upon) or ``force``, which deletes the
    stage's results and everything later first. Leftovers of killed writes are removed.
    """
    root = Path(root)
    names = list(STAGE_PRODUCTS)
    later = [p for s in names[names.index(stage) :] for p in STAGE_PRODUCTS[s]]
    own = STAGE_PRODUCTS[stage]
    marker = MANIFEST if stage == "train" else own[0]
    if (root / marker).exists() and not force:
        if not same_run:
            option = {
                "personas": f"persona-gym personas --artifacts {root} --force",
                "train": f"persona-gym train --artifacts {root} --force",
            }.get(stage, "--force")
            raise StageError(
                f"{root / marker} exists: {root} already holds {stage} results; re-running "
                f"{stage} would mix runs. Replace them (and everything built on them) with "
                f"`{option}`, or write a copy of the directory"
            )
        if stage == "train":
            verify_artifacts(root, read_manifest(root))
    if force:
        for product in later:
            if (root / product).exists():
                log.info("%s --force: removing %s", stage, root / product)
                _remove(root / product)
    if root.is_dir():
        _remove_leftovers(root)


def _looks_like_artifacts(folder: Path) -> bool:
    return any((folder / name).exists() for name in (MANIFEST, "split.json", "profiles.jsonl"))


@contextlib.contextmanager
def staged_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """A fresh directory to build ``out`` in, swapped in whole when the block succeeds.

    Refuses (:class:`StageError`) when ``out`` exists and is not empty, unless ``force`` and it
    is an artifacts directory (then it is replaced: later stages' results go with it). The
    build happens in ``.<name>.partial`` next to ``out``, by one writer at a time (a lock: a
    second one waits, then finds ``out`` built). A failed build leaves ``out`` as it was and
    removes its partial files; a killed one leaves the partial folder, which the next build
    clears. Both keep an LLM distiller's ``llm_cache`` so it resumes.
    """
    out = Path(out).expanduser().resolve()
    with file_lock(out.parent / f".{out.name}.partial.lock"):
        if out.exists() and not out.is_dir():
            raise StageError(f"{out} is a file, not a directory; choose another --out")
        if out.is_dir() and any(out.iterdir()):
            if not _looks_like_artifacts(out):
                raise StageError(
                    f"{out} is a non-empty directory that is not an artifacts directory; "
                    "choose a new or empty --out"
                )
            if not force:
                raise StageError(
                    f"{out} already holds artifacts; distilling into it would mix runs. Replace "
                    "it (and the personas and adapters built on it) with --force, or choose a "
                    "new --out"
                )
        staging = out.parent / f".{out.name}.partial"
        staging.mkdir(parents=True, exist_ok=True)
        _clear(staging)
        if (out / "llm_cache").is_dir() and not (staging / "llm_cache").exists():
            shutil.copytree(out / "llm_cache", staging / "llm_cache")
        try:
            yield staging
        except BaseException:
            with contextlib.suppress(OSError):  # a failed build leaves no partial results
                _clear(staging)
                if not any(staging.iterdir()):
                    staging.rmdir()
            raise
        old = out.parent / f".{out.name}.old"
        if old.exists():
            _remove(old)
        if out.exists():
            out.rename(old)
        staging.rename(out)
        if old.exists():
            _remove(old)


def _clear(staging: Path) -> None:
    """Empty a staging folder but for the LLM distiller's resumable ``llm_cache``."""
    for child in staging.iterdir():
        if child.name != "llm_cache":
            _remove(child)


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], object] | None = None) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``, held for the block; a second holder (another process
    or thread) waits, after calling ``on_wait`` (default: an INFO log line). The holder removes
    the file when it is done (a waiter then locks a fresh one), so no lock file stays behind. A
    no-op where ``fcntl`` is missing. Not re-entrant: one lock file per purpose."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    waited = False
    while True:
        handle = open(path, "a")  # held until the block ends
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not waited:
                    waited = True
                    if on_wait is None:
                        log.info("waiting for another process to finish %s", path.with_suffix(""))
                    else:
                        on_wait()
                fcntl.flock(handle, fcntl.LOCK_EX)
            held = os.fstat(handle.fileno())
            with contextlib.suppress(FileNotFoundError):
                current = os.stat(path)
                if (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                    break  # locked the file that is still at ``path``
        except BaseException:
            handle.close()
            raise
        handle.close()  # the previous holder removed that file: lock the one there now
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # while still holding it
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()
