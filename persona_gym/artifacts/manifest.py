"""The manifest of an artifacts directory: schema, file hashes, seal, reading and checks.

``manifest.json`` records the simulator's settings and the SHA-256 of every file of the unit
(``files``) and of itself (``manifest_sha256``, the seal). :func:`read_manifest` checks the
schema and the seal, :func:`verify_artifacts` every file's hash; each failure is one line
naming the file and the command that rewrites it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from pathlib import Path, PurePosixPath, PureWindowsPath

from persona_gym import registry
from persona_gym.errors import PersonaGymError
from persona_gym.io import atomic_write_json, json_default
from persona_gym.simulator.collaborative import CF_FILE

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
# What `persona-gym build` (training/build.py) writes next to the stages' files: the record of
# its finished stages (resuming reads it) and its log.
BUILD_RECORD = "build.json"
BUILD_LOG = "build.log"
# Entries at the top of an artifacts directory that are not the simulator, never hashed: folders
# of intermediate or derived results, and the build's record and log.
UNHASHED = ("checkpoints", "cache", "llm_cache", "evaluation", BUILD_RECORD, BUILD_LOG)
_HASH_CACHE = "file-hashes.json"
_HASH_CACHE_MAX = 20_000  # entries kept in the user-cache record of file hashes


class ArtifactsError(PersonaGymError, ValueError):
    """An artifacts directory is missing, corrupted or does not match what is asked."""


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
    every regular file except ``manifest.json``, the :data:`UNHASHED` entries and hidden
    entries (leftovers of killed writes, locks)."""
    root = Path(root)
    found = []
    for folder, dirs, files in os.walk(root):
        rel = Path(folder).relative_to(root)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and not (rel == Path(".") and d in UNHASHED)
        )
        for name in files:
            not_hashed = rel == Path(".") and name in (MANIFEST, *UNHASHED)
            if name.startswith(".") or name.endswith(".tmp") or not_hashed:
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
    body = json.loads(
        json.dumps(
            {**body, "schema_version": SCHEMA_VERSION, "files": file_hashes(root)},
            default=json_default,
        )
    )
    body[SEAL] = _seal(body)
    atomic_write_json(root / MANIFEST, body)
    return body


def write_manifest(root: str | Path, manifest: dict) -> dict:
    """Write ``manifest.json`` atomically, stamped with the schema and library versions and the
    hash of every artifact file (:func:`seal_manifest`); return it."""
    return seal_manifest(
        root, {"schema_version": SCHEMA_VERSION, **manifest, "versions": library_versions()}
    )


def rehash(root: str | Path) -> dict:
    """Record the current files of an artifacts directory in its manifest and re-seal it.

    For a deliberate change (an edited profile, a hand-tuned manifest field, a manifest written
    by an older persona-gym): ``persona-gym artifacts rehash DIR``. The manifest must still be
    valid JSON with the required fields.
    """
    root = Path(root)
    if not (root / MANIFEST).exists():
        raise ArtifactsError(
            f"{root / MANIFEST} not found: there is nothing to rehash; "
            f"train a simulator with `persona-gym train --artifacts {root}`"
        )
    manifest = read_json(root / MANIFEST, f"re-run `persona-gym train --artifacts {root}`")
    _check_structure(root, manifest, root / MANIFEST)
    return seal_manifest(root, manifest)


