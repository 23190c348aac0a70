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
                           library versions

``load_artifacts`` validates the manifest and fails with the reason and the fix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from persona_gym.catalog import ItemCatalog
from persona_gym.collaborative import CF_FILE, CollaborativeModel, load_collaborative
from persona_gym.io import atomic_write_json
from persona_gym.simulator.prompts import PromptConfig

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
# Artifacts shipped inside the package: adapters, manifest and persona cards only. The tables
# (profiles, memories, items) reproduce MovieLens content, which may not be redistributed, so
# they are regenerated on first use by the deterministic data distiller from the local dataset.
SHIPPED = {"ml-100k": "ml100k"}
SHIPPED_DIR = Path(__file__).parent / "default_artifacts"
TABLES = ("items.parquet", "profiles.jsonl", "memories.parquet", "embeddings/items.npy", CF_FILE)


class ArtifactsError(ValueError):
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
                                 f"cues; re-run `persona-gym distill --out {self.root}` with this version")
        return self.collaborative

    def adapter_of(self, user_id: int, variant: str = "persona") -> str:
        """The adapter that simulates ``user_id`` under a variant (persona / single-max / ...)."""
        if variant == "persona":
            return f"persona-{self.user_persona[int(user_id)]}"
        if variant == "user":
            return f"user-{int(user_id)}"
        return variant


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


def write_manifest(root: Path, manifest: dict) -> dict:
    """Write ``manifest.json`` atomically, stamped with the schema and library versions; return it."""
    manifest = {"schema_version": SCHEMA_VERSION, **manifest, "versions": library_versions()}
    atomic_write_json(Path(root) / MANIFEST, manifest)
    return manifest


def read_manifest(root: str | Path) -> dict:
    """Read and validate ``manifest.json`` (schema version, required fields, adapter folders)."""
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        raise ArtifactsError(
            f"{path} not found: train a simulator with `persona-gym train --artifacts {root}` "
            "(after `persona-gym distill` and `persona-gym personas`)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ArtifactsError(f"{path} is not valid JSON (line {err.lineno}): {err.msg}; "
                             "re-run `persona-gym train` to rewrite it") from err
    version = manifest.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise ArtifactsError(
            f"{path}: schema_version {version!r} is not supported by this persona-gym "
            f"(supports <= {SCHEMA_VERSION}); upgrade persona-gym or retrain"
        )
    for field in ("base_model", "adapters", "prompt", "dataset"):
        if field not in manifest:
            raise ArtifactsError(f"{path}: required field {field!r} is missing; retrain to rewrite it")
    for name, rel in manifest["adapters"].items():
        folder = root / rel
        for needed in ("adapter_config.json", "adapter_model.safetensors"):
            if not (folder / needed).exists():
                raise ArtifactsError(
                    f"{path}: adapter {name!r} lacks {folder / needed}; retrain it with "
                    f"`persona-gym train --artifacts {root}`"
                )
    return manifest


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


