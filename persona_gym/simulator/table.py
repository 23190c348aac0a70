"""``TableRater``: simulated users rated by a collaborative-filtering table, no language model.

A :class:`~persona_gym.simulator.rater.Rater` over an artifacts directory's tables (catalogue, profiles,
logged interactions, item embeddings, personas). Its expected rating of item ``i`` for user
``u`` after a short-term window ``W`` is

    mu(u, i, W) = clip(m_i + b_u + window_weight * mean_{(j, r) in W} (r - m_j - b_u), 1, 5)

with ``m_i`` the catalogue's training mean of item ``i`` and ``b_u`` the user's shrunk mean
deviation from the items' means over their logged ratings; the distribution over 1..5 is a
normal of standard deviation ``spread`` around ``mu``, discretised and normalised. It costs
microseconds, needs no adapters, and depends on the window, so the environment's memory rules
stay visible: fast tests of everything above the rater use it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from persona_gym.catalog import ItemCatalog
from persona_gym.ratings import RATING_VALUES, clip
from persona_gym.simulator.memory import Interaction, logged_history, short_term_window

__all__ = ["TableRater"]


class TableRater:
    """Users rated from their logged ratings' biases (see the module docstring).

    Args:
        catalog: the items (their ``mean_rating`` is ``m_i``).
        item_embeddings: ``(n_items, d)`` unit vectors in catalogue order.
        memories: the logged interactions (``user_id``, ``item_index``, ``rating``,
            ``timestamp``), e.g. an artifacts directory's ``memories.parquet``.
        profiles: ``user_id -> Ms`` text; its keys are the simulated users.
        personas: ``user_id -> persona`` (users without one get -1).
        window_size: the short-term window read per rating.
        spread: standard deviation of the rating around its expected value (> 0).
        window_weight: how much of the window's mean residual carries into the next rating.
        shrinkage: pseudo-ratings pulling a user's bias toward 0.
        source: what the users come from (messages).
    """

    def __init__(
        self,
        catalog: ItemCatalog,
        item_embeddings: np.ndarray,
        memories: pd.DataFrame,
        profiles: Mapping[int, str],
        personas: Mapping[int, int] | None = None,
        window_size: int = 3,
        spread: float = 0.8,
        window_weight: float = 0.5,
        shrinkage: float = 5.0,
        source: str = "table",
    ):
        if spread <= 0:
            raise ValueError(f"TableRater.spread must be > 0, got {spread}")
        if window_size < 0:
            raise ValueError(f"TableRater.window_size must be >= 0, got {window_size}")
        self._catalog = catalog
        self._embeddings = np.asarray(item_embeddings, dtype=np.float32)
        self._memories = memories
        self._profiles = {int(u): str(p) for u, p in profiles.items()}
        self._personas = {int(u): int(p) for u, p in (personas or {}).items()}
        self._window_size = int(window_size)
        self.spread, self.window_weight, self._source = float(spread), float(window_weight), source
        means = np.asarray(catalog.mean_rating, dtype=np.float64)
        rows = memories[memories["user_id"].isin(list(self._profiles))]
        residual = rows["rating"].to_numpy(dtype=np.float64) - means[rows["item_index"].to_numpy()]
        sums = (
            pd.Series(residual, index=rows["user_id"].to_numpy())
            .groupby(level=0)
            .agg(["sum", "size"])
        )
        self.user_bias = {
            int(u): float(s / (n + shrinkage))
            for u, s, n in zip(sums.index, sums["sum"], sums["size"], strict=True)
        }

    @classmethod
    def from_artifacts(cls, root: str | Path, **kwargs) -> TableRater:
        """The tables of an artifacts directory (no manifest or adapters needed); the window
        size is the manifest's prompt's when there is one."""
        from persona_gym.artifacts import load_personas, load_tables

        root = Path(root)
        catalog, profiles, memories, embeddings = load_tables(root)
        manifest = root / "manifest.json"
        if "window_size" not in kwargs and manifest.is_file():
            kwargs["window_size"] = int(json.loads(manifest.read_text())["prompt"]["window_size"])
        personas = load_personas(root) if (root / "personas.json").is_file() else {}
        return cls(catalog, embeddings, memories, profiles, personas, source=str(root), **kwargs)

    # -- the Rater protocol ---------------------------------------------------------------------
    @property
    def source(self) -> str:
        return self._source

    @property
    def catalog(self) -> ItemCatalog:
        return self._catalog

    @property
    def item_embeddings(self) -> np.ndarray:
        return self._embeddings

    @property
    def user_ids(self) -> list[int]:
        return sorted(self._profiles)

    @property
    def training_user_ids(self) -> list[int]:
        return self.user_ids

    @property
    def window_size(self) -> int:
        return self._window_size

    def profile(self, user_id: int) -> str:
        return self._profiles[int(user_id)]

    def persona(self, user_id: int) -> int:
        return self._personas.get(int(user_id), -1)

    def history(self, user_id: int) -> tuple[Interaction, ...]:
        return logged_history(self._memories, user_id)

    def expected_rating(self, user_id: int, item: int, window: Sequence[Interaction] = ()) -> float:
        """``mu(u, i, W)`` of the module docstring."""
        if int(user_id) not in self._profiles:
            raise KeyError(f"user {user_id} is not a simulated user of {self._source}")
        if not 0 <= item < len(self._catalog):
            raise IndexError(f"item {item} is outside the catalogue (0..{len(self._catalog) - 1})")
        means, bias = self._catalog.mean_rating, self.user_bias.get(int(user_id), 0.0)
        mu = float(means[item]) + bias
        window = short_term_window(tuple(window), self._window_size)
        if window:
            mu += self.window_weight * float(
                np.mean([x.rating - means[x.item_index] - bias for x in window])
            )
        return float(clip(mu))

    def rate(
        self,
        user_ids: Sequence[int],
        items: Sequence[int],
        windows: Sequence[Sequence[Interaction]] | None = None,
    ) -> np.ndarray:
        windows = windows if windows is not None else [()] * len(user_ids)
        mu = np.array(
            [
                self.expected_rating(int(u), int(i), w)
                for u, i, w in zip(user_ids, items, windows, strict=True)
            ]
        )
        logits = -((RATING_VALUES[None, :] - mu[:, None]) ** 2) / (2 * self.spread**2)
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        return probs / probs.sum(axis=1, keepdims=True)
