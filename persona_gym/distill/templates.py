"""The deterministic data distiller: traits rendered with templates into ``Ms`` and ``Ml``.

:class:`DataDistiller` is the offline default of ``persona-gym distill`` and what rebuilds a
shipped simulator's tables on first use (the same texts the adapters were trained on).
"""

from __future__ import annotations

from collections.abc import Iterable

from persona_gym.catalog import ItemCatalog
from persona_gym.distill.memories import UserMemories, memories_frame, select_users, training_rows
from persona_gym.distill.traits import DataDistillerConfig, compute_traits

__all__ = ["DataDistiller", "memory_text", "profile_text"]

_LIKERT = {1: "hated it", 2: "disliked it", 3: "found it so-so", 4: "liked it", 5: "loved it"}


def profile_text(traits: dict) -> str:
    """The data distiller's ``Ms``: second person, after the paper's "PERSONA:" framing.

    ``"PERSONA: You are a 53-year-old male (lawyer). You rate generously: mean 4.2 vs 3.6
    typical, narrow spread. Above your mean: Film-Noir 4.8 (5 films), Crime 4.5 (12). Below:
    Comedy 4.0 (24 films). Mostly Drama, Comedy, 1990s films; best decade 1940s (4.7). Heavy
    viewer (110 ratings), broad taste, balanced vs crowd averages."``
    """
    t = traits
    who = [{"M": "male", "F": "female"}.get(t.get("gender") or "", "viewer")]
    age = str(t.get("age") or "")
    if age.isdigit():  # ML-100k: an age; ML-1M: a bin such as "25-34"
        who.insert(0, f"{age}-year-old")
    elif age:
        who.append(f"aged {age}")
    if t.get("occupation"):
        who.append(f"({t['occupation']})")
    parts = [f"PERSONA: You are a {' '.join(who)}."]
    tendency = {"generous": "generously", "harsh": "harshly", "average": "about average"}
    parts.append(
        f"You rate {tendency[t['tendency']]}: mean {t['mean']:.1f} vs {t['reference_mean']:.1f} "
        f"typical, {t['spread']} spread."
    )

    def listing(entries: list[dict]) -> str:
        items = [f"{g['genre']} {g['mean']:.1f} ({g['n']})" for g in entries]
        if items:
            items[0] = items[0][:-1] + " films)"
        return ", ".join(items)

    if t["likes"]:
        parts.append(f"Above your mean: {listing(t['likes'])}.")
    if t["dislikes"]:
        parts.append(f"Below: {listing(t['dislikes'])}.")
    era = f"Mostly {', '.join(t['top_genres'][:2])}"
    if t["main_decade"]:
        era += f", {t['main_decade']}s films"
    if t["best_decade"] and t["best_decade"] != t["main_decade"]:
        era += f"; best decade {t['best_decade']}s ({t['best_decade_mean']:.1f})"
    parts.append(era + ".")
    conformity = {
        "follows the crowd": "follows crowd averages",
        "balanced": "balanced vs crowd averages",
        "independent": "independent of crowd averages",
    }[t["conformity"]]
    parts.append(
        f"{t['activity'].capitalize()} viewer ({t['n_ratings']} ratings), {t['diversity']} "
        f"taste, {conformity}."
    )
    return " ".join(parts)


def memory_text(
    catalog: ItemCatalog, item_index: int, rating: float, traits: dict, config: DataDistillerConfig
) -> str:
    """The data distiller's ``Ml`` for one interaction: item, rating and a first-person reason."""
    r = int(round(float(rating)))
    genres = catalog.genres[item_index]
    crowd = float(catalog.mean_rating[item_index])
    text = f"I rated {catalog.title_year(item_index)} {r}/5"
    if genres:
        text += f" ({'/'.join(genres)})"
    clauses = [_LIKERT.get(r, f"gave {r}")]
    stats = [
        (g, traits["genres"][g]["mean"] - traits["mean"])
        for g in genres
        if g in traits["genres"] and traits["genres"][g]["n"] >= 2
    ]
    if stats:
        pick = max if r >= traits["mean"] else min
        genre, delta = pick(stats, key=lambda s: s[1])
        if delta >= config.margin:
            clauses.append(f"I usually rate {genre} above my average")
        elif delta <= -config.margin:
            clauses.append(f"I usually rate {genre} below my average")
    diff = r - crowd
    if abs(diff) < config.crowd_margin:
        clauses.append(f"close to the crowd ({crowd:.1f})")
    else:
        clauses.append(f"{'above' if diff > 0 else 'below'} the crowd ({crowd:.1f})")
    return f"{text}: {'; '.join(clauses)}."


class DataDistiller:
    """Deterministic distiller: statistics of the training history rendered with templates."""

    name = "data"

    def __init__(
        self, config: DataDistillerConfig | None = None, user_ids: Iterable[int] | None = None
    ) -> None:
        """``user_ids`` limits the users distilled (default: all of the split's users)."""
        self.config = config or DataDistillerConfig()
        self.user_ids = None if user_ids is None else sorted(int(u) for u in user_ids)

    @property
    def identity(self) -> str:
        return f"data:{self.config}"

    def distill(self, dataset, split, catalog: ItemCatalog) -> UserMemories:
        traits = compute_traits(dataset, split, catalog, self.config)
        users = select_users(traits, self.user_ids)
        rows = training_rows(split, catalog)
        rows = rows[rows["user_id"].isin(users)].reset_index(drop=True)
        texts = [
            memory_text(catalog, int(i), float(r), traits[int(u)], self.config)
            for u, i, r in zip(rows["user_id"], rows["item_index"], rows["rating"], strict=True)
        ]
        memories = memories_frame(rows, texts)
        return UserMemories(
            {u: profile_text(traits[u]) for u in users}, {u: traits[u] for u in users}, memories
        )
