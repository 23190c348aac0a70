"""Stage 2: cluster users into personas (paper §4, App. B).

KMeans++ (scikit-learn, seeded, ``n_init`` restarts) on what ``--features`` names: the unit
embeddings of the ``Ms`` texts (the paper's), rating behaviour (the default), both, or the
collaborative model's user factors, the taste a persona adapter owns with ``train
--persona-taste``. K is fixed, or chosen by the elbow method over ``k_min..k_max``:

    Elbow rule ("max distance to the chord", the kneedle idea, on log inertia): scale K and
    log(inertia) to [0, 1] over the range, draw the chord from the first to the last point, and
    pick the K whose point lies farthest below that chord. The log keeps a late elbow (true K
    near k_max) from being outweighed by the large early drops of the linear curve. Silhouette
    scores are reported for every K, not used to pick.

Each persona gets a card: size, user ids, most distinctive words (TF-IDF one-vs-rest over the
``Ms`` texts: mean weight inside the cluster minus mean weight outside), mean training rating
and top genres of its users. A 2-D PCA projection of the embeddings, coloured by persona, is
saved as a PNG.

Only the protocol users (``split.json``'s ``user_ids``: the users the adapters train on) are
clustered; the other simulated users of an ``--all-users`` distillation get the persona of the
nearest centroid, on the same features.

``persona-gym personas --artifacts DIR`` reads ``profiles.jsonl``, ``memories.parquet`` and
``items.parquet`` from the distill stage and writes ``personas.json``, ``personas.png`` and
``embeddings/profiles.npy``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from persona_gym.io import atomic_write, atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["PersonaConfig", "PersonaResult", "cluster_profiles", "elbow_k", "persona_cards"]

FEATURES = ("profile", "behaviour", "both", "taste")
ELBOW_RULE = (
    "elbow: K with the largest distance below the chord joining the first and last "
    "(K, log inertia) points, both axes min-max scaled (kneedle)"
)


@dataclass(frozen=True)
class PersonaConfig:
    """How personas are chosen."""

    k: int | None = 2  # fixed K (the shipped simulator's); None: elbow over k_min..k_max
    k_min: int = (
        2  # smallest K tried by the elbow (an elbow is never at an end: use 1 to allow K=2)
    )
    k_max: int = 10  # largest K tried by the elbow
    seed: int = 0  # KMeans random_state
    n_init: int = 10  # KMeans++ restarts; the best inertia is kept
    n_words: int = 10  # distinctive words per card
    n_genres: int = 3  # top genres per card
    # what users are clustered on: "profile" (the Ms text embeddings, the paper's), "behaviour"
    # (how they rate: level, spread, extremes, drift from the collaborative model, its user
    # factors; see behaviour_features), "both", or "taste" (the collaborative model's user
    # factors alone: what a persona adapter owns with `train --persona-taste`)
    features: str = "taste"  # the shipped simulator's

    def __post_init__(self) -> None:
        if self.features not in FEATURES:
            raise ValueError(f"features must be one of {FEATURES}, got {self.features!r}")
        if self.k is not None and self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.k is None and not 1 <= self.k_min < self.k_max:
            raise ValueError(f"need 1 <= k_min < k_max, got k_min={self.k_min}, k_max={self.k_max}")
        if self.n_init < 1:
            raise ValueError(f"n_init must be >= 1, got {self.n_init}")


@dataclass
class PersonaResult:
    """Clustering outcome."""

    k: int
    labels: np.ndarray  # persona of each row of the embedding matrix
    inertias: dict[int, float]  # K -> KMeans inertia (every K tried)
    silhouettes: dict[int, float | None]  # K -> silhouette (None when undefined, e.g. K=1)
    rule: str  # how K was chosen


def elbow_k(ks: list[int], inertias: list[float]) -> int:
    """K at the elbow: farthest point below the chord of the min-max scaled log-inertia curve.

    The end points have no distance to the chord, so the elbow is never ``ks[0]`` or
    ``ks[-1]`` (unless no point lies below the chord: then ``ks[0]``); start the range at 1
    for K=2 to be a possible answer. Ties go to the smaller K. With fewer than 3 points the
    first K is returned.
    """
    if len(ks) != len(inertias) or not ks:
        raise ValueError("ks and inertias must be non-empty and of the same length")
    if len(ks) < 3:
        return ks[0]
    x = np.asarray(ks, dtype=float)
    y = np.log(np.maximum(np.asarray(inertias, dtype=float), 1e-12))
    x = (x - x[0]) / (x[-1] - x[0])
    span = y.max() - y.min()
    y = (y - y.min()) / span if span > 0 else np.zeros_like(y)
    chord = y[0] + (y[-1] - y[0]) * x  # straight line from first to last point
    gap = chord - y  # decreasing convex curve: positive below the chord
    return int(ks[int(np.argmax(gap))])


def _kmeans(x: np.ndarray, k: int, config: PersonaConfig):
    from sklearn.cluster import KMeans

    return KMeans(
        n_clusters=k, init="k-means++", n_init=config.n_init, random_state=config.seed
    ).fit(x)


def _silhouette(x: np.ndarray, labels: np.ndarray) -> float | None:
    from sklearn.metrics import silhouette_score

    n_labels = len(np.unique(labels))
    if n_labels < 2 or n_labels >= len(x):
        return None
    return float(silhouette_score(x, labels, metric="euclidean"))


def cluster_profiles(embeddings: np.ndarray, config: PersonaConfig) -> PersonaResult:
    """KMeans++ on the profile embeddings with a fixed K or K by the elbow rule."""
    x = np.asarray(embeddings, dtype=np.float64)
    if config.k is not None:
        if config.k > len(x):
            raise ValueError(f"k={config.k} exceeds the {len(x)} profiles")
        model = _kmeans(x, config.k, config)
        return PersonaResult(
            config.k,
            model.labels_.astype(np.int64),
            {config.k: float(model.inertia_)},
            {config.k: _silhouette(x, model.labels_)},
            "fixed",
        )
    ks = [k for k in range(config.k_min, config.k_max + 1) if k < len(x)]
    if len(ks) < 1:
        raise ValueError(f"{len(x)} profiles are too few for k_min={config.k_min}")
    models = {k: _kmeans(x, k, config) for k in ks}
    inertias = {k: float(m.inertia_) for k, m in models.items()}
    silhouettes = {k: _silhouette(x, m.labels_) for k, m in models.items()}
    k = elbow_k(ks, [inertias[k] for k in ks])
    log.info(
        "elbow picked K=%d; inertia %s; silhouette %s",
        k,
        {k: round(v, 2) for k, v in inertias.items()},
        {k: None if v is None else round(v, 3) for k, v in silhouettes.items()},
    )
    return PersonaResult(k, models[k].labels_.astype(np.int64), inertias, silhouettes, ELBOW_RULE)


def behaviour_features(
    user_ids: list[int], memories: pd.DataFrame, collaborative, reference: np.ndarray | None = None
) -> np.ndarray:
    """``(n_users, d)`` standardised rating behaviour of each user, from training data only.

    Columns: mean rating, its standard deviation, share of 5s, share of ratings <= 2, the mean
    and spread of the residual from the out-of-fold collaborative predictions (what the
    collaborative model misses about the user), then the collaborative user factors (scaled so
    that together they weigh as much as one column). ``reference``: a mask of the users whose
    mean and spread standardise every column (default: all).
    """
    rows = memories[memories["user_id"].isin(user_ids)]
    residual = rows["rating"].to_numpy() - collaborative.predict(
        rows["user_id"], rows["item_index"]
    )
    stats = rows.assign(residual=residual, five=rows["rating"] >= 5, low=rows["rating"] <= 2)
    grouped = stats.groupby("user_id").agg(
        mean=("rating", "mean"),
        std=("rating", "std"),
        five=("five", "mean"),
        low=("low", "mean"),
        res_mean=("residual", "mean"),
        res_std=("residual", "std"),
    )
    table = grouped.reindex(user_ids).fillna(0.0).to_numpy(np.float64)
    factors = taste_features(user_ids, collaborative)

    ref = (
        np.ones(len(user_ids), dtype=bool)
        if reference is None
        else np.asarray(reference, dtype=bool)
    )

    def standardise(a: np.ndarray) -> np.ndarray:
        mean, std = a[ref].mean(0), a[ref].std(0)
        return (a - mean) / np.where(std > 0, std, 1.0)

    return np.c_[standardise(table), standardise(factors) / np.sqrt(max(factors.shape[1], 1))]


def taste_features(user_ids: list[int], collaborative) -> np.ndarray:
    """``(n_users, F)``: each user's collaborative MF factors (zeros for a user the fit never
    saw), unscaled: the taste space a persona adapter's share is taken in
    (``PromptConfig.persona_taste``)."""
    rows = collaborative.user_rows(user_ids)
    return np.where(rows[:, None] >= 0, collaborative.user_factors[np.maximum(rows, 0)], 0.0)


def nearest_centroid(features: np.ndarray, labels: np.ndarray, others: np.ndarray) -> np.ndarray:
    """The persona of each row of ``others``: the nearest (Euclidean) centroid of the clustered
    ``features`` under ``labels``."""
    personas = np.unique(labels)
    centroids = np.stack([features[labels == p].mean(0) for p in personas])
    distances = ((others[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    return personas[np.argmin(distances, axis=1)].astype(np.int64)


def distinctive_words(texts: list[str], labels: np.ndarray, n_words: int) -> dict[int, list]:
    """Per cluster, the words whose mean TF-IDF weight inside most exceeds that outside."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    # words only: the numbers in Ms are evidence, not vocabulary
    vectorizer = TfidfVectorizer(
        stop_words="english", token_pattern=r"(?u)\b[A-Za-z][A-Za-z'-]+\b", lowercase=True
    )
    matrix = vectorizer.fit_transform([_strip_numbers(t) for t in texts]).toarray()
    vocab = np.asarray(vectorizer.get_feature_names_out())
    out: dict[int, list] = {}
    for c in np.unique(labels):
        inside = labels == c
        score = matrix[inside].mean(axis=0) - (
            matrix[~inside].mean(axis=0) if (~inside).any() else 0.0
        )
        order = np.lexsort((vocab, -score))[:n_words]
        out[int(c)] = [
            {"word": str(vocab[i]), "score": round(float(score[i]), 4)}
            for i in order
            if score[i] > 0
        ]
    return out


