"""The agents' files as a user may find them: a tampered ``run.json``, a truncated checkpoint, a
changed model or feature file, a conflicting ``--artifacts`` under ``--resume``, a model of
another environment. Each is a real file written by ``train-agent`` / ``ship_agent`` on the tiny
tables (table rater) and then damaged; each is refused with ONE line naming the file, the field
and the fix, or (a broken newest checkpoint) skipped with one warning line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from agents.policies import SB3Policy, make_policy
from agents.runs import FEATURES_FILE, MANIFEST_FILE, latest_checkpoint, read_run, ship_agent
from agents.train import AgentConfig, train_agent
from persona_gym.errors import ConfigError
from tests.test_reliability_cli import assert_one_line, run


def settings(out: Path, tiny_config: dict, **kwargs) -> AgentConfig:
    values = dict(
        policy="items",
        timesteps=16,
        n_envs=2,
        n_steps=4,
        batch_size=4,
        checkpoint_every=8,
        out=str(out),
        env_kwargs=dict(tiny_config),
    )
    return AgentConfig(**{**values, **kwargs})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_config, table_artifacts, ratings) -> Path:
    """One item-scoring MaskablePPO run (16 steps, checkpoints at 8 and 16), trained once."""
    from persona_gym.simulator.table import TableRater

    rater = TableRater.from_artifacts(table_artifacts, window_size=2)
    out = tmp_path_factory.mktemp("agent-runs")
    return train_agent(settings(out, tiny_config), progress=False, rater=rater, ratings=ratings)


@pytest.fixture
def run_dir(tmp_path, trained_run) -> Path:
    """A fresh copy of the trained run, free to damage."""
    return Path(shutil.copytree(trained_run, tmp_path / trained_run.name))


def edit_run_json(run_dir: Path, edit) -> None:
    path = run_dir / "run.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text.strip(), text
    return text


# -- run.json: a schema --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda d: d.update(note="mine"), ["'note'", "unknown field"]),
        (lambda d: d.pop("config"), ["'config' is missing"]),
        (lambda d: d["config"].update(horizon=3), ["config.horizon", "unknown field"]),
        (lambda d: d["config"].update(timesteps="many"), ["config.timesteps", "'many'"]),
        (lambda d: d.update(algo="ppo"), ["algo 'ppo'", "config.algo 'maskable-ppo'"]),
        (lambda d: d["config"].update(policy="items", algo="dqn"), ["config", "maskable-ppo"]),
        (lambda d: d.clear() or d.update(config=[]), ["'config' must be an object"]),
    ],
    ids=[
        "unknown-key",
        "no-config",
        "unknown-config-key",
        "bad-type",
        "algo-differs",
        "bad-pair",
        "config-list",
    ],
)
def test_a_tampered_run_json_is_refused_under_resume(capsys, run_dir, edit, words):
    edit_run_json(run_dir, edit)
    line = assert_one_line(
        run(capsys, "train-agent", "--resume", run_dir, "--no-progress"),
        "train-agent",
        str(run_dir / "run.json"),
        *words,
    )
    assert "start a new run" in line or "restore" in line


def test_run_json_that_is_not_an_object_is_refused(run_dir):
    (run_dir / "run.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must be a JSON object") as err:
        read_run(run_dir)
    one_line(err.value)


def test_another_algorithm_in_a_consistent_run_json_is_refused(run_dir, table_rater, tiny_config):
    """``algo`` and ``config.algo`` both edited to ``ppo`` (the model is a MaskablePPO): the
    manifest's hash of run.json refuses it; without a manifest, loading the model does."""

    def to_ppo(data: dict) -> None:
        data["algo"] = data["config"]["algo"] = "ppo"
        data["config"]["policy"] = "mlp"

    edit_run_json(run_dir, to_ppo)
    with pytest.raises(ConfigError, match=r"run\.json: sha256 differs from .*manifest\.json"):
        train_agent(
            settings(run_dir.parent, tiny_config), resume=run_dir, progress=False, rater=table_rater
        )
    (run_dir / MANIFEST_FILE).unlink()
    with pytest.raises(ConfigError, match=r"model_16_steps\.zip: not a ppo model") as err:
        train_agent(
            settings(run_dir.parent, tiny_config), resume=run_dir, progress=False, rater=table_rater
        )
    assert "start a new run" in one_line(err.value)
    with pytest.raises(ConfigError, match=r"model\.zip: not a ppo model"):
        SB3Policy.load(run_dir)


