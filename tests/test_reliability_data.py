"""Data loader rules for inputs that used to load without a word (issue 36): a title too long
or empty, a negative timestamp, ratings not written as plain digits, a folder holding two
formats, and a cache directory that is a file. Each is refused with one line naming the file,
the line and the fix, through the real loaders and the real ``persona-gym`` command."""

from __future__ import annotations

from pathlib import Path

import pytest

from persona_gym.cli import main
from persona_gym.data import DataValidationError, load_dataset, load_ml1m, load_ml100k
from persona_gym.data.validation import MAX_TITLE_CHARS
from tests.data.test_movielens import MOVIES, RATINGS, USERS, write_ml1m, write_ml100k


def _one_line(capsys: pytest.CaptureFixture[str], argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.mark.parametrize("value", [" 3 ", "+3", "３", "3 ", "٣"])
@pytest.mark.parametrize("fmt", ["ml-1m", "ml-100k"])
def test_ratings_not_written_as_plain_digits_are_refused(tmp_path: Path, fmt: str, value: str):
    folder = (write_ml1m if fmt == "ml-1m" else write_ml100k)(tmp_path / "d")
    name, sep = ("ratings.dat", "::") if fmt == "ml-1m" else ("u.data", "\t")
    lines = (folder / name).read_text(encoding="latin-1").splitlines()
    lines[3] = sep.join(["1", "7", value, "100"])  # line 4; an edited file is saved as UTF-8
    (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataValidationError) as error:
        (load_ml1m if fmt == "ml-1m" else load_ml100k)(folder)
    message = str(error.value)
    assert f"{name}, line 4: field 'rating' is {value!r}, not written as plain digits" in message
    assert "ASCII digits only" in message and "e.g. 3" in message
    assert error.value.line == 4


def test_other_fields_too_and_through_the_command(tmp_path: Path, capsys):
    bad = [*RATINGS[:1], (1, 2, 4, "+200"), *RATINGS[2:]]
    folder = write_ml1m(tmp_path / "d", ratings=bad)
    _one_line(
        capsys,
        ["data", "info", "--dataset", str(folder)],
        "ratings.dat, line 2: field 'timestamp' is '+200'",
        "fix that line",
    )


def test_a_negative_timestamp_is_refused(tmp_path: Path):
    bad = [*RATINGS[:4], (3, 3, 2, -50), *RATINGS[5:]]
    folder = write_ml100k(tmp_path / "d", ratings=bad)
    with pytest.raises(DataValidationError, match=r"u\.data, line 5: timestamp -50 is negative"):
        load_ml100k(folder)


@pytest.mark.parametrize("fmt", ["ml-1m", "ml-100k"])
@pytest.mark.parametrize(
    ("title", "fragment"),
    [
        ("", "field 'title' is empty"),
        ("   ", "field 'title' is empty"),
        ("x" * 10_000_000, "field 'title' is 10,000,000 characters long, more than 1,000"),
    ],
)
def test_an_empty_or_huge_title_is_refused(tmp_path: Path, fmt: str, title: str, fragment: str):
    movies = [*MOVIES[:2], (3, title, ("Drama",)), *MOVIES[3:]]  # line 3
    folder = (write_ml1m if fmt == "ml-1m" else write_ml100k)(tmp_path / "d", movies=movies)
    with pytest.raises(DataValidationError) as error:
        (load_ml1m if fmt == "ml-1m" else load_ml100k)(folder)
    message = str(error.value)
    name = "movies.dat" if fmt == "ml-1m" else "u.item"
    assert f"{name}, line 3: {fragment}" in message and "fix that line" in message
    assert len(message) < 400  # the title itself is never quoted


def test_a_title_at_the_limit_loads(tmp_path: Path):
    movies = [*MOVIES[:2], (3, "y" * MAX_TITLE_CHARS, ("Drama",)), *MOVIES[3:]]
    folder = write_ml1m(tmp_path / "d", movies=movies)
    assert load_ml1m(folder).item_titles()[3] == "y" * MAX_TITLE_CHARS


def test_a_folder_with_both_formats_is_refused(tmp_path: Path, capsys):
    folder = write_ml1m(tmp_path / "d")
    write_ml100k(folder, users=USERS[:2])
    with pytest.raises(DataValidationError, match="holds both ML-1M files"):
        load_dataset(str(folder))
    _one_line(
        capsys,
        ["data", "info", "--dataset", str(folder)],
        "ratings.dat, users.dat, movies.dat",
        "u.data, u.item, u.user",
        "Keep one format per folder",
    )
    (folder / "u.item").unlink()  # one stray file of the other format is refused too
    with pytest.raises(DataValidationError, match=r"both ML-1M files .* ML-100k files \(u\.data"):
        load_dataset(str(folder))


def test_the_cache_env_pointing_at_a_file(tmp_path: Path, monkeypatch, capsys):
    from persona_gym.assets import CACHE_ENV, CacheDirError, cache_dir

    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    for value in (blocker, blocker / "below"):
        monkeypatch.setenv(CACHE_ENV, str(value))
        with pytest.raises(CacheDirError) as error:
            cache_dir()
        assert f"${CACHE_ENV} is {value}, but {blocker} is a file, not a folder" in str(error.value)
        assert isinstance(error.value, NotADirectoryError)
    # where the cache is used: the shipped simulator's copy, the default model's conversion
    from persona_gym.artifacts import resolve_artifacts
    from persona_gym.assets import resolve_model

    for use in (lambda: resolve_artifacts("ml-100k"), resolve_model):
        with pytest.raises(CacheDirError, match=r"point \$PERSONA_GYM_CACHE at a folder"):
            use()