def _strip_numbers(text: str) -> str:
    return re.sub(r"\d+(\.\d+)?", " ", text.replace("PERSONA:", " "))


def persona_cards(
    user_ids: list[int],
    texts: list[str],
    labels: np.ndarray,
    memories: pd.DataFrame,
    items: pd.DataFrame,
    config: PersonaConfig,
) -> list[dict]:
    """One card per persona: size, users, distinctive words, mean rating, top genres."""
    words = distinctive_words(texts, labels, config.n_words)
    genres_of = dict(zip(items["item_id"].astype(int), items["genres"], strict=True))
    users = np.asarray(user_ids)
    every = memories[memories["user_id"].isin(user_ids)]
    all_shares = _genre_shares(every, genres_of)
    cards = []
    for c in range(int(labels.max()) + 1 if len(labels) else 0):
        members = sorted(int(u) for u in users[labels == c])
        rows = memories[memories["user_id"].isin(members)]
        genre_rows = [
            (g, r)
            for i, r in zip(rows["item_id"], rows["rating"], strict=True)
            for g in genres_of.get(int(i), ())
        ]
        g = pd.DataFrame(genre_rows, columns=["genre", "rating"])
        top = []
        if len(g):
            stats = g.groupby("genre")["rating"].agg(n="size", mean="mean").reset_index()
            stats = stats.sort_values(["n", "genre"], ascending=[False, True])
            total = max(1, len(rows))
            top = [
                {
                    "genre": str(s.genre),
                    "share": round(float(s.n) / total, 3),
                    "mean_rating": round(float(s.mean), 3),
                }
                for s in stats.head(config.n_genres).itertuples()
            ]
        shares = _genre_shares(rows, genres_of)
        lift = (shares / all_shares.reindex(shares.index)).dropna()
        lift = lift[shares.reindex(lift.index) >= 0.02].reset_index()
        lift.columns = ["genre", "lift"]
        lift = lift.sort_values(["lift", "genre"], ascending=[False, True]).head(config.n_genres)
        cards.append(
            {
                "persona": c,
                "size": len(members),
                "user_ids": members,
                "distinctive_words": words.get(c, []),
                "mean_rating": round(float(rows["rating"].mean()), 3) if len(rows) else None,
                "n_ratings": len(rows),
                "top_genres": top,
                # genres these users watch more than all users do (share ratio; share >= 2%)
                "distinctive_genres": [
                    {"genre": str(r.genre), "lift": round(float(r.lift), 3)}
                    for r in lift.itertuples()
                ],
            }
        )
    return cards


