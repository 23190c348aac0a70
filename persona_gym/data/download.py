"""Download MovieLens archives from grouplens.org, verify their MD5, extract them atomically.

Only the standard library is used (``urllib``). Machines without internet access use the
bundled ML-100k copy or a user-given folder instead (see :mod:`persona_gym.data.movielens`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["KNOWN_DATASETS", "ChecksumError", "RemoteDataset", "default_data_dir", "fetch"]

DATA_DIR_ENV = "PERSONA_GYM_DATA_DIR"


@dataclass(frozen=True)
class RemoteDataset:
    """Where a dataset archive lives and its published MD5."""

    url: str
    md5: str


KNOWN_DATASETS: dict[str, RemoteDataset] = {
    "ml-1m": RemoteDataset(
        "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        "c4d9eecfca2ab87c1945afe126590906",
    ),
    "ml-100k": RemoteDataset(
        "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        "0e33842e24a9c977be4e0107933c0723",
    ),
}


class ChecksumError(ValueError):
    """A downloaded archive's MD5 differs from the expected one."""


def default_data_dir() -> Path:
    """``$PERSONA_GYM_DATA_DIR`` if set, else the per-user data folder (``.../persona-gym/data``)."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs

        return Path(platformdirs.user_data_dir("persona-gym")) / "data"
    except ImportError:  # pragma: no cover - platformdirs is a dependency
        return Path.home() / ".local" / "share" / "persona-gym" / "data"


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, timeout: float) -> None:
    logger.info("downloading %s", url)
    req = urllib.request.Request(url, headers={"User-Agent": "persona-gym"})
    with urllib.request.urlopen(req, timeout=timeout) as resp, dest.open("wb") as out:
        shutil.copyfileobj(resp, out, length=1 << 20)


def _safe_extract(archive: Path, into: Path) -> None:
    """Extract a zip, refusing members that would land outside ``into``."""
    root = into.resolve()
    with zipfile.ZipFile(archive) as zf:
        for member in zf.namelist():
            target = (into / member).resolve()
            if target != root and root not in target.parents:
                raise ValueError(f"{archive}: member {member!r} would extract outside {into}")
        zf.extractall(into)


def fetch(
    name: str,
    dest_dir: str | Path,
    url: str | None = None,
    md5: str | None = None,
    *,
    force: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Download dataset ``name`` into ``dest_dir/name`` and return that folder.

    ``url`` and ``md5`` default to the published ones for ``"ml-1m"`` / ``"ml-100k"``; for
    other names both must be given. The archive's MD5 is checked before anything is extracted
    (:class:`ChecksumError` on mismatch); extraction goes to a temporary folder inside
    ``dest_dir`` that is renamed into place, so ``dest_dir/name`` is either complete or absent.
    An existing ``dest_dir/name`` is returned as is unless ``force``.
    """
    known = KNOWN_DATASETS.get(name)
    url = url or (known.url if known else None)
    md5 = md5 or (known.md5 if known else None)
    if url is None or md5 is None:
        raise ValueError(
            f"unknown dataset {name!r}: known are {sorted(KNOWN_DATASETS)}; for "
            "another one pass both url= and md5="
        )
    dest_dir = Path(dest_dir).expanduser()
    final = dest_dir / name
    if final.exists() and not force:
        logger.info("%s already exists; not downloading (force=True to replace)", final)
        return final
    dest_dir.mkdir(parents=True, exist_ok=True)

    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest_dir))
    try:
        archive = tmp / "archive.zip"
        try:
            _download(url, archive, timeout)
        except OSError as e:
            raise OSError(
                f"could not download {url}: {e}. Check the network, or download the "
                f"archive yourself and extract it into {final}."
            ) from e
        got = _md5(archive)
        if got != md5.lower():
            raise ChecksumError(
                f"checksum mismatch for {url}: MD5 is {got}, expected {md5}. The download is "
                "corrupt or the file changed upstream; retry, or verify the archive by hand."
            )
        extracted = tmp / "extracted"
        try:
            _safe_extract(archive, extracted)
        except zipfile.BadZipFile as e:
            raise ValueError(f"{url}: not a valid zip archive ({e})") from e
        # grouplens archives hold one top folder (ml-1m/); accept files at the root too.
        entries = [p for p in extracted.iterdir() if not p.name.startswith("__MACOSX")]
        source = entries[0] if len(entries) == 1 and entries[0].is_dir() else extracted
        if force and final.exists():
            shutil.rmtree(final)
        os.replace(source, final)
        logger.info("extracted %s into %s", name, final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