# -- reading and verifying -------------------------------------------------------------------------
def read_json(path: Path, fix: str):
    """A JSON file of an artifacts directory; :class:`ArtifactsError` naming the file and ``fix``
    when it is not valid JSON or not UTF-8 text."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ArtifactsError(
            f"{path} is not valid JSON (line {err.lineno}): {err.msg}; {fix}"
        ) from err
    except UnicodeDecodeError as err:
        raise ArtifactsError(f"{path} is not UTF-8 text; {fix}") from err


def _inside(root: Path, rel: object, where: str) -> Path:
    """``root / rel`` for a relative path that stays inside ``root``; else ``ArtifactsError``."""
    if not isinstance(rel, str) or not rel:
        raise ArtifactsError(f"{where}: path {rel!r} is not a relative path inside {root}")
    if (
        PurePosixPath(rel).is_absolute()
        or PureWindowsPath(rel).is_absolute()
        or PureWindowsPath(rel).drive
        or ".." in PurePosixPath(rel.replace("\\", "/")).parts
    ):
        raise ArtifactsError(
            f"{where}: path {rel!r} leaves the artifacts directory {root} "
            "(absolute paths and '..' are refused); re-run `persona-gym train`"
        )
    path = root / rel
    if not path.resolve().is_relative_to(root.resolve()):
        raise ArtifactsError(
            f"{where}: path {rel!r} resolves to {path.resolve()}, outside "
            f"{root} (a symbolic link?); copy the files into the directory"
        )
    return path


def _check_structure(root: Path, manifest: object, path: Path) -> None:
    """Required fields, base model identity and adapter paths of a manifest (no file reads)."""
    if not isinstance(manifest, dict):
        raise ArtifactsError(
            f"{path}: expected a JSON object, got {type(manifest).__name__}; "
            "re-run `persona-gym train` to rewrite it"
        )
    for field in ("base_model", "adapters", "prompt", "dataset"):
        if field not in manifest:
            raise ArtifactsError(
                f"{path}: required field {field!r} is missing; retrain to rewrite it"
            )
    base = manifest["base_model"]
    if not isinstance(base, dict) or "sha256" not in base:
        raise ArtifactsError(
            f"{path}: base_model.sha256 is missing, so the adapters cannot be "
            "matched to their base model; re-run `persona-gym train` to record it"
        )
    if not (
        base["sha256"] is None or (isinstance(base["sha256"], str) and len(base["sha256"]) == 64)
    ):
        raise ArtifactsError(
            f"{path}: base_model.sha256 {base['sha256']!r} is not a SHA-256; "
            "re-run `persona-gym train` to record it"
        )
    if not isinstance(manifest["adapters"], dict) or not isinstance(manifest["prompt"], dict):
        raise ArtifactsError(
            f"{path}: 'adapters' and 'prompt' must be JSON objects; retrain to rewrite it"
        )
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
    manifest = read_json(path, "re-run `persona-gym train` to rewrite it")
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION:
        raise ArtifactsError(
            f"{path}: schema_version {version!r} is not supported by this persona-gym "
            f"(supports {SCHEMA_VERSION}); upgrade persona-gym or retrain"
        )
    if version < 1:
        raise ArtifactsError(
            f"{path}: schema_version {version} is not a persona-gym manifest "
            f"(this version writes {SCHEMA_VERSION}); re-run `persona-gym train`"
        )
    if version < SCHEMA_VERSION:
        raise ArtifactsError(
            f"{path}: schema_version {version} predates file hashes, so its files cannot be "
            f"verified; record them with `persona-gym artifacts rehash {root}` (if the files are "
            f"the ones you trained) or re-run `persona-gym train --artifacts {root} --force`"
        )
    if manifest.get(SEAL) != _seal(manifest):
        raise ArtifactsError(
            f"{path} was changed after it was written (its {SEAL} does not match); "
            f"{_fix(root, MANIFEST, manifest)}"
        )
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
        return (
            f"delete {root} (the cached copy of the shipped {manifest['materialised_from']} "
            "simulator; it is rebuilt on next use)"
        )
    if root.resolve().is_relative_to(registry.SHIPPED_DIR.resolve()):
        return "reinstall persona-gym (the shipped simulator's files were changed)"
    stage = _stage_of(rel)
    commands = {
        "distill": f"re-run `persona-gym distill --out {root} --force`, then `personas` and `train`",
        "personas": f"re-run `persona-gym personas --artifacts {root} --force`, then `train`",
        "train": f"re-run `persona-gym train --artifacts {root} --force`",
    }
    return (
        f"{commands.get(stage, commands['train'])} (or, if you changed it on purpose, "
        f"`persona-gym artifacts rehash {root}`)"
    )


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
        needed |= {
            "items.parquet",
            "profiles.jsonl",
            "memories.parquet",
            "embeddings/items.npy",
            "personas.json",
        }
        if (root / CF_FILE).exists():
            needed.add(CF_FILE)
    for rel in sorted(needed - set(files)):
        raise ArtifactsError(
            f"{root / rel} is not recorded in {path}: it was added after the "
            f"manifest was written; {_fix(root, rel, manifest)}"
        )
    paths = {}
    for rel in sorted(files):
        file = _inside(root, rel, f"{path}: files")
        if not file.is_file():
            raise ArtifactsError(
                f"{file} is missing (recorded in {path}); {_fix(root, rel, manifest)}"
            )
        paths[rel] = file
    digests = hash_files(list(paths.values()))
    for rel, file in paths.items():
        if digests[file] != files[rel]:
            raise ArtifactsError(
                f"{file} does not match its hash in {path}: it changed after "
                f"it was written; {_fix(root, rel, manifest)}"
            )


def check_adapters(root: str | Path, manifest: dict) -> None:
    """Each adapter folder holds a peft config (JSON with ``peft_type``) and a readable
    safetensors file (its header parses and its tensors lie inside the file); else one line
    naming the file and the fix, instead of a parser's error at load time."""
    root = Path(root)
    for name, rel in manifest["adapters"].items():
        folder = root / rel
        fix = _fix(root, f"adapters/{name}", manifest)
        config = read_json(folder / "adapter_config.json", fix)
        if not isinstance(config, dict) or "peft_type" not in config:
            raise ArtifactsError(
                f"{folder / 'adapter_config.json'} is not a peft adapter config "
                f"(no peft_type); {fix}"
            )
        weights = folder / "adapter_model.safetensors"
        size = weights.stat().st_size
        try:
            with open(weights, "rb") as handle:
                length = int.from_bytes(handle.read(8), "little")
                if not 0 < length <= size - 8:
                    raise ValueError(f"header length {length} for a {size}-byte file")
                header = json.loads(handle.read(length))
            ends = [
                entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"
            ]
            if not ends or max(ends) > size - 8 - length:
                raise ValueError("tensors beyond the end of the file")
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise ArtifactsError(
                f"{weights} is not a readable safetensors file ({err}); {fix}"
            ) from err


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