def load_tables(root: str | Path) -> tuple[ItemCatalog, dict[int, str], pd.DataFrame, np.ndarray]:
    """Catalogue, profiles, memories and item embeddings written by ``persona-gym distill``."""
    root = Path(root)
    needed = ["items.parquet", "profiles.jsonl", "memories.parquet", "embeddings/items.npy"]
    for name in needed:
        if not (root / name).exists():
            raise ArtifactsError(
                f"{root / name} not found: run `persona-gym distill --out {root}` first"
            )
    catalog = ItemCatalog.from_frame(pd.read_parquet(root / "items.parquet"))
    profiles = {}
    with open(root / "profiles.jsonl", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            try:
                row = json.loads(line)
                profiles[int(row["user_id"])] = str(row["text"])
            except (json.JSONDecodeError, KeyError, ValueError) as err:
                raise ArtifactsError(
                    f"{root / 'profiles.jsonl'} line {number}: not a profile record ({err}); "
                    "re-run `persona-gym distill`"
                ) from err
    memories = pd.read_parquet(root / "memories.parquet")
    embeddings = np.load(root / "embeddings" / "items.npy")
    return catalog, profiles, memories, embeddings


def load_personas(root: str | Path) -> dict[int, int]:
    """``user_id → persona`` from ``personas.json``."""
    path = Path(root) / "personas.json"
    if not path.exists():
        raise ArtifactsError(f"{path} not found: run `persona-gym personas --artifacts {root}` first")
    data = json.loads(path.read_text())
    return {int(u): int(p) for u, p in data["assignment"].items()}


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


def resolve_artifacts(name_or_path: str | Path, cache: str | Path | None = None) -> Path:
    """The artifacts directory for a shipped name (``"ml-100k"``) or a path.

    A shipped name is materialised once into the cache: the package's manifest, adapters and
    persona cards, plus the tables regenerated from the local dataset by the data distiller.
    """
    name = str(name_or_path)
    if name not in SHIPPED:
        root = Path(name_or_path).expanduser()
        if not root.exists():
            raise ArtifactsError(
                f"artifacts directory {root} does not exist; produce one with\n"
                f"  persona-gym distill --dataset ml-100k --out {root}\n"
                f"  persona-gym personas --artifacts {root}\n"
                f"  persona-gym train --artifacts {root}\n"
                "(for ML-1M: `persona-gym data fetch ml-1m` first, then --dataset ml-1m)"
            )
        return root
    from persona_gym.assets import cache_dir

    shipped = SHIPPED_DIR / SHIPPED[name]
    manifest = read_manifest(shipped)
    # keyed by the manifest's bytes: a package update with new adapters gets a fresh copy
    key = hashlib.sha256((shipped / MANIFEST).read_bytes()).hexdigest()[:12]
    target = cache_dir(cache) / "artifacts" / f"{SHIPPED[name]}-{key}"
    if all((target / t).exists() for t in TABLES) and (target / MANIFEST).exists():
        return target
    log.info("materialising the shipped %s simulator into %s (once, about a minute)", name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        shutil.copytree(shipped, tmp / "art")
        _regenerate_tables(tmp / "art", json.loads((shipped / "split.json").read_text()))
        actual = tables_digest(tmp / "art")
        if actual != manifest["tables_sha256"]:
            warnings.warn(
                f"the regenerated {name} tables differ from those the shipped adapters were "
                "trained on (another dataset copy or library version); ratings may deviate "
                "from the published evaluation", stacklevel=2)
        _make_readable(tmp / "art")
        if target.exists():  # an incomplete earlier attempt
            shutil.rmtree(target)
        (tmp / "art").rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


SHIPPABLE = ("manifest.json", "personas.json", "split.json", "distill.json", "adapters", "evaluation")


def export_shippable(src: str | Path, dest: str | Path) -> Path:
    """Copy what may ship inside the package (no MovieLens-derived tables) from ``src`` to ``dest``.

    ``dest`` is replaced atomically. The manifest must carry ``tables_sha256``.
    """
    src, dest = Path(src), Path(dest)
    manifest = read_manifest(src)
    if "tables_sha256" not in manifest:
        raise ArtifactsError(f"{src / MANIFEST} has no tables_sha256; retrain with this version")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".tmp-"))
    try:
        for name in SHIPPABLE:
            if (src / name).is_dir():  # per-rating tables (e.g. predictions) hold MovieLens ratings
                shutil.copytree(src / name, tmp / name, ignore=shutil.ignore_patterns("*.parquet"))
            elif (src / name).exists():
                shutil.copy2(src / name, tmp / name)
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
    from persona_gym.data import load_dataset, protocol_split
    from persona_gym.embeddings import DEFAULT_EMBEDDER, Embedder, embed_items
    from training.distill import DataDistiller, write_artifacts

    dataset = load_dataset(split_info["dataset"])
    split = protocol_split(dataset, **split_info["params"])
    catalog = ItemCatalog.from_frames(dataset.items, split.item_stats())
    result = DataDistiller().distill(dataset, split, catalog)
    embeddings = embed_items(catalog, Embedder(DEFAULT_EMBEDDER))
    info = json.loads((root / "distill.json").read_text()) if (root / "distill.json").exists() else {}
    write_artifacts(root, dataset, split, catalog, result, embeddings, info)


def load_artifacts(root: str | Path) -> Artifacts:
    """Load and validate an artifacts directory (a path, or a shipped name like ``"ml-100k"``)."""
    root = resolve_artifacts(root)
    manifest = read_manifest(root)
    catalog, profiles, memories, embeddings = load_tables(root)
    cf = load_collaborative(root / CF_FILE) if (root / CF_FILE).exists() else None
    return Artifacts(root, manifest, catalog, profiles, memories, embeddings, load_personas(root), cf)
