"""``persona-gym build`` checks its own record, has one writer per directory and survives a full
disk (issue 36). Real builds of the tiny fixture (ML-1M files of 3 ML-100k users, the tiny
random base model, --no-evaluate): files of finished stages edited or copied in, two real
``persona-gym build`` processes into one new ``--out``, and a disk that fills during distill."""

from __future__ import annotations

import errno
import json
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from persona_gym.artifacts import load_artifacts
from persona_gym.artifacts.stages import file_lock, staged_dir
from persona_gym.cli import main
from persona_gym.io import DiskFullError, atomic_write
from tests.envs.test_ml1m import write_ml1m_folder

REPO = Path(__file__).resolve().parents[1]


def _argv(out: Path | str, tiny_base: str, data: Path, *extra: str) -> list[str]:
    return [
        "build",
        str(data),
        "--out",
        str(out),
        "--n-users",
        "3",
        "--base-model",
        tiny_base,
        "--preset",  # the block trainer: its budget flag keeps the build small
        "block",
        "--max-examples-per-user",
        "2",
        "--val-per-user",
        "1",
        "--no-evaluate",
        "--no-compile",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("build-data") / "ml1m"
    write_ml1m_folder(folder, n_users=3)
    return folder


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_base, data) -> Path:
    """One finished build (distill, personas, train), copied by the tests that change it."""
    out = tmp_path_factory.mktemp("build-once") / "art"
    assert main(_argv(out, tiny_base, data)) == 0
    return out


def _error(capsys) -> str:
    captured = capsys.readouterr()
    assert "is ready in" not in captured.out
    err = captured.err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -- the build's record is checked against the files it describes ----------------------------
def _profiles(root: Path) -> None:
    """Edit the first user's profile by hand."""
    path = root / "profiles.jsonl"
    lines = path.read_text().splitlines()
    first = json.loads(lines[0])
    key = next(k for k, v in first.items() if isinstance(v, str) and len(v) > 20)
    first[key] += " Edited by hand."
    path.write_text("\n".join([json.dumps(first), *lines[1:]]) + "\n")


def _split_of_another_seed(root: Path) -> None:
    split = json.loads((root / "split.json").read_text())
    split["seed"] = split.get("seed", 0) + 1  # what another seed's split.json differs in
    (root / "split.json").write_text(json.dumps(split))


def _personas(root: Path) -> None:
    personas = json.loads((root / "personas.json").read_text())
    personas["k"] = 7
    (root / "personas.json").write_text(json.dumps(personas))


def _adapter_gone(root: Path) -> None:
    next((root / "adapters").rglob("adapter_config.json")).unlink()


def _adapter_added(root: Path) -> None:
    folder = next((root / "adapters").iterdir())
    shutil.copytree(folder, folder.with_name(folder.name + "-copy"))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (_profiles, r"profiles\.jsonl changed since the build's distill stage wrote it"),
        (_split_of_another_seed, r"split\.json changed since the build's distill stage"),
        (_personas, r"personas\.json changed since the build's personas stage"),
        (_adapter_gone, r"adapter_config\.json is gone since the build's train stage"),
        (_adapter_added, r"-copy/.* was added since the build's train stage"),
    ],
)
def test_a_changed_file_of_a_finished_stage_is_refused(
    built, tiny_base, data, tmp_path, capsys, change, fragment
):
    art = tmp_path / "art"
    shutil.copytree(built, art)
    argv = _argv(art, tiny_base, data)
    assert main(argv) == 0  # the copy as built: every stage skipped, ready
    assert capsys.readouterr().out.count("done before (build.json), skipped") == 3
    change(art)
    assert main(argv) == 2
    err = _error(capsys)
    assert re.search(fragment, err), err
    assert "build.json records every file's SHA-256): restore it, or rebuild" in err
    suggested = re.search(r"`persona-gym (build .*--force)`", err)
    assert suggested and str(data) in suggested.group(1) and f"--out {art}" in suggested.group(1)


def test_the_suggested_command_rebuilds_and_the_result_verifies(
    built, tiny_base, data, tmp_path, capsys
):
    art = tmp_path / "art"
    shutil.copytree(built, art)
    _profiles(art)
    assert main(_argv(art, tiny_base, data)) == 2
    command = re.search(r"`persona-gym (build .*--force)`", _error(capsys))
    assert command is not None
    assert main(command.group(1).split()) == 0
    assert "is ready in" in capsys.readouterr().out
    assert main(["artifacts", "verify", str(art)]) == 0
    assert "Edited by hand." not in (art / "profiles.jsonl").read_text()  # distilled again
    assert main(_argv(art, tiny_base, data)) == 0  # and the record matches the files again


