"""The artifacts directory: everything a simulator needs, described by ``manifest.json``.

Layout (written by ``persona-gym distill``, ``personas`` and ``train``)::

    items.parquet          catalogue with training-only averages (ItemCatalog.to_frame)
    profiles.jsonl         Ms per user
    memories.parquet       Ml per training interaction
    split.json             the protocol split's parameters and user ids
    embeddings/items.npy   catalogue item embeddings (retrieval)
    collaborative.npz      matrix factorisation fitted on train + background (prompt cues)
    personas.json          K, user → persona, persona cards
    adapters/<name>/       one peft adapter folder per adapter (save_pretrained)
    manifest.json          schema version, base model and its file hash, dataset, protocol,
                           seeds, personas, adapters, prompt and training config, metrics,
                           library versions, the SHA-256 of every file above (``files``) and
                           of the manifest itself (``manifest_sha256``)

The directory is one unit. ``load_artifacts`` checks the manifest (schema, seal, adapter paths
inside the directory) and the content hash of every file it will read, and fails with one line
naming the file and the command that rewrites it. Hashes are computed once per file version and
remembered in the user cache (keyed by path, size and modification times), so a load re-reads a
file only after it changed. Not part of the unit, never hashed: ``checkpoints/``, ``cache/``,
``llm_cache/``, ``evaluation/`` and hidden entries (a killed stage's ``.*.tmp`` files and partial
folders: ignored by every loader, removed by the next stage that writes the directory).

A stage never mixes its results with an earlier run's: ``distill`` builds a new directory and
swaps it in whole (:func:`staged_dir`); ``personas`` and ``train`` refuse to overwrite earlier
results unless forced, and then delete everything downstream first (:func:`prepare_stage`).
``persona-gym artifacts verify DIR`` checks a directory; ``persona-gym artifacts rehash DIR``
records the current files after a deliberate change (:func:`rehash`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd

from persona_gym import adapter_names
from persona_gym.catalog import ItemCatalog
from persona_gym.collaborative import CF_FILE, CollaborativeModel, load_collaborative
from persona_gym.errors import PersonaGymError, StageError
from persona_gym.io import _json_default, atomic_write_json
from persona_gym.prompt_config import PromptConfig
from persona_gym.registry import SHIPPED_DIR, SIMULATORS

log = logging.getLogger(__name__)

# 2: the manifest records the hash of every file (``files``) and of itself (``manifest_sha256``)
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
SEAL = "manifest_sha256"
# Artifacts shipped inside the package: adapters, manifest and persona cards only. The tables
# (profiles, memories, items) reproduce MovieLens content, which may not be redistributed, so
# they are regenerated on first use by the deterministic data distiller from the local dataset.
TABLES = ("items.parquet", "profiles.jsonl", "memories.parquet", "embeddings/items.npy", CF_FILE)
# What each stage writes, in pipeline order; a forced re-run deletes its own and later products.
STAGE_PRODUCTS = {
    "distill": (*TABLES, "split.json", "distill.json", "llm_cache"),
    "personas": ("personas.json", "personas.png", "embeddings/profiles.npy"),
    "train": (MANIFEST, "adapters", "checkpoints", "cache"),
    "evaluate": ("evaluation",),
}
# Folders that hold intermediate or derived results, not the simulator: never hashed.
UNHASHED = ("checkpoints", "cache", "llm_cache", "evaluation")
_HASH_CACHE = "file-hashes.json"
_HASH_CACHE_MAX = 20_000  # entries kept in the user-cache record of file hashes


class ArtifactsError(PersonaGymError, ValueError):
    """An artifacts directory is missing, corrupted or does not match what is asked."""


@dataclass
class Artifacts:
    """A loaded artifacts directory (everything but the models)."""

    root: Path
    manifest: dict
    catalog: ItemCatalog
    profiles: dict[int, str]
    memories: pd.DataFrame
    item_embeddings: np.ndarray
    user_persona: dict[int, int]
    collaborative: CollaborativeModel | None = None  # None for artifacts distilled before it existed

    @property
    def user_ids(self) -> list[int]:
        return sorted(self.profiles)

    @property
    def prompt_config(self) -> PromptConfig:
        return PromptConfig(**{"crowd_cue": False, **self.manifest["prompt"]})  # older manifests lack it

    @property
    def adapter_dirs(self) -> dict[str, Path]:
        return {name: self.root / rel for name, rel in self.manifest["adapters"].items()}

    def item_token_features(self, prompt: PromptConfig) -> np.ndarray:
        """What a soft item token is projected from: the text embedding, with ``cf_items`` followed
        by the item's collaborative factors and bias."""
        if not prompt.cf_items:
            return self.item_embeddings
        return np.c_[self.item_embeddings, self.require_collaborative().item_features()]

    def require_collaborative(self) -> CollaborativeModel:
        if self.collaborative is None:
            raise ArtifactsError(f"{self.root / CF_FILE} not found: the prompt uses collaborative "
                                 f"cues; re-run `persona-gym distill --out {self.root} --force` with this version")
        return self.collaborative

    def adapter_of(self, user_id: int, variant: str = "persona") -> str:
        """The adapter that simulates ``user_id`` under a variant (persona / single-max / ...)."""
        return adapter_names.adapter_of(variant, user_id, self.user_persona)

    def require_variant(self, variant: str) -> None:
        """Fail now, naming the users and the fix, when some user has no adapter under ``variant``
        (so an environment fails at creation, not at the first step of that user)."""
        if variant not in ("persona", "user"):
            return  # one adapter for everyone: the simulator checks that it exists
        users = self.user_ids
        if variant == "persona":
            lost = [u for u in users if u not in self.user_persona]
            if lost:
                raise ArtifactsError(
                    f"{self.root / 'personas.json'} assigns no persona to {len(lost)} of the "
                    f"{len(users)} users of profiles.jsonl (e.g. {lost[:5]}): the files come from "
                    f"different runs; re-run `persona-gym personas --artifacts {self.root} --force` "
                    f"and `persona-gym train --artifacts {self.root} --force`")
        lost = [u for u in users if self.adapter_of(u, variant) not in self.manifest["adapters"]]
        if lost:
            missing = sorted({self.adapter_of(u, variant) for u in lost})
            variants = "persona" if variant == "persona" else "user"
            raise ArtifactsError(
                f"{self.root / MANIFEST} has no adapter {missing[:3]} for {len(lost)} of the "
                f"{len(users)} users (e.g. {lost[:5]}) under variant={variant!r}; train them with "
                f"`persona-gym train --artifacts {self.root} --variants {variants}`")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape results (for manifests)."""
    import importlib.metadata as md

    versions = {"python": platform.python_version()}
    for name in ("persona-gym", "torch", "transformers", "peft", "sentence-transformers", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


# -- file hashes ---------------------------------------------------------------------------------
def artifact_files(root: str | Path) -> list[str]:
    """The files that make up the simulator in ``root``, as sorted POSIX paths relative to it:
    every regular file except ``manifest.json``, the :data:`UNHASHED` folders and hidden
    entries (leftovers of killed writes, locks)."""
    root = Path(root)
    found = []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and not (rel == Path(".") and d in UNHASHED))
        for name in files:
            if name.startswith(".") or name.endswith(".tmp") or (rel == Path(".") and name == MANIFEST):
                continue
            found.append((rel / name).as_posix())
    return sorted(found)


def hash_files(paths: list[Path]) -> dict[Path, str]:
    """SHA-256 of each file, computed once per file version.

    Digests are remembered in the user cache (``file-hashes.json``) keyed by the resolved path,
    size, inode and modification/change times; an unchanged file is not read again.
    """
    from persona_gym.assets import cache_dir, file_sha256

    try:
        store_path = cache_dir() / _HASH_CACHE
        store = json.loads(store_path.read_text()) if store_path.exists() else {}
    except (OSError, ValueError):  # unreadable or corrupted record: recompute everything
        store_path, store = None, {}
    if not isinstance(store, dict):
        store = {}
    digests, changed = {}, False
    for path in paths:
        stat = path.stat()
        stamp = [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]
        key = str(path.resolve())
        entry = store.get(key)
        if isinstance(entry, list) and len(entry) == 2 and entry[0] == stamp:
            digests[path] = entry[1]
            continue
        digests[path] = file_sha256(path)
        store[key] = [stamp, digests[path]]
        changed = True
    if changed and store_path is not None:
        if len(store) > _HASH_CACHE_MAX:  # forget files that no longer exist
            store = {k: v for k, v in store.items() if Path(k).exists()}
        with contextlib.suppress(OSError):  # a read-only cache only costs speed
            atomic_write_json(store_path, store)
    return digests


def file_hashes(root: str | Path) -> dict[str, str]:
    """``{relative path: sha256}`` of :func:`artifact_files` (what the manifest records)."""
    root = Path(root)
    names = artifact_files(root)
    digests = hash_files([root / name for name in names])
    return {name: digests[root / name] for name in names}


def _seal(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != SEAL}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def seal_manifest(root: str | Path, manifest: dict) -> dict:
    """Record the current files of ``root`` in ``manifest``, seal it and write it atomically.

    The schema version becomes the current one; everything else is kept as given.
    """
    root = Path(root)
    body = {k: v for k, v in manifest.items() if k not in (SEAL, "files")}
    body = json.loads(json.dumps({**body, "schema_version": SCHEMA_VERSION,
                                  "files": file_hashes(root)}, default=_json_default))
    body[SEAL] = _seal(body)
    atomic_write_json(root / MANIFEST, body)
    return body


def write_manifest(root: str | Path, manifest: dict) -> dict:
    """Write ``manifest.json`` atomically, stamped with the schema and library versions and the
    hash of every artifact file (:func:`seal_manifest`); return it."""
    return seal_manifest(root, {"schema_version": SCHEMA_VERSION, **manifest,
                                "versions": library_versions()})


def rehash(root: str | Path) -> dict:
    """Record the current files of an artifacts directory in its manifest and re-seal it.

    For a deliberate change (an edited profile, a hand-tuned manifest field, a manifest written
    by an older persona-gym): ``persona-gym artifacts rehash DIR``. The manifest must still be
    valid JSON with the required fields.
    """
    root = Path(root)
    if not (root / MANIFEST).exists():
        raise ArtifactsError(f"{root / MANIFEST} not found: there is nothing to rehash; "
                             f"train a simulator with `persona-gym train --artifacts {root}`")
    manifest = _read_json(root / MANIFEST, f"re-run `persona-gym train --artifacts {root}`")
    _check_structure(root, manifest, root / MANIFEST)
    return seal_manifest(root, manifest)


# -- reading and verifying -------------------------------------------------------------------------
def _read_json(path: Path, fix: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ArtifactsError(f"{path} is not valid JSON (line {err.lineno}): {err.msg}; {fix}") from err
    except UnicodeDecodeError as err:
        raise ArtifactsError(f"{path} is not UTF-8 text; {fix}") from err


def _inside(root: Path, rel: object, where: str) -> Path:
    """``root / rel`` for a relative path that stays inside ``root``; else ``ArtifactsError``."""
    if not isinstance(rel, str) or not rel:
        raise ArtifactsError(f"{where}: path {rel!r} is not a relative path inside {root}")
    if (PurePosixPath(rel).is_absolute() or PureWindowsPath(rel).is_absolute() or PureWindowsPath(rel).drive
            or ".." in PurePosixPath(rel.replace("\\", "/")).parts):
        raise ArtifactsError(f"{where}: path {rel!r} leaves the artifacts directory {root} "
                             "(absolute paths and '..' are refused); re-run `persona-gym train`")
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()):
        raise ArtifactsError(f"{where}: path {rel!r} resolves to {path.resolve()}, outside "
                             f"{root} (a symbolic link?); copy the files into the directory")
    return path


def _check_structure(root: Path, manifest: object, path: Path) -> None:
    """Required fields, base model identity and adapter paths of a manifest (no file reads)."""
    if not isinstance(manifest, dict):
        raise ArtifactsError(f"{path}: expected a JSON object, got {type(manifest).__name__}; "
                             "re-run `persona-gym train` to rewrite it")
    for field in ("base_model", "adapters", "prompt", "dataset"):
        if field not in manifest:
            raise ArtifactsError(f"{path}: required field {field!r} is missing; retrain to rewrite it")
    base = manifest["base_model"]
    if not isinstance(base, dict) or "sha256" not in base:
        raise ArtifactsError(f"{path}: base_model.sha256 is missing, so the adapters cannot be "
                             "matched to their base model; re-run `persona-gym train` to record it")
    if not (base["sha256"] is None or (isinstance(base["sha256"], str) and len(base["sha256"]) == 64)):
        raise ArtifactsError(f"{path}: base_model.sha256 {base['sha256']!r} is not a SHA-256; "
                             "re-run `persona-gym train` to record it")
    if not isinstance(manifest["adapters"], dict) or not isinstance(manifest["prompt"], dict):
        raise ArtifactsError(f"{path}: 'adapters' and 'prompt' must be JSON objects; retrain to rewrite it")
    for name, rel in manifest["adapters"].items():
        _inside(root, rel, f"{path}: adapter {name!r}")


def read_manifest(root: str | Path) -> dict:
    """Read and validate ``manifest.json``: schema version, seal, required fields, base model
    hash, adapter folders inside ``root`` and present. File contents: :func:`verify_artifacts`."""
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        raise ArtifactsError(
            f"{path} not found: train a simulator with `persona-gym train --artifacts {root}` "
            "(after `persona-gym distill` and `persona-gym personas`)"
        )
    manifest = _read_json(path, "re-run `persona-gym train` to rewrite it")
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION:
        raise ArtifactsError(
            f"{path}: schema_version {version!r} is not supported by this persona-gym "
            f"(supports {SCHEMA_VERSION}); upgrade persona-gym or retrain"
        )
    if version < 1:
        raise ArtifactsError(f"{path}: schema_version {version} is not a persona-gym manifest "
                             f"(this version writes {SCHEMA_VERSION}); re-run `persona-gym train`")
    if version < SCHEMA_VERSION:
        raise ArtifactsError(
            f"{path}: schema_version {version} predates file hashes, so its files cannot be "
            f"verified; record them with `persona-gym artifacts rehash {root}` (if the files are "
            f"the ones you trained) or re-run `persona-gym train --artifacts {root} --force`")
    if manifest.get(SEAL) != _seal(manifest):
        raise ArtifactsError(
            f"{path} was changed after it was written (its {SEAL} does not match); "
            f"{_fix(root, MANIFEST, manifest)}")
    _check_structure(root, manifest, path)
    for name, rel in manifest["adapters"].items():
        folder = root / rel
        for needed in ("adapter_config.json", "adapter_model.safetensors"):
            if not (folder / needed).exists():
                raise ArtifactsError(
                    f"{path}: adapter {name!r} lacks {folder / needed}; retrain it with "
                    f"`persona-gym train --artifacts {root}`"
                )
    return manifest


def _stage_of(rel: str) -> str:
    for stage, products in STAGE_PRODUCTS.items():
        if any(rel == p or rel.startswith(p + "/") for p in products):
            return stage
    return "train"


def _fix(root: Path, rel: str, manifest: dict) -> str:
    """The command that rewrites ``rel`` of ``root`` (or what to do for the shipped simulator)."""
    if manifest.get("materialised_from"):
        return (f"delete {root} (the cached copy of the shipped {manifest['materialised_from']} "
                "simulator; it is rebuilt on next use)")
    if root.resolve().is_relative_to(SHIPPED_DIR.resolve()):
        return "reinstall persona-gym (the shipped simulator's files were changed)"
    stage = _stage_of(rel)
    commands = {
        "distill": f"re-run `persona-gym distill --out {root} --force`, then `personas` and `train`",
        "personas": f"re-run `persona-gym personas --artifacts {root} --force`, then `train`",
        "train": f"re-run `persona-gym train --artifacts {root} --force`",
    }
    return (f"{commands.get(stage, commands['train'])} (or, if you changed it on purpose, "
            f"`persona-gym artifacts rehash {root}`)")


def verify_artifacts(root: str | Path, manifest: dict, tables: bool = True) -> None:
    """Check every file the simulator reads against the manifest's ``files`` hashes.

    ``tables=False`` for a shipped package directory, which has no tables. Fails with one line
    naming the first file that is missing, unrecorded or changed, and the fix.
    """
    root = Path(root)
    path = root / MANIFEST
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactsError(f"{path}: no 'files' hashes; {_fix(root, MANIFEST, manifest)}")
    needed = set()
    for rel in manifest["adapters"].values():  # the two peft files and whatever else is there
        folder = PurePosixPath(rel.replace("\\", "/")).as_posix()
        needed |= {f"{folder}/adapter_config.json", f"{folder}/adapter_model.safetensors"}
        needed |= {f"{folder}/{name}" for name in artifact_files(root / rel)}
    if tables:
        needed |= {"items.parquet", "profiles.jsonl", "memories.parquet", "embeddings/items.npy",
                   "personas.json"}
        if (root / CF_FILE).exists():
            needed.add(CF_FILE)
    for rel in sorted(needed - set(files)):
        raise ArtifactsError(f"{root / rel} is not recorded in {path}: it was added after the "
                             f"manifest was written; {_fix(root, rel, manifest)}")
    paths = {}
    for rel in sorted(files):
        file = _inside(root, rel, f"{path}: files")
        if not file.is_file():
            raise ArtifactsError(f"{file} is missing (recorded in {path}); {_fix(root, rel, manifest)}")
        paths[rel] = file
    digests = hash_files(list(paths.values()))
    for rel, file in paths.items():
        if digests[file] != files[rel]:
            raise ArtifactsError(f"{file} does not match its hash in {path}: it changed after "
                                 f"it was written; {_fix(root, rel, manifest)}")


def check_adapters(root: str | Path, manifest: dict) -> None:
    """Each adapter folder holds a peft config (JSON with ``peft_type``) and a readable
    safetensors file (its header parses and its tensors lie inside the file); else one line
    naming the file and the fix, instead of a parser's error at load time."""
    root = Path(root)
    for name, rel in manifest["adapters"].items():
        folder = root / rel
        fix = _fix(root, f"adapters/{name}", manifest)
        config = _read_json(folder / "adapter_config.json", fix)
        if not isinstance(config, dict) or "peft_type" not in config:
            raise ArtifactsError(f"{folder / 'adapter_config.json'} is not a peft adapter config "
                                 f"(no peft_type); {fix}")
        weights = folder / "adapter_model.safetensors"
        size = weights.stat().st_size
        try:
            with open(weights, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                if not 0 < length <= size - 8:
                    raise ValueError(f"header length {length} for a {size}-byte file")
                header = json.loads(handle.read(length))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
            if not ends or max(ends) > size - 8 - length:
                raise ValueError("tensors beyond the end of the file")
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise ArtifactsError(f"{weights} is not a readable safetensors file ({err}); {fix}") from err


def check_base_model(manifest: dict, model_path: str) -> None:
    """Fail when the resolved base model is not the one the adapters were trained on."""
    from persona_gym.assets import model_source

    expected = manifest["base_model"].get("sha256")
    actual = model_source(model_path).get("sha256")
    if expected and actual and expected != actual:
        raise ArtifactsError(
            f"the adapters were trained on base model {manifest['base_model'].get('model')} "
            f"(sha256 {expected[:12]}…) but {model_path} has sha256 {actual[:12]}…; "
            "load the same base model or retrain the adapters"
        )


# -- tables ------------------------------------------------------------------------------------
def _read_table(path: Path, fix: str) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ArtifactsError(f"{path} is not a readable parquet table ({type(err).__name__}); {fix}") from err


def load_tables(root: str | Path) -> tuple[ItemCatalog, dict[int, str], pd.DataFrame, np.ndarray]:
    """Catalogue, profiles, memories and item embeddings written by ``persona-gym distill``,
    checked for shape and finite values."""
    root = Path(root)
    fix = f"re-run `persona-gym distill --out {root} --force`"
    needed = ["items.parquet", "profiles.jsonl", "memories.parquet", "embeddings/items.npy"]
    for name in needed:
        if not (root / name).exists():
            raise ArtifactsError(
                f"{root / name} not found: run `persona-gym distill --out {root}` first"
            )
    items = _read_table(root / "items.parquet", fix)
    try:
        catalog = ItemCatalog.from_frame(items)
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactsError(f"{root / 'items.parquet'}: not a catalogue table ({err!r}); {fix}") from err
    profiles = {}
    with open(root / "profiles.jsonl", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                row = json.loads(line)
                profiles[int(row["user_id"])] = str(row["text"])
            except (json.JSONDecodeError, KeyError, ValueError, TypeError) as err:
                raise ArtifactsError(
                    f"{root / 'profiles.jsonl'} line {number}: not a profile record ({err}); {fix}"
                ) from err
    memories = _read_table(root / "memories.parquet", fix)
    missing = sorted({"user_id", "item_index", "rating", "timestamp", "text"} - set(memories.columns))
    if missing:
        raise ArtifactsError(f"{root / 'memories.parquet'} lacks columns {missing}; {fix}")
    index = memories["item_index"].to_numpy()
    ratings = memories["rating"].to_numpy(dtype=np.float64)
    if len(index) and (index.min() < 0 or index.max() >= len(catalog)):
        raise ArtifactsError(f"{root / 'memories.parquet'}: item_index outside the catalogue "
                             f"(0..{len(catalog) - 1}); {fix}")
    if not np.isfinite(ratings).all():
        raise ArtifactsError(f"{root / 'memories.parquet'}: non-finite ratings; {fix}")
    try:
        embeddings = np.load(root / "embeddings" / "items.npy", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ArtifactsError(f"{root / 'embeddings' / 'items.npy'} is not a numpy array file; {fix}") from err
    if embeddings.ndim != 2 or embeddings.shape[0] != len(catalog):
        raise ArtifactsError(f"{root / 'embeddings' / 'items.npy'} has shape {embeddings.shape}, "
                             f"expected ({len(catalog)}, dim); {fix}")
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        raise ArtifactsError(f"{root / 'embeddings' / 'items.npy'}: NaN or inf in {int(bad.sum())} "
                             f"item embeddings (rows {np.flatnonzero(bad)[:5].tolist()}); {fix}")
    return catalog, profiles, memories, embeddings


def load_personas(root: str | Path) -> dict[int, int]:
    """``user_id → persona`` from ``personas.json``."""
    path = Path(root) / "personas.json"
    fix = f"re-run `persona-gym personas --artifacts {root} --force`"
    if not path.exists():
        raise ArtifactsError(f"{path} not found: run `persona-gym personas --artifacts {root}` first")
    data = _read_json(path, fix)
    try:
        return {int(u): int(p) for u, p in data["assignment"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ArtifactsError(f"{path}: 'assignment' is not a mapping of user ids to persona "
                             f"numbers ({err!r}); {fix}") from err


def tables_digest(root: str | Path) -> str:
    """Content hash of the prompt-relevant tables (profiles, memories, item descriptions).

    Recorded in the manifest at training time; regenerated tables are checked against it.
    """
    catalog, profiles, memories, _ = load_tables(root)
    digest = hashlib.sha256()
    for user in sorted(profiles):
        digest.update(f"{user}\t{profiles[user]}\n".encode())
    columns = ["user_id", "item_index", "rating", "timestamp", "text"]
    for row in memories[columns].itertuples(index=False):
        digest.update("\t".join(map(str, row)).encode() + b"\n")
    for index in range(len(catalog)):
        digest.update(catalog.describe(index).encode() + b"\n")
    cf_path = Path(root) / CF_FILE
    if cf_path.exists():  # rounded: the fit's last bits may differ between BLAS builds
        cf = load_collaborative(cf_path)
        for array in (cf.user_bias, cf.user_factors, cf.item_bias, cf.item_factors, cf.logged_predictions):
            digest.update(np.round(np.asarray(array, dtype=np.float64), 3).tobytes())
    return digest.hexdigest()


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


def prepare_stage(root: str | Path, stage: str, force: bool = False, same_run: bool = False) -> None:
    """Get ``root`` ready for ``stage`` (``"personas"``, ``"train"`` or ``"evaluate"``) to write.

    When the stage's results already exist it refuses (:class:`StageError`), unless
    ``same_run`` (the caller resumes or extends a run with the same settings; its files are
    verified first, so nothing changed since is built upon) or ``force``, which deletes the
    stage's results and everything later first. Leftovers of killed writes are removed.
    """
    root = Path(root)
    names = list(STAGE_PRODUCTS)
    later = [p for s in names[names.index(stage):] for p in STAGE_PRODUCTS[s]]
    own = STAGE_PRODUCTS[stage]
    marker = MANIFEST if stage == "train" else own[0]
    if (root / marker).exists() and not force:
        if not same_run:
            option = {"personas": f"persona-gym personas --artifacts {root} --force",
                      "train": f"persona-gym train --artifacts {root} --force"}.get(stage, "--force")
            raise StageError(
                f"{root / marker} exists: {root} already holds {stage} results; re-running "
                f"{stage} would mix runs. Replace them (and everything built on them) with "
                f"`{option}`, or write a copy of the directory")
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
    build happens in ``.<name>.partial`` next to ``out``; a killed build leaves ``out`` as it was
    and the partial folder, which the next build clears (keeping an LLM distiller's
    ``llm_cache`` so it resumes).
    """
    out = Path(out).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise StageError(f"{out} is a file, not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not _looks_like_artifacts(out):
            raise StageError(f"{out} is a non-empty directory that is not an artifacts directory; "
                             "choose a new or empty --out")
        if not force:
            raise StageError(
                f"{out} already holds artifacts; distilling into it would mix runs. Replace it "
                f"(and the personas and adapters built on it) with --force, or choose a new --out")
    staging = out.parent / f".{out.name}.partial"
    staging.mkdir(parents=True, exist_ok=True)
    for child in staging.iterdir():
        if child.name != "llm_cache":
            _remove(child)
    if (out / "llm_cache").is_dir() and not (staging / "llm_cache").exists():
        shutil.copytree(out / "llm_cache", staging / "llm_cache")
    try:
        yield staging
    except BaseException:
        if not any(staging.iterdir()):  # failed before writing anything: leave no trace
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


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (waits for the holder); no-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish %s", path.with_suffix(""))
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class MissingArtifactsError(ArtifactsError, FileNotFoundError):
    """No trained simulator where one was asked for (the message gives the commands)."""


def missing_artifacts_message(where: Path, dataset: str = "ml-100k", named: bool = False) -> str:
    """How to produce the simulator artifacts asked for at ``where`` (``named``: through a
    simulator name of :data:`persona_gym.registry.SIMULATORS`, so the commands write to DIR)."""
    out = "DIR" if named else str(where)
    fetch = ""
    if dataset == "ml-1m":
        fetch = ("`persona-gym data fetch ml-1m` (or pass the folder holding ratings.dat, "
                 "users.dat, movies.dat as --dataset), then ")
    return (
        f"{where / MANIFEST} not found: no trained simulator there. Produce one with: "
        f"{fetch}`persona-gym distill --dataset {dataset} --out {out} && "
        f"persona-gym personas --artifacts {out} && persona-gym train --artifacts {out}`, "
        f"then pass artifacts={out!r} (e.g. gym.make(..., artifacts={out!r}))."
    )


def resolve_artifacts(name_or_path: str | Path, cache: str | Path | None = None,
                      dataset: str | None = None) -> Path:
    """The artifacts directory of a simulator name (``"ml-100k"``) or a path;
    :class:`MissingArtifactsError` naming the commands (for ``dataset``) when it has no manifest.

    A shipped name is materialised once into the cache: the package's manifest, adapters and
    persona cards (verified against the manifest), plus the tables regenerated from the local
    dataset by the data distiller, recorded in the copy's manifest. Processes materialising the
    same copy take turns (a file lock); the later ones reuse the first one's copy.
    """
    name = str(name_or_path)
    named = name in SIMULATORS
    root = SHIPPED_DIR / SIMULATORS[name] if named else Path(name_or_path).expanduser()
    if not (root / MANIFEST).is_file():
        raise MissingArtifactsError(missing_artifacts_message(root, dataset or (name if named else "ml-100k"),
                                                              named))
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
    with _file_lock(target.parent / f".{target.name}.lock"):
        if (target / MANIFEST).exists():  # another process finished it while we waited
            return target
        log.info("materialising the shipped %s simulator into %s (once, about a minute)", name, target)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            shutil.copytree(shipped, tmp / "art", ignore=shutil.ignore_patterns(".*"))
            split_info = _read_json(shipped / "split.json", "reinstall persona-gym")
            _regenerate_tables(tmp / "art", split_info)
            actual = tables_digest(tmp / "art")
            if actual != manifest.get("tables_sha256"):
                warnings.warn(
                    f"the regenerated {name} tables differ from those the shipped adapters were "
                    "trained on (another dataset copy or library version); ratings may deviate "
                    "from the published evaluation", stacklevel=2)
            seal_manifest(tmp / "art", {**manifest, "materialised_from": name})
            _make_readable(tmp / "art")
            if target.exists():  # an incomplete copy made before this lock existed
                shutil.rmtree(target)
            (tmp / "art").rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


SHIPPABLE = ("manifest.json", "personas.json", "split.json", "distill.json", "adapters", "evaluation")


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
                shutil.copytree(src / name, tmp / name, ignore=shutil.ignore_patterns("*.parquet", ".*"))
            elif (src / name).exists():
                shutil.copy2(src / name, tmp / name)
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
    info = json.loads((root / "distill.json").read_text()) if (root / "distill.json").exists() else {}
    write_artifacts(root, dataset, split, catalog, result, embeddings, info)


def load_artifacts(root: str | Path) -> Artifacts:
    """Load and verify an artifacts directory (a path, or a shipped name like ``"ml-100k"``)."""
    root = resolve_artifacts(root)
    manifest = read_manifest(root)
    verify_artifacts(root, manifest)
    check_adapters(root, manifest)
    catalog, profiles, memories, embeddings = load_tables(root)
    cf = load_collaborative(root / CF_FILE) if (root / CF_FILE).exists() else None
    return Artifacts(root, manifest, catalog, profiles, memories, embeddings, load_personas(root), cf)


# -- command line ---------------------------------------------------------------------------------
def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``persona-gym artifacts verify|rehash DIR``."""
    parser = subparsers.add_parser(
        "artifacts", help="verify an artifacts directory or record a deliberate change",
        description="verify: check the manifest and the hash of every file of an artifacts "
                    "directory ('ml-100k' = the shipped simulator). rehash: record the current "
                    "files in the manifest after a deliberate change (or for a manifest written "
                    "by an older persona-gym).")
    parser.add_argument("action", choices=["verify", "rehash"])
    parser.add_argument("dir", help="artifacts directory (verify also takes 'ml-100k')")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.action == "rehash":
        manifest = rehash(args.dir)
        sys.stdout.write(f"recorded {len(manifest['files'])} files in {Path(args.dir) / MANIFEST}\n")
        return 0
    loaded = load_artifacts(args.dir)
    sys.stdout.write(f"{loaded.root}: {len(loaded.manifest['files'])} files match {MANIFEST}; "
                     f"{len(loaded.profiles)} users, {len(loaded.manifest['adapters'])} adapters\n")
    return 0
