"""The item catalogue the simulated users see: ids, titles, genres and training-only averages.

One description of an item serves memories, prompts and the environment, so the text a user
model was trained on is the text it is asked about.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class ItemCatalog:
    """Items indexed 0..n-1 (the environment's action ids) with their descriptive fields.

    ``mean_rating`` and ``n_ratings`` come from training data only (``Split.item_stats``);
    items nobody rated in training have ``n_ratings == 0`` and the global training mean.
    """

    item_ids: np.ndarray  # int64, dataset item id of each index
    titles: tuple[str, ...]
    years: tuple[int | None, ...]
    genres: tuple[tuple[str, ...], ...]
    mean_rating: np.ndarray  # float64
    n_ratings: np.ndarray  # int64

    @classmethod
    def from_frames(cls, items: pd.DataFrame, item_stats: pd.DataFrame) -> ItemCatalog:
        """Build from ``RatingsDataset.items`` and ``Split.item_stats()`` (item_id, mean_rating, n_ratings)."""
        items = items.sort_values("item_id").reset_index(drop=True)
        stats = items[["item_id"]].merge(item_stats, on="item_id", how="left")
        rated = stats["n_ratings"].fillna(0).to_numpy(dtype=np.int64)
        means = stats["mean_rating"].to_numpy(dtype=np.float64)
        weights = rated[rated > 0]
        global_mean = float(np.average(means[rated > 0], weights=weights)) if weights.size else 3.0
        means = np.where(rated > 0, means, global_mean)
        years = tuple(None if pd.isna(y) else int(y) for y in items["year"])
        return cls(
            item_ids=items["item_id"].to_numpy(dtype=np.int64),
            titles=tuple(str(t) for t in items["title"]),
            years=years,
            genres=tuple(tuple(g) for g in items["genres"]),
            mean_rating=means,
            n_ratings=rated,
        )

    def __len__(self) -> int:
        return len(self.item_ids)

    def indices_of(self, item_ids) -> np.ndarray:
        """Catalogue indices of many dataset item ids."""
        lookup = self._lookup()
        return np.array([lookup[int(i)] for i in item_ids], dtype=np.int64)

    def _lookup(self) -> dict[int, int]:
        cached = self.__dict__.get("_lookup_cache")
        if cached is None:
            cached = {int(i): n for n, i in enumerate(self.item_ids)}
            object.__setattr__(self, "_lookup_cache", cached)
        return cached

    def title_year(self, index: int) -> str:
        """``"Toy Story (1995)"``."""
        year = self.years[index]
        return f"{self.titles[index]} ({year})" if year is not None else self.titles[index]

    def describe(self, index: int) -> str:
        """One-line description used in every prompt and memory.

        ``"Toy Story (1995); Animation, Children's, Comedy; average rating 3.88 from 452 ratings"``
        """
        genres = ", ".join(self.genres[index]) or "unknown genre"
        count = int(self.n_ratings[index])
        if count:
            avg = f"average rating {self.mean_rating[index]:.2f} from {count} ratings"
        else:
            avg = "no ratings yet"
        return f"{self.title_year(index)}; {genres}; {avg}"

    def to_frame(self) -> pd.DataFrame:
        """The catalogue as a table (for the artifacts directory)."""
        return pd.DataFrame(
            {
                "item_id": self.item_ids,
                "title": list(self.titles),
                "year": pd.array(list(self.years), dtype="Int64"),
                "genres": [list(g) for g in self.genres],
                "mean_rating": self.mean_rating,
                "n_ratings": self.n_ratings,
            }
        )

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> ItemCatalog:
        """Inverse of ``to_frame``."""
        return cls(
            item_ids=frame["item_id"].to_numpy(dtype=np.int64),
            titles=tuple(str(t) for t in frame["title"]),
            years=tuple(None if pd.isna(y) else int(y) for y in frame["year"]),
            genres=tuple(tuple(g) for g in frame["genres"]),
            mean_rating=frame["mean_rating"].to_numpy(dtype=np.float64),
            n_ratings=frame["n_ratings"].to_numpy(dtype=np.int64),
        )
