"""``persona-gym build``: ML-1M-format files (made from ML-100k users) to an evaluated simulator in
one command, resumed where it stopped, then ``evaluate`` from another folder (issue 20), with
``--all-users``: the users beyond the protocol's simulated and evaluated as new users.

The real stages run (MiniLM embeddings, the SmolLM2 tokenizer for distill's token counts) on
the tiny random base model of SmolLM2's layout with the smallest training settings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from persona_gym.cli import main
from tests.envs.test_ml1m import write_ml1m_folder
from training.build import EVALUATE_CONFIGS, SEQUENCE_EVALUATE_CONFIGS, STAGES


def _build(*extra: str, base: str) -> list[str]:
    return [
        "build",
        "ml1m",
        "--out",
        "art",
        "--n-users",
        "3",
        "--all-users",
        "--base-model",
        base,
        "--preset",  # the block trainer: its budget flags keep the build small
        "block",
        "--max-examples-per-user",
        "4",
        "--val-per-user",
        "1",
        "--max-test-per-user",
        "2",
        "--no-studies",
        "--no-compile",
        "--no-progress",
        *extra,
    ]


def test_build_end_to_end_resumes_and_evaluates_from_another_folder(
    tmp_path, monkeypatch, capsys, tiny_base
):
    work = tmp_path / "work"
    write_ml1m_folder(work / "ml1m", n_users=5)  # 3 protocol users, 2 others
    monkeypatch.chdir(work)  # the dataset and --out are given relative to here

    # a first run stopped after training (--no-evaluate) ...
    assert main(_build("--no-evaluate", base=tiny_base)) == 0
    out = capsys.readouterr().out
    for n, stage in enumerate(STAGES[:4], 1):
        assert f"[{n}/4] {stage}: " in out
    assert out.count(": done in ") == 3 and "is ready in " in out
    assert "distill: done in " in out and "3 users + 2 other users, " in out
    assert ", 2 other users given the nearest" in out
    root = work / "art"
    record = json.loads((root / "build.json").read_text())
    assert list(record["stages"]) == ["distill", "personas", "train"]

    # ... resumed with evaluation: the three finished stages are skipped, evaluate runs
    assert main(_build(base=tiny_base)) == 0
    out = capsys.readouterr().out
    assert out.count("done before (build.json), skipped") == 3
    assert "[5/5] evaluate: persona-gym evaluate --artifacts art --configs" in out
    assert "[5/5] evaluate: done in " in out and "test RMSE" in out
    log = (root / "build.log").read_text()
    for line in ("[2/4] distill: done in", "[4/4] train: done in", "[5/5] evaluate: done in"):
        assert line in log  # the progress lines of both runs, with the stages' own log records
    assert "training.train" in log  # the train stage's own records

    # the artifacts name the dataset by its absolute folder, and verify with the build's files
    folder = str((work / "ml1m").resolve())
    assert json.loads((root / "split.json").read_text())["dataset"] == folder
    assert json.loads((root / "manifest.json").read_text())["dataset"] == folder
    assert main(["artifacts", "verify", str(root)]) == 0
    _check_all_users(root, tiny_base)

    # evaluate from another folder, where "ml1m" means nothing
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                "--artifacts",
                str(root),
                "--configs",
                "persona:Ms+Ml",
                "--max-test-per-user",
                "2",
                "--no-studies",
                "--no-baselines",
                "--out",
                "report",
            ]
        )
        == 0
    )
    results = json.loads((elsewhere / "report" / "results.json").read_text())
    assert results["configs"][0]["status"] == "ok" and results["data"]["source"].startswith(folder)


def test_dry_run_prints_the_shipped_simulators_recipe(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["build", "ml-100k", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "[1/5] fetch: ml-100k: the bundled copy" in out
    lines = {line.split(":")[0]: line for line in out.splitlines() if line.startswith("[")}
    assert "persona-gym distill --out artifacts/ml100k --dataset ml-100k" in lines["[2/5] distill"]
    train = lines["[4/5] train"]
    # the shipped recipe (train's default preset), named; the build gives it the seed only
    assert train.endswith(
        ": persona-gym train --artifacts artifacts/ml100k --preset sequence --seed 0"
    ), train
    assert "--configs " + " ".join(SEQUENCE_EVALUATE_CONFIGS) + " --seed" in lines["[5/5] evaluate"]
    assert lines["[5/5] evaluate"].endswith("--compile")
    assert not (tmp_path / "artifacts").exists()  # nothing written


def test_run_flags_reach_the_block_trainer_only(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    flags = ["--no-compile", "--no-progress", "--device", "cuda", "--dry-run"]
    for preset, reaches in (("sequence", False), ("block", True)):
        assert main(["build", "ml-100k", "--preset", preset, *flags]) == 0
        out = capsys.readouterr().out.splitlines()
        lines = {line.split(":")[0]: line for line in out if line[:1] == "["}
        train, evaluate = lines["[4/5] train"], lines["[5/5] evaluate"]
        assert f"--preset {preset} " in train
        assert ("--no-compile" in train) == ("--device cuda" in train) == reaches, train
        assert "--device cuda" in evaluate and "--compile" not in evaluate
        configs = SEQUENCE_EVALUATE_CONFIGS if preset == "sequence" else EVALUATE_CONFIGS
        assert "--configs " + " ".join(configs) + " --seed" in evaluate


def test_artifacts_made_by_hand_or_with_other_settings_are_refused(tmp_path, monkeypatch, capsys):
    from tests.data.test_movielens import write_ml1m

    monkeypatch.chdir(tmp_path)
    write_ml1m(tmp_path / "ml1m")
    art = tmp_path / "art"
    art.mkdir()
    (art / "split.json").write_text("{}")  # what distill leaves, without the build's record
    assert main(["build", "ml1m", "--out", "art"]) == 2
    assert (
        "does not record (made stage by stage?): rebuild it with --force" in capsys.readouterr().err
    )
    settings = ["--dataset", str((tmp_path / "ml1m").resolve()), "--n-users", "100", "--seed", "0"]
    (art / "build.json").write_text(json.dumps({"stages": {"distill": {"settings": settings}}}))
    assert main(["build", "ml1m", "--out", "art"]) == 2
    err = capsys.readouterr().err
    assert "was built with other distill settings" in err and "--n-users 200" in err


def test_an_unknown_dataset_names_what_is_accepted(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["build", "ml-10m"]) == 2
    err = capsys.readouterr().err
    assert "neither a known dataset name (ml-100k, ml-1m" in err and err.count("\n") == 1


@pytest.mark.parametrize("flag", ["--n-users", "--max-test-per-user", "--epochs"])
def test_bad_budget_values_are_refused(flag, capsys):
    assert main(["build", "ml-100k", flag, "0", "--dry-run"]) == 2
    assert f"{flag} must be >= 1, got 0" in capsys.readouterr().err


def test_the_missing_ml1m_simulator_is_one_short_line_naming_build():
    import gymnasium as gym

    import persona_gym  # noqa: F401  (registers the ids)

    with pytest.raises(FileNotFoundError) as err:
        gym.make("PersonaML1M-v0")
    text = str(err.value)
    assert "`persona-gym build ml-1m --out DIR`" in text and "artifacts='DIR'" in text
    # what is missing and the one command: no package path the user never typed, no recipe
    assert "\n" not in text and len(text) <= 160, text
    assert "site-packages" not in text and "default_artifacts" not in text and "/" not in text


def _check_all_users(root, tiny_base) -> None:
    """What ``--all-users`` adds: the other users distilled from their training part only,
    given the nearest centroid's persona, left out of the adapters' training, evaluated apart,
    and drawn by the env (``users="all"``, or only the training users with ``users="training"``)."""
    import gymnasium as gym

    from persona_gym.artifacts import load_artifacts
    from persona_gym.data.protocol import logged_data, read_split_record, rebuild_split

    info = read_split_record(root)
    assert info["params"]["all_users"] is True
    _, split = rebuild_split(info)
    protocol, others = [int(u) for u in split.user_ids], [int(u) for u in split.other_ids]
    assert (
        len(protocol) == 3
        and len(others) == 2
        and info["distilled_user_ids"] == sorted(protocol + others)
    )
    artifacts = load_artifacts(root)
    assert (
        artifacts.user_ids == sorted(protocol + others) and artifacts.training_user_ids == protocol
    )
    memories = artifacts.memories
    held = {
        (int(u), int(i))
        for u, i in zip(split.other_test["user_id"], split.other_test["item_id"], strict=True)
    }
    logged = {
        (int(u), int(i)) for u, i in zip(memories["user_id"], memories["item_id"], strict=True)
    }
    assert held and not held & logged  # the others' held-out ratings are nobody's memory ...
    for user in others:  # ... their memories are the first 60% of their ratings in time order
        mine = split.other_test[split.other_test["user_id"] == user]
        assert memories[memories["user_id"] == user]["timestamp"].max() <= mine["timestamp"].min()
    # ... and the collaborative model's out-of-fold predictions cover their training rows only
    cf = artifacts.collaborative
    keys = set(cf.logged_keys.tolist())
    n_items = len(artifacts.catalog)
    others_rows = memories[memories["user_id"].isin(others)]
    assert set((others_rows["user_id"] * n_items + others_rows["item_index"]).tolist()) <= keys
    held_index = artifacts.catalog.indices_of(split.other_test["item_id"])
    assert not set((split.other_test["user_id"].to_numpy() * n_items + held_index).tolist()) & keys

    personas = json.loads((root / "personas.json").read_text())
    assert set(personas["assignment"]) == {str(u) for u in protocol + others}
    assert sum(personas["by_nearest_centroid"].values()) == 2
    assert (
        sorted(u for card in personas["cards"] for u in card["user_ids"]) == protocol
    )  # clustered: protocol only
    manifest = json.loads((root / "manifest.json").read_text())
    # 4 training + 1 validation example (--max-examples-per-user 4 --val-per-user 1) for each
    # protocol user, none for the others
    assert manifest["metrics"]["run"]["examples"] == 3 * 5

    report = json.loads((root / "evaluation" / "others" / "results.json").read_text())
    assert report["data"]["users"] == "others" and report["data"]["n_users"] == 2
    assert report["configs"][0]["status"] == "ok" and report["data"]["source"].endswith(
        "other users"
    )
    assert logged_data(artifacts, "others").test["user_id"].isin(others).all()
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "all_users.py"
    table = subprocess.run(
        [sys.executable, str(script), str(root)], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    assert table[0] == "| | adapters' training users | users the adapters never saw |"
    assert "| users / rated test interactions | 3 / 6 | 2 / 4 |" in table

    for users, expected in (("all", protocol + others), ("training", protocol)):
        env = gym.make(
            "persona_gym:PersonaML1M-v0", artifacts=str(root), base_model=tiny_base, users=users
        )
        assert env.unwrapped.user_ids == sorted(expected)
        seen = {env.reset(seed=seed)[1]["user_id"] for seed in range(40)}
        assert seen == set(expected)
        env.close()
