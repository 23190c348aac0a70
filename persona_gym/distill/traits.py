"""The statistics behind a profile: each user's traits from their training interactions.

Shared by both distillers (the data distiller's templates and the LLM distiller's fallbacks).
Reference values ("typical user") come from training + background ratings, never test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from persona_gym.catalog import ItemCatalog
from persona_gym.distill.memories import training_rows
from persona_gym.ratings import MAX_RATING, MIN_RATING

__all__ = ["DataDistillerConfig", "compute_traits"]

# ML-1M stores age bucket codes; ML-100k stores ages.
_ML1M_AGE_BUCKETS = {
    1: "under 18",
    18: "18-24",
    25: "25-34",
    35: "35-44",
    45: "45-49",
    50: "50-55",
    56: "56+",
}


@dataclass(frozen=True)
class DataDistillerConfig:
    """Thresholds of the data distiller's statistics and templates."""

    min_count: int = 3  # ratings a genre or decade needs before it can be a like/dislike
    margin: float = 0.25  # |genre mean - user mean| needed to call a genre a like/dislike
    max_likes: int = 3  # liked genres named in Ms
    max_dislikes: int = 2  # disliked genres named in Ms
    crowd_margin: float = 0.75  # |rating - item average| above which Ml says the user disagreed

    def __post_init__(self) -> None:
        if self.min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {self.min_count}")
        if self.margin < 0 or self.crowd_margin < 0:
            raise ValueError(f"margins must be >= 0, got {self.margin}, {self.crowd_margin}")


def _r(x: float, nd: int = 2) -> float:
    return float(round(float(x), nd))


def _tertile_label(value: float, cuts: tuple[float, float], labels: tuple[str, str, str]) -> str:
    return labels[0] if value < cuts[0] else labels[1] if value < cuts[1] else labels[2]


def compute_traits(
    dataset, split, catalog: ItemCatalog, config: DataDistillerConfig | None = None
) -> dict[int, dict]:
    """Per-user statistics from the split's training rows (and training-only item averages).

    Reference values ("typical user") come from training + background ratings, never test.
    Activity and diversity labels are tertiles over the split's selected users.
    """
    config = config or DataDistillerConfig()
    rows = training_rows(split, catalog)
    known = pd.concat([split.train, split.background], ignore_index=True)
    per_user = known.groupby("user_id")["rating"].agg(["mean", "std"])
    ref_mean = float(per_user["mean"].mean())
    ref_std = float(per_user["std"].median())
    n_all_genres = max(2, len({g for gs in catalog.genres for g in gs}))
    users = dataset.users.set_index("user_id") if len(dataset.users) else None
    ages = set(dataset.users["age"].dropna().astype(int)) if len(dataset.users) else set()
    age_codes = bool(ages) and ages <= set(_ML1M_AGE_BUCKETS)

    raw: dict[int, dict] = {}
    for user_id, group in rows.groupby("user_id", sort=True):
        raw[int(user_id)] = _user_traits(group, catalog, config, n_all_genres)
    if not raw:
        return {}
    # the cuts come from the selected users, so that other simulated users do not move them
    selected = {int(u) for u in split.user_ids}
    cut_users = [t for u, t in raw.items() if u in selected] or list(raw.values())
    counts = np.array([t["n_ratings"] for t in cut_users], dtype=float)
    entropies = np.array([t["genre_entropy"] for t in cut_users], dtype=float)
    n_low, n_high = (float(x) for x in np.quantile(counts, [1 / 3, 2 / 3]))
    e_low, e_high = (float(x) for x in np.quantile(entropies, [1 / 3, 2 / 3]))
    n_cuts, e_cuts = (n_low, n_high), (e_low, e_high)

    traits: dict[int, dict] = {}
    for user_id, t in raw.items():
        t["reference_mean"] = _r(ref_mean)
        t["reference_std"] = _r(ref_std)
        dm, ds = t["mean"] - ref_mean, t["std"] - ref_std
        t["tendency"] = "generous" if dm > 0.3 else "harsh" if dm < -0.3 else "average"
        t["spread"] = "wide" if ds > 0.2 else "narrow" if ds < -0.2 else "usual"
        t["activity"] = _tertile_label(t["n_ratings"], n_cuts, ("occasional", "regular", "heavy"))
        t["diversity"] = _tertile_label(t["genre_entropy"], e_cuts, ("narrow", "moderate", "broad"))
        corr = t["crowd_corr"]
        t["conformity"] = (
            "follows the crowd" if corr >= 0.5 else "balanced" if corr >= 0.25 else "independent"
        )
        if users is not None and user_id in users.index:
            u = users.loc[user_id]
            t["gender"] = None if pd.isna(u.get("gender")) else str(u["gender"])
            age = u.get("age")
            t["age"] = (
                None
                if pd.isna(age)
                else (_ML1M_AGE_BUCKETS[int(age)] if age_codes else str(int(age)))
            )
            occ = u.get("occupation")
            t["occupation"] = None if pd.isna(occ) or str(occ) in ("none", "other") else str(occ)
        traits[user_id] = t
    return traits


