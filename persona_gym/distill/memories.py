"""The distillers' result and where it goes: ``UserMemories`` and the artifacts' tables.

A distiller (:class:`Distiller`) turns a split's training interactions into a profile ``Ms``
per user and one memory ``Ml`` per training interaction (:class:`UserMemories`);
:func:`write_artifacts` writes them with the catalogue, the collaborative model, the split's
record and the item embeddings: the tables of an artifacts directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd

from persona_gym.catalog import ItemCatalog
from persona_gym.io import atomic_write, atomic_write_json, atomic_write_parquet, atomic_write_text

__all__ = [
    "MEMORY_COLUMNS",
    "Distiller",
    "UserMemories",
    "memories_frame",
    "select_users",
    "training_rows",
    "write_artifacts",
]

MEMORY_COLUMNS = ["user_id", "item_id", "item_index", "rating", "timestamp", "text"]


@dataclass
class UserMemories:
    """What a distiller produces for a split's users."""

    profiles: dict[int, str]  # user_id -> Ms text
    traits: dict[int, dict]  # user_id -> the statistics behind the profile (JSON-able)
    memories: pd.DataFrame  # MEMORY_COLUMNS; one row per training interaction, by user then time

    def save(self, out: str | Path) -> None:
        """Write ``profiles.jsonl`` and ``memories.parquet`` into ``out`` (atomically)."""
        out = Path(out)
        lines = [
            json.dumps(
                {"user_id": u, "text": self.profiles[u], "traits": self.traits[u]}, sort_keys=False
            )
            for u in sorted(self.profiles)
        ]
        atomic_write_text(out / "profiles.jsonl", "\n".join(lines) + "\n")
        atomic_write_parquet(out / "memories.parquet", self.memories[MEMORY_COLUMNS])

    @classmethod
    def load(cls, out: str | Path) -> UserMemories:
        """Read what :meth:`save` wrote."""
        out = Path(out)
        path = out / "profiles.jsonl"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing; run: persona-gym distill --dataset ml-100k --out {out}"
            )
        profiles: dict[int, str] = {}
        traits: dict[int, dict] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                profiles[int(row["user_id"])] = row["text"]
                traits[int(row["user_id"])] = row["traits"]
        return cls(profiles, traits, pd.read_parquet(out / "memories.parquet"))


class Distiller(Protocol):
    """Turns a split's training interactions into profiles and memories."""

    def distill(self, dataset, split, catalog: ItemCatalog) -> UserMemories: ...


def training_rows(split, catalog: ItemCatalog) -> pd.DataFrame:
    """The training rows of the split's simulated users (the selected users and, with
    ``all_users``, the others), sorted by user then time, with catalogue index and avg."""
    train = split.simulated_train()
    index = catalog.indices_of(train["item_id"].to_numpy())
    return train.assign(item_index=index, item_mean=catalog.mean_rating[index])


def select_users(traits: dict[int, dict], user_ids: list[int] | None) -> list[int]:
    """The users to distil: all with traits, or ``user_ids`` (each must have traits)."""
    if user_ids is None:
        return sorted(traits)
    unknown = [u for u in user_ids if u not in traits]
    if unknown:
        raise ValueError(f"users {unknown[:5]} have no training interactions in this split")
    return user_ids


def memories_frame(rows: pd.DataFrame, texts: list[str]) -> pd.DataFrame:
    """The memories table: one row per training interaction of ``rows``, its text from ``texts``."""
    return pd.DataFrame(
        {
            "user_id": rows["user_id"].to_numpy(dtype=np.int64),
            "item_id": rows["item_id"].to_numpy(dtype=np.int64),
            "item_index": rows["item_index"].to_numpy(dtype=np.int64),
            "rating": rows["rating"].to_numpy(dtype=np.float64),
            "timestamp": rows["timestamp"].to_numpy(dtype=np.int64),
            "text": pd.array(texts, dtype=object),
        }
    )


def write_artifacts(
    out: str | Path,
    dataset,
    split,
    catalog: ItemCatalog,
    result: UserMemories,
    item_embeddings: np.ndarray,
    info: dict,
    cf_params: dict | None = None,
) -> None:
    """Write the artifacts directory, every file atomically.

    ``items.parquet`` (the catalogue), ``profiles.jsonl`` (user_id, text, traits),
    ``memories.parquet``, ``collaborative.npz`` (the collaborative model the prompts' cues and
    item tokens use, :mod:`persona_gym.simulator.collaborative`), ``split.json`` (the dataset's
    ``source``, a known name or the folder's absolute path, so that later commands rebuild the
    split from any working folder; parameters, user ids, counts; no ratings),
    ``embeddings/items.npy`` (catalogue order) and ``distill.json`` (backend and text lengths).
    ``cf_params``: the collaborative model's tuned parameters, known already (a shipped
    simulator's), so that its fit skips the tuning.
    """
    from persona_gym.simulator.collaborative import CF_FILE, fit_collaborative

    out = Path(out)
    atomic_write_parquet(out / "items.parquet", catalog.to_frame())
    result.save(out)
    fit_collaborative(
        split.simulated_train(), split.rest(), catalog, seed=split.seed, params=cf_params
    ).save(out / CF_FILE)
    atomic_write_json(
        out / "split.json",
        {
            "dataset": dataset.source or dataset.name,
            "params": split.params,
            "user_ids": [int(u) for u in split.user_ids],
            "distilled_user_ids": sorted(int(u) for u in result.profiles),
            "summary": split.summary(),
        },
    )

    def write_npy(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, np.asarray(item_embeddings, dtype=np.float32))

    atomic_write(out / "embeddings" / "items.npy", write_npy)
    atomic_write_json(out / "distill.json", info)
