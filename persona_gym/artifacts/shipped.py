"""Simulators by name: the shipped ones materialised into the cache, and what may ship."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

from persona_gym import registry
from persona_gym.artifacts.manifest import (
    MANIFEST,
    ArtifactsError,
    read_json,
    read_manifest,
    seal_manifest,
    verify_artifacts,
)
from persona_gym.artifacts.stages import file_lock
from persona_gym.artifacts.tables import tables_digest
from persona_gym.catalog import ItemCatalog
from persona_gym.io import atomic_write_json
from persona_gym.registry import SIMULATORS
from persona_gym.simulator.collaborative import CF_FILE, load_collaborative

log = logging.getLogger(__name__)


class MissingArtifactsError(ArtifactsError, FileNotFoundError):
    """No trained simulator where one was asked for (the message gives the command that builds it)."""


def missing_artifacts_message(where: Path, dataset: str = "ml-100k", named: bool = False) -> str:
    """One short line for a simulator asked for at ``where`` that has no manifest: what is
    missing and the one command that builds it (``named``: asked for through a simulator name of
    :data:`persona_gym.registry.SIMULATORS`, so the command writes to DIR and the package path,
    which the user never typed, is left out)."""
    if named:
        return (
            f"no trained {dataset} simulator: it does not ship with the package; build one with "
            f"`persona-gym build {dataset} --out DIR`, then pass artifacts='DIR'"
        )
    return (
        f"{where / MANIFEST} not found: no trained simulator there; build one with "
        f"`persona-gym build {dataset} --out {where}`"
    )


def resolve_artifacts(
    name_or_path: str | Path, cache: str | Path | None = None, dataset: str | None = None
) -> Path:
    """The artifacts directory of a simulator name (``"ml-100k"``) or a path;
    :class:`MissingArtifactsError` naming the commands (for ``dataset``) when it has no manifest.

    A shipped name is materialised once into the cache: the package's manifest, adapters and
    persona cards (verified against the manifest), plus the tables regenerated from the local
    dataset by the data distiller, recorded in the copy's manifest. Processes materialising the
    same copy take turns (a file lock); the later ones reuse the first one's copy.
    """
    name = str(name_or_path)
    named = name in SIMULATORS
    root = registry.simulator_dir(name) if named else Path(name_or_path).expanduser()
    if not (root / MANIFEST).is_file():
        raise MissingArtifactsError(
            missing_artifacts_message(root, dataset or (name if named else "ml-100k"), named)
        )
    if not named:
        return root
    from persona_gym.assets import cache_dir

    shipped = root
    manifest = read_manifest(shipped)
    verify_artifacts(shipped, manifest, tables=False)
    # keyed by the manifest's bytes: a package update with new adapters gets a fresh copy
    key = hashlib.sha256((shipped / MANIFEST).read_bytes()).hexdigest()[:12]
    target = cache_dir(cache) / "artifacts" / f"{SIMULATORS[name]}-{key}"
    if (target / MANIFEST).exists():
        return target
    with file_lock(target.parent / f".{target.name}.lock"):
        if (target / MANIFEST).exists():  # another process finished it while we waited
            return target
        log.info(
            "materialising the shipped %s simulator into %s (once; later loads reuse it)",
            name,
            target,
        )
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            shutil.copytree(shipped, tmp / "art", ignore=shutil.ignore_patterns(".*"))
            split_info = read_json(shipped / "split.json", "reinstall persona-gym")
            _regenerate_tables(tmp / "art", split_info)
            actual = tables_digest(tmp / "art")
            if actual != manifest.get("tables_sha256"):
                warnings.warn(
                    f"the regenerated {name} tables differ from those the shipped adapters were "
                    "trained on (another dataset copy or library version); ratings may deviate "
                    "from the published evaluation",
                    stacklevel=2,
                )
            seal_manifest(tmp / "art", {**manifest, "materialised_from": name})
            _make_readable(tmp / "art")
            if target.exists():  # an incomplete copy made before this lock existed
                shutil.rmtree(target)
            (tmp / "art").rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


SHIPPABLE = (
    "manifest.json",
    "personas.json",
    "split.json",
    "distill.json",
    "adapters",
    "evaluation",
)
CF_PARAMS = "collaborative.json"  # the collaborative model's tuned parameters (no data): materialising skips the tuning


def export_shippable(src: str | Path, dest: str | Path) -> Path:
    """Copy what may ship inside the package (no MovieLens-derived tables) from ``src`` to ``dest``.

    ``src`` is verified first; ``dest`` gets a manifest that records the hashes of the files it
    holds, and is replaced atomically. The manifest must carry ``tables_sha256``.
    """
    src, dest = Path(src), Path(dest)
    manifest = read_manifest(src)
    verify_artifacts(src, manifest)
    if "tables_sha256" not in manifest:
        raise ArtifactsError(f"{src / MANIFEST} has no tables_sha256; retrain with this version")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
    try:
        for name in SHIPPABLE:
            if (src / name).is_dir():  # per-rating tables (e.g. predictions) hold MovieLens ratings
                shutil.copytree(
                    src / name, tmp / name, ignore=shutil.ignore_patterns("*.parquet", ".*")
                )
            elif (src / name).exists():
                shutil.copy2(src / name, tmp / name)
        if (src / CF_FILE).exists():
            atomic_write_json(tmp / CF_PARAMS, load_collaborative(src / CF_FILE).params)
        seal_manifest(tmp, manifest)
        _make_readable(tmp)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _make_readable(root: Path) -> None:
    """Usual modes (dirs 755, files 644) for a tree built in a private temporary directory."""
    root.chmod(0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _regenerate_tables(root: Path, split_info: dict) -> None:
    """Re-run the deterministic data distiller for a shipped simulator's split."""
    from persona_gym.data.protocol import rebuild_split
    from persona_gym.distill import DataDistiller, write_artifacts
    from persona_gym.embeddings import DEFAULT_EMBEDDER, Embedder, embed_items

    dataset, split = rebuild_split(split_info)
    catalog = ItemCatalog.from_frames(dataset.items, split.item_stats())
    result = DataDistiller().distill(dataset, split, catalog)
    embeddings = embed_items(catalog, Embedder(DEFAULT_EMBEDDER))
    info = (
        json.loads((root / "distill.json").read_text()) if (root / "distill.json").exists() else {}
    )
    cf_params = json.loads((root / CF_PARAMS).read_text()) if (root / CF_PARAMS).exists() else None
    write_artifacts(root, dataset, split, catalog, result, embeddings, info, cf_params)
