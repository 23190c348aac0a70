"""The dataset every MovieLens loader returns: :class:`RatingsDataset`, its schema and titles.

Schema (whatever the source format):

* ``ratings``: ``user_id``, ``item_id``, ``rating`` (1..5), ``timestamp`` (all ``int64``),
  sorted by ``(user_id, timestamp, item_id)`` with a ``RangeIndex``.
* ``users``: ``user_id`` (int64), ``gender`` ("M"/"F"), ``age`` (int64; ML-100k: years,
  ML-1M: the bucket code 1/18/25/35/45/50/56), ``occupation`` (a name, ML-1M codes are mapped
  to their documented names), ``zip``.
* ``items``: ``item_id`` (int64), ``title`` (the year suffix removed and a trailing article
  moved to the front: "Big Lebowski, The (1998)" -> "The Big Lebowski"), ``year`` (nullable
  ``Int64``), ``genres`` (a tuple of genre names; ML-100k's "unknown" flag gives ``()``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from persona_gym.ratings import MAX_RATING, MIN_RATING

__all__ = [
    "ITEMS_COLUMNS",
    "ML1M_OCCUPATIONS",
    "ML100K_GENRES",
    "RATINGS_COLUMNS",
    "USERS_COLUMNS",
    "RatingsDataset",
    "build_items",
    "normalize_title",
    "release_year",
]

RATINGS_COLUMNS: tuple[str, ...] = ("user_id", "item_id", "rating", "timestamp")
USERS_COLUMNS: tuple[str, ...] = ("user_id", "gender", "age", "occupation", "zip")
ITEMS_COLUMNS: tuple[str, ...] = ("item_id", "title", "year", "genres")

#: ML-100k genre flag order in ``u.item`` (and ``u.genre``).
ML100K_GENRES: tuple[str, ...] = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

#: ML-1M occupation codes, as documented in the ML-1M README.
ML1M_OCCUPATIONS: dict[int, str] = {
    0: "other", 1: "academic/educator", 2: "artist", 3: "clerical/admin",
    4: "college/grad student", 5: "customer service", 6: "doctor/health care",
    7: "executive/managerial", 8: "farmer", 9: "homemaker", 10: "K-12 student", 11: "lawyer",
    12: "programmer", 13: "retired", 14: "sales/marketing", 15: "scientist",
    16: "self-employed", 17: "technician/engineer", 18: "tradesman/craftsman",
    19: "unemployed", 20: "writer",
}  # fmt: skip


@dataclass(frozen=True, eq=False)
class RatingsDataset:
    """A validated MovieLens-style dataset (see the module docstring for the schema).

    ``name`` is for display (a known name or the folder's name); ``source`` is what
    :func:`~persona_gym.data.load_dataset` finds the same files by from any working folder: a
    known name (``"ml-100k"``, ``"ml-1m"``: the data folder or the bundled copy) or the folder's
    absolute path. Artifacts record it in ``split.json``; empty for a dataset built in memory.
    """

    name: str
    ratings: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame
    source: str = ""

    def summary(self) -> dict:
        """Counts, rating histogram, density and time range, as plain Python values."""
        r = self.ratings
        n_users, n_items = len(self.users), len(self.items)
        hist = r["rating"].value_counts().reindex(range(MIN_RATING, MAX_RATING + 1), fill_value=0)
        t_min = int(r["timestamp"].min()) if len(r) else None
        t_max = int(r["timestamp"].max()) if len(r) else None

        def iso(t: int | None) -> str | None:
            return None if t is None else datetime.fromtimestamp(t, UTC).isoformat()

        return {
            "name": self.name,
            "n_users": n_users,
            "n_items": n_items,
            "n_ratings": len(r),
            "n_rated_users": int(r["user_id"].nunique()),
            "n_rated_items": int(r["item_id"].nunique()),
            "rating_histogram": {int(k): int(v) for k, v in hist.items()},
            "mean_rating": float(r["rating"].mean()) if len(r) else None,
            "density": len(r) / (n_users * n_items) if n_users and n_items else 0.0,
            "timestamp_min": t_min,
            "timestamp_max": t_max,
            "time_min": iso(t_min),
            "time_max": iso(t_max),
        }

    def item_titles(self) -> dict[int, str]:
        """``{item_id: title}`` for every item."""
        return dict(zip(self.items["item_id"].tolist(), self.items["title"].tolist(), strict=True))


_YEAR_SUFFIX = re.compile(r"^(?P<title>.*?)\s*\((?P<year>\d{4})\)\s*(?:\(V\))?\s*$")
_ARTICLES = "The|A|An|Les|La|Le|L'|Il|Das|Der|Die|El|Los|Las"
_TRAILING_ARTICLE = re.compile(rf"^(?P<main>.+?), (?P<art>{_ARTICLES})(?P<rest>\s+\(.*\))?$")


def normalize_title(raw: str) -> tuple[str, int | None]:
    """Split a MovieLens title into ``(clean title, year or None)``.

    Removes the trailing ``(YYYY)`` (and ML-100k's ``(V)`` video tag) and moves a trailing
    article to the front of the main title: ``"Big Lebowski, The (1998)"`` ->
    ``("The Big Lebowski", 1998)``; ``"Postino, Il (1994)"`` -> ``("Il Postino", 1994)``.
    An alternative title in parentheses is kept as is.
    """
    title, year = raw.strip(), None
    m = _YEAR_SUFFIX.match(title)
    if m:
        title, year = m.group("title"), int(m.group("year"))
    m = _TRAILING_ARTICLE.match(title)
    if m:
        art = m.group("art")
        sep = "" if art.endswith("'") else " "
        title = f"{art}{sep}{m.group('main')}{m.group('rest') or ''}"
    return title, year


def build_items(
    ids: Sequence[int],
    raw_titles: Sequence[str],
    genres: Sequence[tuple[str, ...]],
    fallback_years: Sequence[int | None] | None = None,
) -> pd.DataFrame:
    titles, years = [], []
    for i, raw in enumerate(raw_titles):
        title, year = normalize_title(raw)
        if year is None and fallback_years is not None:
            year = fallback_years[i]
        titles.append(title)
        years.append(year)
    return pd.DataFrame({
        "item_id": np.asarray(ids, dtype=np.int64),
        "title": pd.Series(titles, dtype=object).astype(str),
        "year": pd.array(years, dtype="Int64"),
        "genres": pd.Series(list(genres), dtype=object),
    })  # fmt: skip


def release_year(date: object) -> int | None:
    """Year of an ML-100k release date like ``01-Jan-1995``; None when missing."""
    if not isinstance(date, str):
        return None
    m = re.search(r"(\d{4})\s*$", date)
    return int(m.group(1)) if m else None