# -- one writer per output directory ------------------------------------------------------------
def test_two_builds_into_one_new_directory_take_turns(tiny_base, data, tmp_path):
    """Two real ``persona-gym build`` processes, started while the directory's lock is held
    (so both really wait at once): one builds, the other waits, then finds every stage done;
    the directory verifies and the record holds one distill."""
    out = tmp_path / "art"
    logs = [tmp_path / f"build-{n}.log" for n in range(2)]
    command = [sys.executable, "-m", "persona_gym.cli", *_argv(out, tiny_base, data)]
    processes = []
    with file_lock(tmp_path / ".art.build.lock"):
        for log in logs:
            with log.open("w") as handle:
                processes.append(
                    subprocess.Popen(command, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
                )
        deadline = time.monotonic() + 300
        while not all("waiting for it to finish" in log.read_text() for log in logs):
            assert all(p.poll() is None for p in processes), [log.read_text() for log in logs]
            assert time.monotonic() < deadline, [log.read_text() for log in logs]
            time.sleep(0.05)
    for process in processes:
        assert process.wait(timeout=600) == 0, [log.read_text()[-3000:] for log in logs]
    outputs = [log.read_text() for log in logs]
    assert sum("[2/4] distill: done in" in text for text in outputs) == 1, outputs
    assert sum(text.count("done before (build.json), skipped") == 3 for text in outputs) == 1
    assert main(["artifacts", "verify", str(out)]) == 0
    load_artifacts(out)
    record = json.loads((out / "build.json").read_text())
    assert list(record["stages"]) == ["distill", "personas", "train"]
    assert "profiles.jsonl" in record["stages"]["distill"]["files"]
    assert not (tmp_path / ".art.partial").exists()


def test_two_distills_into_one_directory_do_not_share_the_staging_folder(tmp_path):
    """The staging folder's lock, with two threads: the second waits for the first to swap its
    directory in, then is refused (the directory holds artifacts) instead of emptying the
    first one's staging folder under it."""
    out = tmp_path / "art"
    inside, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        with staged_dir(out) as work:
            (work / "split.json").write_text("{}")
            inside.set()
            assert release.wait(timeout=30)
            (work / "profiles.jsonl").write_text("{}\n")

    def second() -> None:
        try:
            with staged_dir(out) as work:
                (work / "split.json").write_text('{"second": true}')
        except FileExistsError as error:
            errors.append(error)

    one = threading.Thread(target=first)
    one.start()
    assert inside.wait(timeout=30)
    two = threading.Thread(target=second)
    two.start()
    time.sleep(0.3)  # the second one is waiting on the lock, not writing the staging folder
    assert two.is_alive() and sorted(p.name for p in (tmp_path / ".art.partial").iterdir()) == [
        "split.json"
    ]
    release.set()
    one.join(timeout=30)
    two.join(timeout=30)
    assert sorted(p.name for p in out.iterdir()) == ["profiles.jsonl", "split.json"]
    assert (out / "split.json").read_text() == "{}"
    assert len(errors) == 1 and "already holds artifacts" in str(errors[0])


# -- a full disk -------------------------------------------------------------------------------
def test_a_full_disk_in_an_atomic_write_names_the_file_and_leaves_nothing(tmp_path):
    def no_space(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as error:
        atomic_write(tmp_path / "table.json", no_space)
    assert str(error.value).startswith(
        f"no space left on the device while writing {tmp_path / 'table.json'}: free some space"
    )
    assert error.value.errno == errno.ENOSPC and isinstance(error.value, OSError)
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_the_build_is_one_line_and_the_build_resumes(
    tiny_base, data, tmp_path, capsys, monkeypatch
):
    import pandas as pd

    real = pd.DataFrame.to_parquet

    def no_space(self, path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")  # as pyarrow raises it: no path

    out = tmp_path / "art"
    monkeypatch.setattr(pd.DataFrame, "to_parquet", no_space)
    assert main(_argv(out, tiny_base, data)) == 2
    err = _error(capsys)
    assert "no space left on the device while writing " in err and ".parquet" in err, err
    assert "free some space there" in err and "run the command again" in err
    # nothing half-written in view: no directory, no staging folder, no temporary file
    assert not list(tmp_path.iterdir())
    monkeypatch.setattr(pd.DataFrame, "to_parquet", real)
    assert main(_argv(out, tiny_base, data)) == 0  # with space again, the same command builds
    assert main(["artifacts", "verify", str(out)]) == 0


def test_a_cache_that_is_a_file_fails_the_build_in_one_line(
    tiny_base, data, tmp_path, capsys, monkeypatch
):
    blocker = tmp_path / "cache"
    blocker.write_text("")
    monkeypatch.setenv("PERSONA_GYM_CACHE", str(blocker))
    code = main(_argv(tmp_path / "art", tiny_base, data))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"$PERSONA_GYM_CACHE is {blocker}, but {blocker} is a file, not a folder" in err


def test_changed_evaluation_results_are_evaluated_again(tmp_path):
    """Evaluate's results are not the simulator: a changed file there runs evaluate again
    (the other stages refuse); a record written before file hashes is trusted as it was."""
    from training.build import Stage, stage_action, stage_files

    root = tmp_path / "art"
    (root / "evaluation").mkdir(parents=True)
    (root / "evaluation" / "results.json").write_text('{"configs": []}')
    stage = Stage("evaluate", ["--configs", "persona:Ms"])
    done = {"settings": stage.settings, "files": stage_files(root, "evaluate")}
    record = {"stages": {"evaluate": done}}
    assert done["files"] == {"evaluation/results.json": done["files"]["evaluation/results.json"]}
    assert stage_action(stage, root, record, force=False) == "skip"
    (root / "evaluation" / "results.json").write_text('{"configs": [1]}')
    assert stage_action(stage, root, record, force=False) == "run"
    del done["files"]
    assert stage_action(stage, root, record, force=False) == "skip"
