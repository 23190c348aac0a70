"""Reading and validating MovieLens files: one error per problem, naming file, line and fix.

Any problem raises :class:`DataValidationError` whose message names the file, the 1-based line
number when there is one, what is wrong and how to fix it. Parsing the large ratings file uses
pandas' C parser on the happy path (:func:`read_ratings`); only when that fails is the file
re-read line by line to find and report the first offending line.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from persona_gym.data.dataset import RATINGS_COLUMNS, USERS_COLUMNS
from persona_gym.ratings import MAX_RATING, MIN_RATING

logger = logging.getLogger(__name__)

# The longest MovieLens title is under 100 characters; a longer field is a corrupted file.
MAX_TITLE_CHARS = 1000

__all__ = [
    "DataValidationError",
    "MAX_TITLE_CHARS",
    "check_digits",
    "check_gender",
    "check_title",
    "check_unique_ids",
    "fail",
    "finish_ratings",
    "line_of_row",
    "parse_lines",
    "read_ratings",
    "read_text",
    "split_fields",
    "text_lines",
    "to_int",
    "users_frame",
    "validate_ratings",
]


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


def fail(path: Path, line: int | None, what: str, fix: str) -> DataValidationError:
    return DataValidationError(f"{_where(path, line)}: {what}. {fix}", path=path, line=line)


def read_text(path: Path, encoding: str) -> str:
    """Read and decode a whole file; reject missing, empty, binary and wrongly encoded files."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: file not found. Check the folder holds the MovieLens files."
        )
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark (editors add one): not data
        data = data[3:]
    if not data.strip():
        raise fail(
            path,
            None,
            "the file is empty",
            "Re-extract the dataset archive (e.g. `persona-gym data fetch ...`).",
        )
    if data[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in data:
        pos = data.find(b"\x00")
        line = data[:pos].count(b"\n") + 1 if pos >= 0 else 1
        raise fail(
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
        raise fail(
            path,
            line,
            f"cannot decode byte {data[e.start : e.start + 1]!r} as {encoding} ({e.reason})",
            f"The file must be {encoding} text; re-extract the original archive or "
            f"convert the file to {encoding}.",
        ) from e


def text_lines(text: str) -> list[tuple[int, str]]:
    """Non-blank lines with their 1-based line numbers (``\\r\\n`` tolerated)."""
    return [(n, ln.rstrip("\r")) for n, ln in enumerate(text.split("\n"), start=1) if ln.strip()]


def to_int(path: Path, line: int, field: str, value: str) -> int:
    try:
        number = int(value.strip())
    except ValueError:
        raise fail(
            path, line, f"field {field!r} is {value!r}, not an integer", "Fix or remove that line."
        ) from None
    if not -(2**63) <= number < 2**63:
        raise fail(
            path,
            line,
            f"field {field!r} is {number}, beyond the 64-bit integer range",
            "Fix or remove that line.",
        )
    return number


def split_fields(
    path: Path, line: int, text: str, sep: str, names: Sequence[str], *, exact: bool = True
) -> list[str]:
    parts = text.split(sep)
    if (len(parts) != len(names)) if exact else (len(parts) < len(names)):
        raise fail(
            path,
            line,
            f"expected {len(names)} {sep!r}-separated fields ({', '.join(names)}), "
            f"found {len(parts)}: {text[:120]!r}",
            "Fix or remove that line; the file may be truncated or not in this format.",
        )
    return parts


def parse_lines(
    path: Path, text: str, sep: str, names: Sequence[str], row: Callable[[int, list[str]], tuple]
) -> list[tuple[int, tuple]]:
    """Parse a small file line by line: ``row(line_no, fields)`` converts one line."""
    out = []
    for n, ln in text_lines(text):
        out.append((n, row(n, split_fields(path, n, ln, sep, names))))
    return out


def read_ratings(path: Path, sep: str, encoding: str) -> tuple[pd.DataFrame, str]:
    """Read a ratings file (4 integer fields per line) fast; validate field counts and ints.

    Returns the frame in file order and the decoded text (for locating lines on later errors).
    """
    text = read_text(path, encoding)
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
                check_digits(path, text, sep, names)
                return df, text
        except (ValueError, TypeError, OverflowError, pd.errors.ParserError) as e:
            logger.debug("fast parse of %s failed (%s); re-reading line by line", path, e)
    rows = parse_lines(
        path,
        text,
        sep,
        names,
        lambda n, f: tuple(to_int(path, n, c, v) for c, v in zip(names, f, strict=True)),
    )
    df = pd.DataFrame([r for _, r in rows], columns=names, dtype=np.int64)
    check_digits(path, text, sep, names)
    return df, text


def check_digits(path: Path, text: str, sep: str, names: Sequence[str]) -> None:
    """Every field of a parsed ratings file is written as plain ASCII digits (a leading ``-``
    is left to the range checks): ``' 3 '``, ``'+3'`` or a fullwidth ``'３'`` parse as 3 but
    are not what MovieLens writes, so the line is refused rather than guessed."""
    for match in re.finditer(rf"[^0-9\-\r\n{re.escape(sep)}]", text):
        start = text.rfind("\n", 0, match.start()) + 1
        end = text.find("\n", match.start())
        line = text[start : end if end >= 0 else len(text)].rstrip("\r")
        if not line.strip():
            continue  # a blank line (spaces only): skipped like the others
        for name, value in zip(names, line.split(sep), strict=False):
            if re.fullmatch(r"-?[0-9]+", value):
                continue
            try:
                example = f", e.g. {int(value)}"
            except ValueError:
                example = ""
            raise fail(
                path,
                text.count("\n", 0, start) + 1,
                f"field {name!r} is {value!r}, not written as plain digits",
                f"Write {name} as ASCII digits only (no sign, spaces or other numerals)"
                f"{example}; fix that line.",
            )


def check_title(path: Path, line: int, raw: str) -> str:
    """A movie title as a file gives it: not empty, at most :data:`MAX_TITLE_CHARS` long."""
    if not raw.strip():
        raise fail(path, line, "field 'title' is empty", "Give the movie its title; fix that line.")
    if len(raw) > MAX_TITLE_CHARS:
        raise fail(
            path,
            line,
            f"field 'title' is {len(raw):,} characters long, more than {MAX_TITLE_CHARS:,}",
            "A title is a short line of text; the file is corrupted: fix that line.",
        )
    return raw


def _nonblank_line_numbers(text: str, limit: int | None) -> np.ndarray:
    """1-based numbers of the non-blank lines (the first ``limit`` of them, or all)."""
    body = text[:-1] if text.endswith("\n") else text
    if not _BLANK_LINE.search(body):  # the common case: every line is a row
        n = body.count("\n") + 1
        return np.arange(1, (n if limit is None else min(n, limit)) + 1)
    nums = [n for n, _ in text_lines(text)]
    return np.asarray(nums if limit is None else nums[:limit])


_BLANK_LINE = re.compile(r"^[ \t\r]*$", re.MULTILINE)


def line_of_row(text: str, row: int) -> int:
    """1-based file line of the ``row``-th (0-based) non-blank line."""
    return int(_nonblank_line_numbers(text, limit=row + 1)[row])


def check_unique_ids(path: Path, rows: list[tuple[int, tuple]], what: str) -> None:
    seen: dict[int, int] = {}
    for n, r in rows:
        if r[0] in seen:
            raise fail(
                path,
                n,
                f"duplicate {what} id {r[0]} (first seen on line {seen[r[0]]})",
                "Each id must appear once; remove the duplicate line.",
            )
        seen[r[0]] = n


def validate_ratings(
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
        raise fail(path, None, "the file has no ratings", "Re-extract the dataset archive.")
    bad = ~df["rating"].between(MIN_RATING, MAX_RATING)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise fail(
            path,
            line_of(i),
            f"rating {int(df['rating'].iat[i])} is outside {MIN_RATING}..{MAX_RATING}",
            "MovieLens ratings are whole stars 1-5; fix or remove that line.",
        )
    bad = df["timestamp"] < 0
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise fail(
            path,
            line_of(i),
            f"timestamp {int(df['timestamp'].iat[i])} is negative",
            "Timestamps are seconds since 1970-01-01 (0 or more); fix or remove that line.",
        )
    bad = ~df["user_id"].isin(user_ids)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise fail(
            path,
            line_of(i),
            f"user id {int(df['user_id'].iat[i])} is not in {users_file.name}",
            f"Every rated user must be listed in {users_file}; the files may come from "
            "different datasets.",
        )
    bad = ~df["item_id"].isin(item_ids)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise fail(
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
        raise fail(
            path,
            line_of(i),
            f"duplicate rating of item {it} by user {u} (first on line {line_of(first)})",
            "Each (user, item) pair may be rated once; keep one of the lines.",
        )


def finish_ratings(df: pd.DataFrame) -> pd.DataFrame:
    """Schema dtypes, sorted by (user_id, timestamp, item_id), RangeIndex."""
    df = df.astype({c: np.int64 for c in RATINGS_COLUMNS})[list(RATINGS_COLUMNS)]
    order = np.lexsort(
        (df["item_id"].to_numpy(), df["timestamp"].to_numpy(), df["user_id"].to_numpy())
    )
    return df.take(order).reset_index(drop=True)


def users_frame(rows: list[tuple]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=list(USERS_COLUMNS))
    df = df.astype(
        {"user_id": np.int64, "age": np.int64, "gender": str, "occupation": str, "zip": str}
    )
    return df.sort_values("user_id", kind="stable").reset_index(drop=True)


def check_gender(path: Path, line: int, value: str) -> str:
    g = value.strip().upper()
    if g not in ("M", "F"):
        raise fail(path, line, f"gender is {value!r}, expected 'M' or 'F'", "Fix that line.")
    return g
