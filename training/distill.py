"""Stage 1: distil each user's training history into text memories (paper §3.2).

For every user of a split, from the *training* interactions only (plus item averages from
``Split.item_stats``, which exclude test):

* ``Ms``, the profile: general traits (rating tendency and spread, genre likes and dislikes with
  evidence, era, activity, conformity, diversity, demographics), short enough to be a system
  prompt;
* ``Ml``, one enriched memory per training interaction: the item and a first-person reason.

Backends behind :class:`Distiller`:

* :class:`DataDistiller`, deterministic statistics + templates (the offline default);
* :class:`LLMDistiller`, the paper's hierarchical self-reflection with a chat backend
  (:mod:`training.chat`): chronological batches of at most 10 interactions; after each batch the
  model writes a reason per interaction and an updated profile. Per-user results are cached on
  disk under a content hash, so a killed run resumes where it stopped.

``persona-gym distill`` writes the artifacts directory (see :func:`write_artifacts`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

from persona_gym.catalog import ItemCatalog
from persona_gym.io import atomic_write, atomic_write_json, atomic_write_parquet, atomic_write_text

log = logging.getLogger(__name__)

__all__ = [
    "DataDistiller",
    "DataDistillerConfig",
    "Distiller",
    "LLMDistiller",
    "LLMDistillerConfig",
    "UserMemories",
    "compute_traits",
    "write_artifacts",
]

MEMORY_COLUMNS = ["user_id", "item_id", "item_index", "rating", "timestamp", "text"]
PROMPT_VERSION = "v1"
# ML-1M stores age bucket codes; ML-100k stores ages.
_ML1M_AGE_BUCKETS = {1: "under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49",
                     50: "50-55", 56: "56+"}
_LIKERT = {1: "hated it", 2: "disliked it", 3: "found it so-so", 4: "liked it", 5: "loved it"}


# --------------------------------------------------------------------------------------------
# Result and interface
# --------------------------------------------------------------------------------------------


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
            json.dumps({"user_id": u, "text": self.profiles[u], "traits": self.traits[u]},
                       sort_keys=False)
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


# --------------------------------------------------------------------------------------------
# Traits (shared by both backends)
# --------------------------------------------------------------------------------------------


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


def _training_rows(split, catalog: ItemCatalog) -> pd.DataFrame:
    """The split's training rows, sorted by user then time, with catalogue index and avg."""
    train = split.train.sort_values(["user_id", "timestamp", "item_id"], kind="stable")
    train = train.reset_index(drop=True)
    index = catalog.indices_of(train["item_id"].to_numpy())
    return train.assign(item_index=index, item_mean=catalog.mean_rating[index])


def _tertile_label(value: float, cuts: tuple[float, float], labels: tuple[str, str, str]) -> str:
    return labels[0] if value < cuts[0] else labels[1] if value < cuts[1] else labels[2]


def compute_traits(dataset, split, catalog: ItemCatalog,
                   config: DataDistillerConfig | None = None) -> dict[int, dict]:
    """Per-user statistics from the split's training rows (and training-only item averages).

    Reference values ("typical user") come from training + background ratings, never test.
    Activity and diversity labels are tertiles over the split's users.
    """
    config = config or DataDistillerConfig()
    rows = _training_rows(split, catalog)
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
    counts = np.array([t["n_ratings"] for t in raw.values()], dtype=float)
    entropies = np.array([t["genre_entropy"] for t in raw.values()], dtype=float)
    n_cuts = tuple(float(x) for x in np.quantile(counts, [1 / 3, 2 / 3]))
    e_cuts = tuple(float(x) for x in np.quantile(entropies, [1 / 3, 2 / 3]))

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
        t["conformity"] = ("follows the crowd" if corr >= 0.5 else "balanced" if corr >= 0.25
                           else "independent")
        if users is not None and user_id in users.index:
            u = users.loc[user_id]
            t["gender"] = None if pd.isna(u.get("gender")) else str(u["gender"])
            age = u.get("age")
            t["age"] = None if pd.isna(age) else (
                _ML1M_AGE_BUCKETS[int(age)] if age_codes else str(int(age)))
            occ = u.get("occupation")
            t["occupation"] = None if pd.isna(occ) or str(occ) in ("none", "other") else str(occ)
        traits[user_id] = t
    return traits