def _genre_shares(rows: pd.DataFrame, genres_of: dict) -> pd.Series:
    """Fraction of the rows' ratings whose item has each genre."""
    counts: dict[str, int] = {}
    for i in rows["item_id"]:
        for g in genres_of.get(int(i), ()):
            counts[str(g)] = counts.get(str(g), 0) + 1
    return pd.Series(counts, dtype=float).sort_index() / max(1, len(rows))


def plot_personas(
    path: Path, embeddings: np.ndarray, labels: np.ndarray, seed: int, title: str
) -> None:
    """PCA to 2-D, one colour per persona, saved atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    points = PCA(n_components=2, random_state=seed).fit_transform(embeddings)
    fig, ax = plt.subplots(figsize=(6, 5), dpi=120)
    cmap = plt.get_cmap("tab10")
    for c in range(int(labels.max()) + 1):
        sel = labels == c
        ax.scatter(
            points[sel, 0],
            points[sel, 1],
            s=14,
            color=cmap(c % 10),
            label=f"persona {c} ({int(sel.sum())})",
        )
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", metadata={"Software": None}))
    plt.close(fig)


def run_personas_stage(
    artifacts: str | Path,
    config: PersonaConfig,
    embedder_name: str | None = None,
    force: bool = False,
) -> dict:
    """Cluster the profiles of an artifacts directory and write the persona outputs.

    Refuses to replace existing personas unless ``force``, which also deletes what was built
    on them (adapters, manifest: :func:`persona_gym.artifacts.prepare_stage`).
    """
    from persona_gym.artifacts import load_tables, prepare_stage, training_users
    from persona_gym.embeddings import DEFAULT_EMBEDDER, Embedder

    artifacts = Path(artifacts)
    profiles_path = artifacts / "profiles.jsonl"
    if not profiles_path.exists():
        raise FileNotFoundError(
            f"{profiles_path} is missing; run: persona-gym distill --dataset ml-100k "
            f"--out {artifacts}"
        )
    load_tables(artifacts)  # fails with the file and the fix on a broken table
    prepare_stage(artifacts, "personas", force=force)
    rows = [
        json.loads(line)
        for line in profiles_path.read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    rows.sort(key=lambda r: int(r["user_id"]))
    user_ids = [int(r["user_id"]) for r in rows]
    texts = [r["text"] for r in rows]
    clustered = np.isin(user_ids, training_users(artifacts, user_ids))  # the protocol users
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    embedder_name = embedder_name or DEFAULT_EMBEDDER
    embeddings = Embedder(embedder_name).encode(texts)
    timings["embed profiles"] = time.perf_counter() - t0

    memories = pd.read_parquet(artifacts / "memories.parquet")
    t0 = time.perf_counter()
    features = embeddings
    if config.features != "profile":
        from persona_gym.simulator.collaborative import CF_FILE, load_collaborative

        collaborative = load_collaborative(artifacts / CF_FILE)
        if config.features == "taste":
            features = taste_features(user_ids, collaborative)
        else:
            behaviour = behaviour_features(user_ids, memories, collaborative, reference=clustered)
            # the unit profile embeddings have a total variance near 1; give behaviour the same weight
            behaviour = behaviour / np.sqrt(behaviour.shape[1])
            features = behaviour if config.features == "behaviour" else np.c_[embeddings, behaviour]
    result = cluster_profiles(features[clustered], config)
    labels = np.zeros(len(user_ids), dtype=np.int64)
    labels[clustered] = result.labels
    if not clustered.all():
        labels[~clustered] = nearest_centroid(
            features[clustered], result.labels, features[~clustered]
        )
    timings["kmeans"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    items = pd.read_parquet(artifacts / "items.parquet")
    members = [u for u, c in zip(user_ids, clustered, strict=True) if c]
    cards = persona_cards(
        members,
        [t for t, c in zip(texts, clustered, strict=True) if c],
        result.labels,
        memories,
        items,
        config,
    )
    out = {
        "k": result.k,
        "rule": result.rule,
        "config": asdict(config),
        "embedder": embedder_name,
        "assignment": {str(u): int(c) for u, c in zip(user_ids, labels, strict=True)},
        "sizes": [card["size"] for card in cards],
        "inertias": {str(k): round(v, 6) for k, v in result.inertias.items()},
        "silhouettes": {
            str(k): None if v is None else round(v, 6) for k, v in result.silhouettes.items()
        },
        "cards": cards,
    }
    if not clustered.all():
        out["by_nearest_centroid"] = {
            str(p): int(n)
            for p, n in zip(*np.unique(labels[~clustered], return_counts=True), strict=True)
        }
    atomic_write_json(artifacts / "personas.json", out)

    def write_npy(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, embeddings.astype(np.float32))

    atomic_write(artifacts / "embeddings" / "profiles.npy", write_npy)
    plot_personas(
        artifacts / "personas.png",
        features[clustered],
        result.labels,
        config.seed,
        f"{len(members)} users, K={result.k} personas (PCA of {config.features} features)",
    )
    timings["cards+plot+write"] = time.perf_counter() - t0
    log.info("timings (s): %s", {k: round(v, 2) for k, v in timings.items()})
    log.info("K=%d, sizes %s", result.k, out["sizes"])
    return out


def add_parser(subparsers) -> None:
    """Add ``persona-gym personas``."""
    p = subparsers.add_parser(
        "personas",
        help=f"cluster users into personas (on --features, default: {PersonaConfig.features})",
        description=(
            f"Stage 2 of the paper: KMeans++ on the users' --features (default: "
            f"{PersonaConfig.features}; 'profile', the paper's, clusters the embeddings of the "
            "profiles (Ms) written by 'persona-gym distill'). K is --k, or with --k 0 chosen by the elbow "
            "method over --k-min..--k-max (largest distance below the chord of the scaled log-inertia curve); "
            "silhouette is reported for every K. Writes personas.json, personas.png and "
            "embeddings/profiles.npy into the artifacts directory."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--artifacts", required=True, help="artifacts directory from distill")
    p.add_argument(
        "--k",
        type=int,
        default=PersonaConfig.k,
        help="number of personas (the shipped simulator's: 2); 0 chooses it by the elbow "
        "over --k-min..--k-max",
    )
    p.add_argument("--k-min", type=int, default=2, help="smallest K tried by the elbow")
    p.add_argument("--k-max", type=int, default=10, help="largest K tried by the elbow")
    p.add_argument("--seed", type=int, default=0, help="KMeans seed")
    p.add_argument(
        "--features",
        choices=FEATURES,
        default=PersonaConfig.features,
        help="cluster on the profile texts' embeddings (the paper), on rating behaviour "
        "(level, spread, drift from the collaborative model, its user factors), both, "
        "or on the collaborative user factors alone (taste: what `train --persona-taste` "
        "gives each persona adapter)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace existing personas (deletes the adapters and manifest trained on them)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.k is not None and args.k < 0:
        raise ValueError(f"--k must be >= 0 (0: chosen by the elbow), got {args.k}")
    config = PersonaConfig(
        k=args.k or None, k_min=args.k_min, k_max=args.k_max, seed=args.seed, features=args.features
    )
    out = run_personas_stage(args.artifacts, config, force=args.force)
    for card in out["cards"]:
        words = ", ".join(w["word"] for w in card["distinctive_words"][:6])
        genres = ", ".join(g["genre"] for g in card["distinctive_genres"])
        log.info(
            "persona %d: %d users, mean rating %s, distinctive genres %s; words: %s",
            card["persona"],
            card["size"],
            card["mean_rating"],
            genres,
            words,
        )
    return 0