def _user_traits(
    group: pd.DataFrame, catalog: ItemCatalog, config: DataDistillerConfig, n_all_genres: int
) -> dict:
    ratings = group["rating"].to_numpy(dtype=float)
    idx = group["item_index"].to_numpy()
    crowd = group["item_mean"].to_numpy(dtype=float)
    mean = float(ratings.mean())
    std = float(ratings.std())
    ts = group["timestamp"].to_numpy()

    genre_rows = [(g, r) for i, r in zip(idx, ratings, strict=True) for g in catalog.genres[i]]
    gframe = pd.DataFrame(genre_rows, columns=["genre", "rating"])
    gstats = gframe.groupby("genre")["rating"].agg(n="size", mean="mean").sort_index()
    genres = {str(g): {"n": int(s["n"]), "mean": _r(s["mean"])} for g, s in gstats.iterrows()}
    eligible = gstats[gstats["n"] >= config.min_count].assign(delta=lambda d: d["mean"] - mean)
    # ties broken by count then name, so the order is deterministic
    ordered = eligible.reset_index().sort_values(
        ["delta", "n", "genre"], ascending=[False, False, True]
    )
    likes = [_genre_entry(r) for r in ordered.itertuples() if r.delta >= config.margin]
    dislikes = [_genre_entry(r) for r in ordered[::-1].itertuples() if r.delta <= -config.margin]
    top = gstats.reset_index().sort_values(["n", "genre"], ascending=[False, True])
    shares = gstats["n"].to_numpy(dtype=float) / max(1, gstats["n"].sum())
    entropy = (
        float(-(shares * np.log(shares)).sum() / math.log(n_all_genres)) if len(shares) else 0.0
    )

    years = np.array([catalog.years[i] if catalog.years[i] is not None else -1 for i in idx])
    dframe = pd.DataFrame({"decade": years // 10 * 10, "rating": ratings})[years > 0]
    dstats = dframe.groupby("decade")["rating"].agg(n="size", mean="mean").sort_index()
    main_decade = (
        int(dstats.sort_values("n", ascending=False, kind="stable").index[0])
        if len(dstats)
        else None
    )
    d_elig = dstats[dstats["n"] >= config.min_count]
    best = d_elig[d_elig["mean"] - mean >= config.margin].sort_values(
        "mean", ascending=False, kind="stable"
    )
    best_decade = int(best.index[0]) if len(best) else None
    old_share = float((years[years > 0] < 1980).mean()) if (years > 0).any() else 0.0

    corr = (
        float(np.corrcoef(ratings, crowd)[0, 1]) if ratings.std() > 0 and crowd.std() > 0 else 0.0
    )
    return {
        "n_ratings": len(ratings),
        "days_active": _r((ts.max() - ts.min()) / 86400, 1),
        "mean": _r(mean),
        "std": _r(std),
        "rating_counts": {
            str(k): int((ratings == k).sum()) for k in range(MIN_RATING, MAX_RATING + 1)
        },
        "genres": genres,
        "likes": likes[: config.max_likes],
        "dislikes": dislikes[: config.max_dislikes],
        "top_genres": [str(g) for g in top["genre"].head(3)],
        "genre_entropy": _r(entropy, 3),
        "decades": {
            str(int(d)): {"n": int(s["n"]), "mean": _r(s["mean"])} for d, s in dstats.iterrows()
        },
        "main_decade": main_decade,
        "best_decade": best_decade,
        "best_decade_mean": _r(best["mean"].iloc[0]) if len(best) else None,
        "pre1980_share": _r(old_share),
        "crowd_corr": _r(corr),
        "crowd_mad": _r(np.abs(ratings - crowd).mean()),
        "crowd_bias": _r((ratings - crowd).mean()),
    }


def _genre_entry(row) -> dict:
    return {"genre": str(row.genre), "mean": _r(row.mean), "n": int(row.n), "delta": _r(row.delta)}