def _user_traits(group: pd.DataFrame, catalog: ItemCatalog, config: DataDistillerConfig,
                 n_all_genres: int) -> dict:
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
    ordered = eligible.reset_index().sort_values(["delta", "n", "genre"],
                                                 ascending=[False, False, True])
    likes = [_genre_entry(r) for r in ordered.itertuples() if r.delta >= config.margin]
    dislikes = [_genre_entry(r) for r in ordered[::-1].itertuples() if r.delta <= -config.margin]
    top = gstats.reset_index().sort_values(["n", "genre"], ascending=[False, True])
    shares = gstats["n"].to_numpy(dtype=float) / max(1, gstats["n"].sum())
    entropy = float(-(shares * np.log(shares)).sum() / math.log(n_all_genres)) if len(shares) else 0.0

    years = np.array([catalog.years[i] if catalog.years[i] is not None else -1 for i in idx])
    dframe = pd.DataFrame({"decade": years // 10 * 10, "rating": ratings})[years > 0]
    dstats = dframe.groupby("decade")["rating"].agg(n="size", mean="mean").sort_index()
    main_decade = int(dstats.sort_values("n", ascending=False, kind="stable").index[0]) \
        if len(dstats) else None
    d_elig = dstats[dstats["n"] >= config.min_count]
    best = d_elig[d_elig["mean"] - mean >= config.margin].sort_values(
        "mean", ascending=False, kind="stable")
    best_decade = int(best.index[0]) if len(best) else None
    old_share = float((years[years > 0] < 1980).mean()) if (years > 0).any() else 0.0

    corr = float(np.corrcoef(ratings, crowd)[0, 1]) if ratings.std() > 0 and crowd.std() > 0 else 0.0
    return {
        "n_ratings": len(ratings),
        "days_active": _r((ts.max() - ts.min()) / 86400, 1),
        "mean": _r(mean),
        "std": _r(std),
        "rating_counts": {str(k): int((ratings == k).sum()) for k in range(1, 6)},
        "genres": genres,
        "likes": likes[: config.max_likes],
        "dislikes": dislikes[: config.max_dislikes],
        "top_genres": [str(g) for g in top["genre"].head(3)],
        "genre_entropy": _r(entropy, 3),
        "decades": {str(int(d)): {"n": int(s["n"]), "mean": _r(s["mean"])} for d, s in dstats.iterrows()},
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


# --------------------------------------------------------------------------------------------
# Data distiller
# --------------------------------------------------------------------------------------------


def profile_text(traits: dict) -> str:
    """The data distiller's ``Ms``: second person, after the paper's "PERSONA:" framing.

    ``"PERSONA: You are a 53-year-old male (lawyer). You rate generously: mean 4.2 vs 3.6
    typical, narrow spread. Above your mean: Film-Noir 4.8 (5 films), Crime 4.5 (12). Below:
    Comedy 4.0 (24 films). Mostly Drama, Comedy, 1990s films; best decade 1940s (4.7). Heavy
    viewer (110 ratings), broad taste, balanced vs crowd averages."``
    """
    t = traits
    who = []
    if t.get("age"):
        who.append(f"{t['age']}-year-old" if t["age"].isdigit() else f"aged {t['age']}")
    who.append({"M": "male", "F": "female"}.get(t.get("gender") or "", "viewer"))
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
    conformity = {"follows the crowd": "follows crowd averages",
                  "balanced": "balanced vs crowd averages",
                  "independent": "independent of crowd averages"}[t["conformity"]]
    parts.append(
        f"{t['activity'].capitalize()} viewer ({t['n_ratings']} ratings), {t['diversity']} "
        f"taste, {conformity}."
    )
    return " ".join(parts)


def memory_text(catalog: ItemCatalog, item_index: int, rating: float, traits: dict,
                config: DataDistillerConfig) -> str:
    """The data distiller's ``Ml`` for one interaction: item, rating and a first-person reason."""
    r = int(round(float(rating)))
    genres = catalog.genres[item_index]
    crowd = float(catalog.mean_rating[item_index])
    text = f"I rated {catalog.title_year(item_index)} {r}/5"
    if genres:
        text += f" ({'/'.join(genres)})"
    clauses = [_LIKERT.get(r, f"gave {r}")]
    stats = [(g, traits["genres"][g]["mean"] - traits["mean"]) for g in genres
             if g in traits["genres"] and traits["genres"][g]["n"] >= 2]
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

    def __init__(self, config: DataDistillerConfig | None = None,
                 user_ids: Iterable[int] | None = None) -> None:
        """``user_ids`` limits the users distilled (default: all of the split's users)."""
        self.config = config or DataDistillerConfig()
        self.user_ids = None if user_ids is None else sorted(int(u) for u in user_ids)

    @property
    def identity(self) -> str:
        return f"data:{self.config}"

    def distill(self, dataset, split, catalog: ItemCatalog) -> UserMemories:
        traits = compute_traits(dataset, split, catalog, self.config)
        users = _selected(traits, self.user_ids)
        rows = _training_rows(split, catalog)
        rows = rows[rows["user_id"].isin(users)].reset_index(drop=True)
        texts = [
            memory_text(catalog, int(i), float(r), traits[int(u)], self.config)
            for u, i, r in zip(rows["user_id"], rows["item_index"], rows["rating"], strict=True)
        ]
        memories = _memories_frame(rows, texts)
        return UserMemories({u: profile_text(traits[u]) for u in users},
                            {u: traits[u] for u in users}, memories)


def _selected(traits: dict[int, dict], user_ids: list[int] | None) -> list[int]:
    if user_ids is None:
        return sorted(traits)
    unknown = [u for u in user_ids if u not in traits]
    if unknown:
        raise ValueError(f"users {unknown[:5]} have no training interactions in this split")
    return user_ids


def _memories_frame(rows: pd.DataFrame, texts: list[str]) -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": rows["user_id"].to_numpy(dtype=np.int64),
        "item_id": rows["item_id"].to_numpy(dtype=np.int64),
        "item_index": rows["item_index"].to_numpy(dtype=np.int64),
        "rating": rows["rating"].to_numpy(dtype=np.float64),
        "timestamp": rows["timestamp"].to_numpy(dtype=np.int64),
        "text": pd.array(texts, dtype=object),
    })


# --------------------------------------------------------------------------------------------
# LLM distiller (hierarchical self-reflection)
# --------------------------------------------------------------------------------------------

_SYSTEM = ("You study one person's movie ratings and explain them in the first person, as that "
           "person. Be brief and concrete.")
# Generated text is refused (the data distiller's text is used instead) when it carries chat
# markup or special tokens, or addresses the rating model instead of describing a taste.
_MARKUP = re.compile(r"<\|[^<>|]{0,40}\|>|</?s>|\[/?INST\]|<</?SYS>>|<\|?(?:im_start|im_end|endoftext)"
                     r"|^\s*(?:system|assistant|user)\s*:", re.IGNORECASE | re.MULTILINE)
_INJECTION = re.compile(
    r"\b(?:ignore|disregard|forget|override)\b.{0,40}\b(?:instructions?|prompts?|rules|above|previous)\b"
    r"|\b(?:new|updated|real) instructions?\b|\bsystem prompt\b|\byou are now\b|\bas an ai\b"
    r"|\b(?:always|only)\s+(?:answer|rate|reply|respond|say|output)\b"
    r"|\b(?:answer|reply|respond|output)\s+(?:with\s+)?(?:only\s+)?(?:a\s+|the\s+)?[1-5]\b",
    re.IGNORECASE | re.DOTALL)
_LINE = re.compile(r"^\s*(?:\**)?(\d{1,2})\s*[.):\-]\s*(.+?)\s*$", re.MULTILINE)
_PROFILE = re.compile(r"PROFILE\s*:\s*(.+)", re.IGNORECASE | re.DOTALL)


_MAX_REASON_CHARS = 1000  # a generated reason or profile beyond this is cut (then to words)
_MAX_PROFILE_CHARS = 2000


@dataclass(frozen=True)
class LLMDistillerConfig:
    """Settings of the LLM distiller."""

    batch_size: int = 10  # interactions per reflection step (the paper: at most 10)
    max_profile_words: int = 90  # Ms is cut to this many words
    max_reason_words: int = 30  # each Ml reason is cut to this many words
    cache_dir: str | None = None  # per-user result cache; default <persona-gym cache>/distill
    progress: bool = True  # tqdm bar over users

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 10:
            raise ValueError(f"batch_size must be in 1..10, got {self.batch_size}")


def batch_prompt(profile: str, lines: list[str], config: LLMDistillerConfig) -> list[dict]:
    """The chat messages of one reflection step."""
    listing = "\n".join(f"{n}. {line}" for n, line in enumerate(lines, start=1))
    user = (
        f"My profile so far: {profile or 'none yet'}\n\n"
        f"My next ratings, oldest first (1 = hated, 5 = loved; avg = other viewers' average):\n"
        f"{listing}\n\n"
        f"For each movie write one line 'N. <why I gave that rating, one short sentence>'. "
        f"Then write 'PROFILE: <my updated movie taste, at most {config.max_profile_words} words>'."
    )
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


def accepted_text(text: str | None, limit: int) -> str | None:
    """A generated reason or profile fit to store, or None when it must be refused.

    Refused: chat markup or special tokens (``<|im_end|>``, ``[INST]``, ``system:`` lines) and
    text that addresses the rating model (``"ignore previous instructions"``, ``"always answer
    5"``). Kept text has control characters and newlines turned into single spaces and is cut to
    ``limit`` characters (prompts cut it again to ``FIELD_LIMITS``).
    """
    from persona_gym.simulator.prompts import clean_field

    if text is None:
        return None
    reason = "markup" if _MARKUP.search(text) else "instructions" if _INJECTION.search(text) else None
    if reason:
        log.warning("refused a distiller reply with %s: %r", reason, text[:80])
        return None
    text = " ".join(clean_field(text, len(text) + 1).split())
    return clean_field(text, limit) or None


def parse_reply(reply: str, n: int) -> tuple[list[str | None], str | None]:
    """Reasons for items 1..n (None where missing or refused by :func:`accepted_text`) and the
    profile (None if missing or refused)."""
    match = _PROFILE.search(reply)
    profile = match.group(1).strip() if match else None
    head = reply[: match.start()] if match else reply
    reasons: list[str | None] = [None] * n
    for m in _LINE.finditer(head):
        k = int(m.group(1))
        text = accepted_text(m.group(2).strip().strip("*").strip(), _MAX_REASON_CHARS)
        if 1 <= k <= n and reasons[k - 1] is None and text is not None and len(text) >= 3:
            reasons[k - 1] = text
    return reasons, accepted_text(profile or None, _MAX_PROFILE_CHARS)


def _words(text: str, limit: int) -> str:
    words = text.split()
    return " ".join(words[:limit]) + ("..." if len(words) > limit else "")


class LLMDistiller:
    """The paper's hierarchical self-reflection with any :class:`training.chat.ChatBackend`.

    Per user, interactions in time order are cut into batches of ``config.batch_size``; each
    step shows the model the current profile and the batch and asks for a reason per
    interaction (``Ml``) and the updated profile (``Ms``). Unparsable reasons fall back to the
    data distiller's text (counted in ``traits[u]["llm"]``); an unparsable profile keeps the
    previous one, and a user left with none gets the data distiller's profile.
    """

    name = "llm"

    def __init__(self, backend, config: LLMDistillerConfig | None = None,
                 user_ids: Iterable[int] | None = None,
                 data_config: DataDistillerConfig | None = None) -> None:
        self.backend = backend
        self.config = config or LLMDistillerConfig()
        self.data_config = data_config or DataDistillerConfig()
        self.user_ids = None if user_ids is None else sorted(int(u) for u in user_ids)

    @property
    def identity(self) -> str:
        return f"llm:{PROMPT_VERSION}:{self.backend.identity}"

    def cache_path(self) -> Path:
        if self.config.cache_dir is not None:
            return Path(self.config.cache_dir)
        from persona_gym.assets import cache_dir

        return cache_dir() / "distill"

    def distill(self, dataset, split, catalog: ItemCatalog) -> UserMemories:
        from tqdm.auto import tqdm

        traits = compute_traits(dataset, split, catalog, self.data_config)
        users = _selected(traits, self.user_ids)
        rows = _training_rows(split, catalog)
        rows = rows[rows["user_id"].isin(users)].reset_index(drop=True)
        identity = self.identity
        profiles: dict[int, str] = {}
        out_traits: dict[int, dict] = {}
        texts: list[str] = []
        for user_id in tqdm(users, desc="distil (llm)", unit="user",
                            disable=not self.config.progress):
            group = rows[rows["user_id"] == user_id]
            result = self._user(user_id, group, catalog, identity)
            # cached results may predate the checks of parse_reply
            result["reasons"] = [accepted_text(r, _MAX_REASON_CHARS) for r in result["reasons"]]
            result["profile"] = accepted_text(result["profile"], _MAX_PROFILE_CHARS)
            fallback = [memory_text(catalog, int(i), float(r), traits[user_id], self.data_config)
                        for i, r in zip(group["item_index"], group["rating"], strict=True)]
            user_texts = []
            for reason, i, r, fb in zip(result["reasons"], group["item_index"], group["rating"],
                                        fallback, strict=True):
                if reason is None:
                    user_texts.append(fb)
                else:
                    user_texts.append(f"I rated {catalog.title_year(int(i))} {int(r)}/5: "
                                      f"{_words(reason, self.config.max_reason_words)}")
            texts.extend(user_texts)
            profile = result["profile"]
            profiles[user_id] = (f"PERSONA: {_words(profile, self.config.max_profile_words)}"
                                 if profile else profile_text(traits[user_id]))
            out_traits[user_id] = dict(traits[user_id], llm={
                "backend": self.backend.identity,
                "prompt_version": PROMPT_VERSION,
                "n_batches": result["n_batches"],
                "reason_fallbacks": sum(x is None for x in result["reasons"]),
                "profile_fallbacks": result["profile_fallbacks"],
                "profile_from_data": profile is None,
            })
        n_fb = sum(t["llm"]["reason_fallbacks"] for t in out_traits.values())
        log.info("LLM distiller: %d users, %d memories, %d reasons fell back to templates",
                 len(users), len(texts), n_fb)
        return UserMemories(profiles, out_traits, _memories_frame(rows, texts))

    def _user(self, user_id: int, group: pd.DataFrame, catalog: ItemCatalog,
              identity: str) -> dict:
        """One user's reflection, from the cache when this exact history was done before."""
        lines = [f"{catalog.describe(int(i))} -> I rated {int(r)}"
                 for i, r in zip(group["item_index"], group["rating"], strict=True)]
        key = hashlib.sha256(json.dumps(
            {"identity": identity, "config": [self.config.batch_size,
                                              self.config.max_profile_words],
             "history": lines}).encode()).hexdigest()
        path = self.cache_path() / f"user-{user_id}-{key[:20]}.json"
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))
        profile: str | None = None
        reasons: list[str | None] = []
        replies: list[str] = []
        profile_fallbacks = 0
        size = self.config.batch_size
        for start in range(0, len(lines), size):
            batch = lines[start:start + size]
            t0 = time.perf_counter()
            reply = self.backend.complete(batch_prompt(profile or "", batch, self.config))
            log.debug("user %d: batch %d/%d in %.1f s", user_id, start // size + 1,
                      -(-len(lines) // size), time.perf_counter() - t0)
            replies.append(reply)
            got, new_profile = parse_reply(reply, len(batch))
            reasons.extend(got)
            if new_profile is None:
                profile_fallbacks += 1
            else:
                profile = new_profile
        result = {"user_id": user_id, "key": key, "profile": profile, "reasons": reasons,
                  "n_batches": len(replies), "profile_fallbacks": profile_fallbacks,
                  "replies": replies}
        atomic_write_json(path, result)
        return result


# --------------------------------------------------------------------------------------------
# Artifacts and CLI
# --------------------------------------------------------------------------------------------


def token_lengths(texts: Iterable[str], tokenizer) -> list[int]:
    """Token count of each text with ``tokenizer`` (no special tokens)."""
    return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def write_artifacts(out: str | Path, dataset, split, catalog: ItemCatalog,
                    result: UserMemories, item_embeddings: np.ndarray, info: dict) -> None:
    """Write the artifacts directory, every file atomically.

    ``items.parquet`` (the catalogue), ``profiles.jsonl`` (user_id, text, traits),
    ``memories.parquet``, ``collaborative.npz`` (the collaborative model the prompts' cues and
    item tokens use, :mod:`persona_gym.collaborative`), ``split.json`` (parameters, user ids,
    counts; no ratings),
    ``embeddings/items.npy`` (catalogue order) and ``distill.json`` (backend and text lengths).
    """
    from persona_gym.collaborative import CF_FILE, fit_collaborative

    out = Path(out)
    atomic_write_parquet(out / "items.parquet", catalog.to_frame())
    result.save(out)
    fit_collaborative(split.train, split.background, catalog, seed=split.seed).save(out / CF_FILE)
    atomic_write_json(out / "split.json", {
        "dataset": dataset.name,
        "params": split.params,
        "user_ids": [int(u) for u in split.user_ids],
        "distilled_user_ids": sorted(int(u) for u in result.profiles),
        "summary": split.summary(),
    })

    def write_npy(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, np.asarray(item_embeddings, dtype=np.float32))

    atomic_write(out / "embeddings" / "items.npy", write_npy)
    atomic_write_json(out / "distill.json", info)


def add_parser(subparsers) -> None:
    """Add ``persona-gym distill``."""
    p = subparsers.add_parser(
        "distill",
        help="distil users' training histories into profiles (Ms) and memories (Ml)",
        description=(
            "Stage 1 of the paper: for each user of the protocol split, a profile Ms and one "
            "enriched memory Ml per training interaction, from training data only. Writes "
            "items.parquet, profiles.jsonl, memories.parquet, split.json, "
            "embeddings/items.npy and distill.json into --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="ml-100k", help="dataset name or MovieLens folder")
    p.add_argument("--out", required=True, help="artifacts directory to write")
    p.add_argument("--backend", choices=["data", "hf", "openai"], default="data",
                   help="data: deterministic templates; hf: local LLM; openai: HTTP endpoint")
    p.add_argument("--model", default=None,
                   help="hf: model alias/path/hub id (default smollm2-135m-instruct); "
                        "openai: model name (required)")
    p.add_argument("--base-url", default=None,
                   help="openai: endpoint base URL, e.g. http://localhost:8000/v1 "
                        "(API key from $OPENAI_API_KEY)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="hf/openai: reply length cap per reflection step")
    p.add_argument("--n-users", type=int, default=200, help="users in the protocol split")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--max-users", type=int, default=None,
                   help="distil only the first N split users (quick LLM runs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--force", action="store_true",
                   help="replace an existing artifacts directory --out (its personas and adapters too)")
    p.set_defaults(func=run_distill)


def run_distill(args: argparse.Namespace) -> int:
    """Body of ``persona-gym distill``: builds the directory aside and swaps it in whole
    (:func:`persona_gym.artifacts.staged_dir`)."""
    from persona_gym.artifacts import staged_dir
    from persona_gym.errors import ConfigError

    for name in ("n_users", "max_users"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.backend == "openai" and (not args.base_url or not args.model):
        raise ConfigError("--backend openai needs --base-url and --model")
    with staged_dir(args.out, force=args.force) as work:
        return _distill_into(args, work)


def _distill_into(args: argparse.Namespace, out: Path) -> int:
    from persona_gym.data import load_dataset, protocol_split
    from persona_gym.embeddings import DEFAULT_EMBEDDER, Embedder, embed_items

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    dataset = load_dataset(args.dataset)
    split = protocol_split(dataset, n_users=args.n_users, seed=args.seed)
    catalog = ItemCatalog.from_frames(dataset.items, split.item_stats())
    timings["load+split"] = time.perf_counter() - t0

    user_ids = None
    if args.max_users is not None:
        user_ids = [int(u) for u in split.user_ids[: args.max_users]]
    if args.backend == "data":
        distiller: Any = DataDistiller(user_ids=user_ids)
    else:
        if args.backend == "hf":
            from training.chat import HFChatBackend

            backend: Any = HFChatBackend(model=args.model or "smollm2-135m-instruct",
                                         max_new_tokens=args.max_new_tokens)
        else:
            from training.chat import OpenAIChatBackend

            backend = OpenAIChatBackend(base_url=args.base_url, model=args.model,
                                        max_tokens=args.max_new_tokens)
        config = LLMDistillerConfig(cache_dir=str(out / "llm_cache"),
                                    progress=not args.no_progress)
        distiller = LLMDistiller(backend, config, user_ids=user_ids)

    t0 = time.perf_counter()
    result = distiller.distill(dataset, split, catalog)
    timings["distill"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    embedder = Embedder(DEFAULT_EMBEDDER)
    item_embeddings = embed_items(catalog, embedder)
    timings["item embeddings"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from transformers import AutoTokenizer

    from persona_gym.assets import DEFAULT_SLM, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_SLM))
    ms_tokens = token_lengths(result.profiles.values(), tokenizer)
    ml_tokens = token_lengths(result.memories["text"], tokenizer)
    timings["token counts"] = time.perf_counter() - t0
    info = {
        "backend": distiller.identity,
        "dataset": dataset.name,
        "n_users": len(result.profiles),
        "n_memories": len(result.memories),
        "embedder": DEFAULT_EMBEDDER,
        "tokenizer": DEFAULT_SLM,
        "ms_tokens": _length_stats(ms_tokens),
        "ml_tokens": _length_stats(ml_tokens),
    }
    if args.backend != "data":
        info["reason_fallbacks"] = sum(t["llm"]["reason_fallbacks"]
                                       for t in result.traits.values())
        info["profiles_from_data"] = sum(t["llm"]["profile_from_data"]
                                         for t in result.traits.values())
    t0 = time.perf_counter()
    write_artifacts(out, dataset, split, catalog, result, item_embeddings, info)
    timings["write"] = time.perf_counter() - t0
    log.info("timings (s): %s", {k: round(v, 2) for k, v in timings.items()})
    log.info("wrote %s: %d profiles (median Ms %s tokens), %d memories (median Ml %s tokens)",
             args.out, len(result.profiles), info["ms_tokens"]["median"], len(result.memories),
             info["ml_tokens"]["median"])
    return 0


def _length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)}