# -- checkpoints: the newest intact one ----------------------------------------------------------
@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
def test_a_truncated_newest_checkpoint_is_skipped_with_one_warning(
    run_dir, table_rater, tiny_config, ratings, caplog, manifest
):
    newest = run_dir / "checkpoints" / "model_16_steps.zip"
    truncate(newest)
    if not manifest:
        (run_dir / MANIFEST_FILE).unlink()
    caplog.set_level("INFO")
    resumed = train_agent(
        settings(run_dir.parent, tiny_config, timesteps=24),
        resume=run_dir,
        progress=False,
        rater=table_rater,
        ratings=ratings,
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if not manifest:  # the other warning: the run's files before the resume are not verified
        assert sum(MANIFEST_FILE in w for w in warnings) == 1
        warnings = [w for w in warnings if MANIFEST_FILE not in w]
    assert len(warnings) == 1 and str(newest) in warnings[0], warnings
    assert "model_8_steps.zip" in warnings[0]
    infos = [r.getMessage() for r in caplog.records]
    assert any("from model_8_steps.zip (8 steps)" in m for m in infos), infos
    assert read_run(resumed)["timesteps"] == 24
    SB3Policy.load(resumed)  # the rewritten files are recorded in the manifest again
    assert latest_checkpoint(resumed)[1] == 24


def test_no_intact_checkpoint_is_refused(run_dir):
    for path in (run_dir / "checkpoints").glob("*.zip"):
        truncate(path)
    with pytest.raises(ConfigError, match="no intact checkpoint") as err:
        latest_checkpoint(run_dir)
    assert "model_8_steps.zip" in one_line(err.value) and "model_16_steps.zip" in str(err.value)


# -- --resume with other settings ----------------------------------------------------------------
def test_resume_with_other_artifacts_is_refused(capsys, run_dir, tmp_path):
    before = (run_dir / "run.json").read_bytes()
    assert_one_line(
        run(capsys, "train-agent", "--resume", run_dir, "--artifacts", tmp_path / "other"),
        "train-agent",
        f"--artifacts {tmp_path / 'other'}",
        "recorded",
        "drop --artifacts",
    )
    assert_one_line(
        run(capsys, "train-agent", "--resume", run_dir, "--env-kwargs", "obs_window=4"),
        "train-agent",
        "obs_window",
        "recorded",
    )
    assert_one_line(
        run(capsys, "train-agent", "--resume", run_dir, "--seed", "7"),
        "train-agent",
        "--seed 7",
        "recorded seed 0",
    )
    assert (run_dir / "run.json").read_bytes() == before


# -- manifests: run folders and the shipped agent ------------------------------------------------
def test_a_run_folder_records_its_files(run_dir):
    files = json.loads((run_dir / MANIFEST_FILE).read_text())["files"]
    assert {"run.json", "model.zip", FEATURES_FILE, "checkpoints/model_8_steps.zip"} <= set(files)
    assert all(len(h) == 64 for h in files.values())


def scale_user_vectors(path: Path, factor: float) -> None:
    with np.load(path) as data:
        arrays = dict(data)
    arrays["user_vectors"] = arrays["user_vectors"] * factor
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


def test_changed_shipped_files_are_refused(run_dir, tmp_path, core):
    dest = ship_agent(run_dir, tmp_path / "shipped" / "agent")
    files = json.loads((dest / MANIFEST_FILE).read_text())["files"]
    assert sorted(files) == sorted(
        ["model.zip", "run.json", FEATURES_FILE, "eval.csv", "learning_curve.png"]
        if (dest / "eval.csv").exists()
        else ["model.zip", "run.json", FEATURES_FILE, "learning_curve.png"]
    )
    SB3Policy.load(dest)
    scale_user_vectors(dest / FEATURES_FILE, 1000.0)
    with pytest.raises(ConfigError) as err:
        SB3Policy.load(dest)
    assert f"{dest / FEATURES_FILE}: sha256 differs from {dest / MANIFEST_FILE}" in one_line(
        err.value
    )


def test_a_changed_model_in_a_run_folder_is_refused(run_dir):
    path = run_dir / "model.zip"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=r"model\.zip: sha256 differs") as err:
        SB3Policy.load(run_dir)
    assert "start a new run" in one_line(err.value)


def test_the_shipped_agent_verifies(monkeypatch, tmp_path):
    """The shipped agent's manifest matches its files; a copy with a changed file or without a
    manifest is refused."""
    from agents import runs

    SB3Policy.load(runs.SHIPPED_AGENT)
    copy = Path(shutil.copytree(runs.SHIPPED_AGENT, tmp_path / "PersonaML100K-v0"))
    monkeypatch.setattr(runs, "SHIPPED_AGENT", copy)
    scale_user_vectors(copy / FEATURES_FILE, 1000.0)
    with pytest.raises(ConfigError, match="sha256 differs") as err:
        SB3Policy.load(copy)
    assert "make agent" in one_line(err.value)
    (copy / MANIFEST_FILE).unlink()
    with pytest.raises(ConfigError, match=f"{MANIFEST_FILE} is missing"):
        SB3Policy.load(copy)


def test_a_broken_manifest_is_refused(run_dir):
    (run_dir / MANIFEST_FILE).write_text('{"files": {"run.json": "abc"}}')
    with pytest.raises(ConfigError, match="not a SHA-256") as err:
        SB3Policy.load(run_dir)
    one_line(err.value)


def test_a_run_folder_without_a_manifest_loads_with_a_warning(run_dir, caplog):
    (run_dir / MANIFEST_FILE).unlink()
    SB3Policy.load(run_dir)
    assert any(MANIFEST_FILE in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    truncate(run_dir / "model.zip")  # unverified, yet still refused in one line when loaded
    with pytest.raises(ConfigError, match=r"model\.zip: not a maskable-ppo model") as err:
        SB3Policy.load(run_dir)
    one_line(err.value)


# -- a model of another environment --------------------------------------------------------------
def test_a_model_of_another_env_is_refused_at_load(run_dir, tiny_config, table_rater):
    from persona_gym.envs import load_env_config
    from persona_gym.envs.core import RecCore

    wider = RecCore(load_env_config("ml100k", **{**tiny_config, "obs_window": 4}), table_rater)
    with pytest.raises(ConfigError, match="recent_items") as err:
        make_policy(str(run_dir), wider)
    assert "trained on" in one_line(err.value) and str(run_dir / "model.zip") in str(err.value)
    other = RecCore(load_env_config("ml100k", **{**tiny_config, "dataset": "ml-1m"}), table_rater)
    with pytest.raises(ConfigError, match="dataset 'synthetic'"):
        make_policy(str(run_dir), other)


def test_the_shipped_agent_on_another_env_is_refused(core):
    with pytest.raises(ConfigError, match=r"Discrete\(1682\)") as err:
        make_policy("agent", core)
    assert "PersonaML100K-v0" in one_line(err.value)
