"""The tables of an artifacts directory (catalogue, profiles, memories, embeddings, personas)."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from persona_gym.artifacts.manifest import ArtifactsError, read_json
from persona_gym.catalog import ItemCatalog
from persona_gym.simulator.collaborative import CF_FILE, load_collaborative

log = logging.getLogger(__name__)


# -- tables ------------------------------------------------------------------------------------
def _read_table(path: Path, fix: str) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ArtifactsError(
            f"{path} is not a readable parquet table ({type(err).__name__}); {fix}"
        ) from err


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
        raise ArtifactsError(
            f"{root / 'items.parquet'}: not a catalogue table ({err!r}); {fix}"
        ) from err
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
    missing = sorted(
        {"user_id", "item_index", "rating", "timestamp", "text"} - set(memories.columns)
    )
    if missing:
        raise ArtifactsError(f"{root / 'memories.parquet'} lacks columns {missing}; {fix}")
    index = memories["item_index"].to_numpy()
    ratings = memories["rating"].to_numpy(dtype=np.float64)
    if len(index) and (index.min() < 0 or index.max() >= len(catalog)):
        raise ArtifactsError(
            f"{root / 'memories.parquet'}: item_index outside the catalogue "
            f"(0..{len(catalog) - 1}); {fix}"
        )
    if not np.isfinite(ratings).all():
        raise ArtifactsError(f"{root / 'memories.parquet'}: non-finite ratings; {fix}")
    try:
        embeddings = np.load(root / "embeddings" / "items.npy", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ArtifactsError(
            f"{root / 'embeddings' / 'items.npy'} is not a numpy array file; {fix}"
        ) from err
    if embeddings.ndim != 2 or embeddings.shape[0] != len(catalog):
        raise ArtifactsError(
            f"{root / 'embeddings' / 'items.npy'} has shape {embeddings.shape}, "
            f"expected ({len(catalog)}, dim); {fix}"
        )
    bad = ~np.isfinite(embeddings).all(axis=1)
    if bad.any():
        raise ArtifactsError(
            f"{root / 'embeddings' / 'items.npy'}: NaN or inf in {int(bad.sum())} "
            f"item embeddings (rows {np.flatnonzero(bad)[:5].tolist()}); {fix}"
        )
    return catalog, profiles, memories, embeddings


def load_personas(root: str | Path) -> dict[int, int]:
    """``user_id → persona`` from ``personas.json``."""
    path = Path(root) / "personas.json"
    fix = f"re-run `persona-gym personas --artifacts {root} --force`"
    if not path.exists():
        raise ArtifactsError(
            f"{path} not found: run `persona-gym personas --artifacts {root}` first"
        )
    data = read_json(path, fix)
    try:
        return {int(u): int(p) for u, p in data["assignment"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ArtifactsError(
            f"{path}: 'assignment' is not a mapping of user ids to persona numbers ({err!r}); {fix}"
        ) from err


def training_users(root: str | Path, user_ids) -> list[int]:
    """The users of ``user_ids`` the adapters train on: the protocol users ``split.json``
    records. The other simulated users of an ``--all-users`` distillation are left out; without
    a split record (hand-made tables) every user is kept."""
    path = Path(root) / "split.json"
    users = sorted(int(u) for u in user_ids)
    if not path.exists():
        return users
    protocol = {
        int(u)
        for u in read_json(path, f"re-run `persona-gym distill --out {root} --force`").get(
            "user_ids", []
        )
    }
    kept = [u for u in users if u in protocol]
    if users and not kept:
        raise ArtifactsError(
            f"{path}: none of its user_ids has a profile in {Path(root) / 'profiles.jsonl'}; "
            f"re-run `persona-gym distill --out {root} --force`"
        )
    return kept


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
        for array in (
            cf.user_bias,
            cf.user_factors,
            cf.item_bias,
            cf.item_factors,
            cf.logged_predictions,
        ):
            digest.update(np.round(np.asarray(array, dtype=np.float64), 3).tobytes())
    return digest.hexdigest()
