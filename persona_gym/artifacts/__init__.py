"""The artifacts directory: everything a simulator needs, described by ``manifest.json``.

Layout (written by ``persona-gym distill``, ``personas`` and ``train``, or all of them and
``evaluate`` by ``persona-gym build``)::

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
``llm_cache/``, ``evaluation/``, the build's record and log (``build.json``, ``build.log``) and
hidden entries (a killed stage's ``.*.tmp`` files and partial folders: ignored by every loader,
removed by the next stage that writes the directory).

A stage never mixes its results with an earlier run's: ``distill`` builds a new directory and
swaps it in whole (:func:`staged_dir`); ``personas`` and ``train`` refuse to overwrite earlier
results unless forced, and then delete everything downstream first (:func:`prepare_stage`).
``persona-gym artifacts verify DIR`` checks a directory; ``persona-gym artifacts rehash DIR``
records the current files after a deliberate change (:func:`rehash`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from persona_gym.artifacts.manifest import (
    BUILD_LOG,
    BUILD_RECORD,
    MANIFEST,
    SCHEMA_VERSION,
    SEAL,
    STAGE_PRODUCTS,
    TABLES,
    UNHASHED,
    ArtifactsError,
    artifact_files,
    check_adapters,
    check_base_model,
    file_hashes,
    hash_files,
    library_versions,
    read_manifest,
    rehash,
    seal_manifest,
    verify_artifacts,
    write_manifest,
)
from persona_gym.artifacts.shipped import (
    SHIPPABLE,
    MissingArtifactsError,
    export_shippable,
    missing_artifacts_message,
    resolve_artifacts,
)
from persona_gym.artifacts.stages import prepare_stage, staged_dir
from persona_gym.artifacts.tables import load_personas, load_tables, tables_digest, training_users
from persona_gym.simulator import adapter_names

__all__ = [
    "BUILD_LOG",
    "BUILD_RECORD",
    "MANIFEST",
    "SCHEMA_VERSION",
    "SEAL",
    "SHIPPABLE",
    "STAGE_PRODUCTS",
    "TABLES",
    "UNHASHED",
    "Artifacts",
    "ArtifactsError",
    "MissingArtifactsError",
    "artifact_files",
    "check_adapters",
    "check_base_model",
    "export_shippable",
    "file_hashes",
    "hash_files",
    "library_versions",
    "load_artifacts",
    "load_personas",
    "load_tables",
    "missing_artifacts_message",
    "prepare_stage",
    "read_manifest",
    "rehash",
    "resolve_artifacts",
    "seal_manifest",
    "staged_dir",
    "tables_digest",
    "training_users",
    "verify_artifacts",
    "write_manifest",
]
from persona_gym.catalog import ItemCatalog
from persona_gym.simulator.collaborative import (
    CF_FILE,
    CollaborativeModel,
    load_collaborative,
    persona_tastes,
    taste_axes,
)
from persona_gym.simulator.prompt_config import PromptConfig


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
    collaborative: CollaborativeModel | None = (
        None  # None for artifacts distilled before it existed
    )

    @property
    def user_ids(self) -> list[int]:
        """Every simulated user (with ``--all-users``, also users the adapters never saw)."""
        return sorted(self.profiles)

    @property
    def training_user_ids(self) -> list[int]:
        """The simulated users the adapters were trained on (:func:`training_users`)."""
        return training_users(self.root, self.profiles)

    @property
    def prompt_config(self) -> PromptConfig:
        return PromptConfig.of_manifest(self.manifest["prompt"])

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
            raise ArtifactsError(
                f"{self.root / CF_FILE} not found: the prompt uses collaborative "
                f"cues; re-run `persona-gym distill --out {self.root} --force` with this version"
            )
        return self.collaborative

    @functools.cached_property
    def persona_tastes(self) -> dict[int, np.ndarray]:
        """Each persona's mean MF factors over its training users (``PromptConfig.persona_taste``)."""
        return persona_tastes(
            self.require_collaborative(), self.user_persona, self.training_user_ids
        )

    @functools.cached_property
    def taste_axes(self) -> np.ndarray:
        """The axes that separate the personas' tastes (:func:`~persona_gym.simulator.collaborative.taste_axes`)."""
        return taste_axes(self.persona_tastes)

    def taste(self, user_id: int, adapter: str) -> np.ndarray | None:
        """The user factors the collaborative cues use when ``adapter`` rates ``user_id``: the
        user's own moved toward the adapter's persona by ``PromptConfig.persona_taste``; None
        (the user's own) without it or for an adapter that is no persona's."""
        share = self.prompt_config.persona_taste
        persona = adapter_names.persona_of(adapter)
        if not share or persona is None:
            return None
        if persona not in self.persona_tastes:
            raise ArtifactsError(
                f"{self.root / 'personas.json'} has no persona {persona} for adapter {adapter!r}"
            )
        return self.require_collaborative().taste_of(
            user_id, self.persona_tastes[persona], share, self.taste_axes
        )

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
                    f"and `persona-gym train --artifacts {self.root} --force`"
                )
        lost = [u for u in users if self.adapter_of(u, variant) not in self.manifest["adapters"]]
        if lost:
            missing = sorted({self.adapter_of(u, variant) for u in lost})
            variants = "persona" if variant == "persona" else "user"
            raise ArtifactsError(
                f"{self.root / MANIFEST} has no adapter {missing[:3]} for {len(lost)} of the "
                f"{len(users)} users (e.g. {lost[:5]}) under variant={variant!r}; train them with "
                f"`persona-gym train --artifacts {self.root} --preset paper --variants {variants}`"
            )


def load_artifacts(root: str | Path) -> Artifacts:
    """Load and verify an artifacts directory (a path, or a shipped name like ``"ml-100k"``)."""
    root = resolve_artifacts(root)
    manifest = read_manifest(root)
    verify_artifacts(root, manifest)
    check_adapters(root, manifest)
    catalog, profiles, memories, embeddings = load_tables(root)
    cf = load_collaborative(root / CF_FILE) if (root / CF_FILE).exists() else None
    return Artifacts(
        root, manifest, catalog, profiles, memories, embeddings, load_personas(root), cf
    )
