"""A run of every working command of ``persona-gym`` on the tiny fixtures, in-process through
:func:`persona_gym.cli.main`: ``train``, ``evaluate``, ``train-agent``, ``evaluate-policy`` and
``demo`` each once on good input (the files they write and a value in them) and once on bad
input (exit status 2 and ONE line naming the bad flag, value or file and the fix).

``data``, ``distill`` and ``personas`` have theirs in ``test_cli.py``, ``distill/`` and
``training/``; ``test_reliability_cli.py`` holds more bad inputs of every command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import write_tiny_artifacts
from tests.test_reliability_cli import assert_one_line, run

# the tiny trained artifacts' users in an env: every item allowed, churn off
TINY_ENV = [
    "--env-kwargs",
    "dataset=synthetic",
    "mask_rated=false",
    "leave_rule=threshold",
    "leave_prob=0",
    "obs_window=3",
]


def logged_test(root: Path) -> pd.DataFrame:
    """The artifacts' logged test interactions, rebuilt from their ``split.json``."""
    from persona_gym.artifacts import load_artifacts
    from persona_gym.data.protocol import logged_data

    return logged_data(load_artifacts(root)).test


# -- train ---------------------------------------------------------------------------------------
def test_train_run_writes_the_adapters_and_prints_their_metrics(
    capsys, tmp_path, catalog, tiny_base
):
    from persona_gym.artifacts import load_artifacts

    art = write_tiny_artifacts(tmp_path / "art", catalog)
    code, out, err = run(
        capsys,
        "train",
        "--artifacts",
        art,
        "--preset",
        "paper",
        "--base-model",
        tiny_base,
        "--variants",
        "persona",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--lora-layers",
        "2",
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--blocks-per-sequence",
        "2",
        "--max-examples-per-user",
        "0",
        "--val-per-user",
        "1",
        "--window",
        "2",
        "--memories",
        "1",
        "--max-tokens",
        "256",
        "--checkpoint-every",
        "3",
        "--no-progress",
        "--no-compile",
    )
    assert code == 0, err
    loaded = load_artifacts(art)
    assert set(loaded.adapter_dirs) == {"persona-0", "persona-1"}
    metrics = loaded.manifest["metrics"]["adapters"]
    # users 0, 2 (persona 0) and 1, 3 (persona 1): 6 ratings each, the last one for validation
    assert [metrics[a]["train_examples"] for a in ("persona-0", "persona-1")] == [10, 10]
    assert (
        loaded.manifest["training"]["rank"] == 4
        and loaded.manifest["training"]["checkpoint_every"] == 3
    )
    lines = out.splitlines()
    assert lines[0].split()[:8] == [
        "persona-0:",
        "10",
        "examples,",
        str(metrics["persona-0"]["steps"]),
        "steps,",
        "val",
        "RMSE",
        f"{metrics['persona-0']['best_val_rmse']:.4f},",
    ]
    assert json.loads(lines[2])["examples"] == 24  # 4 users x 6 ratings (training + validation)


def test_train_on_a_folder_without_distill_outputs(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line(
        run(capsys, "train", "--artifacts", tmp_path / "empty"),
        "train",
        str(tmp_path / "empty"),
        "persona-gym distill",
    )


# -- evaluate ------------------------------------------------------------------------------------
def test_evaluate_run_reads_the_split_and_writes_the_report(capsys, tmp_path, protocol_artifacts):
    out_dir = tmp_path / "eval"
    code, out, err = run(
        capsys,
        "evaluate",
        "--artifacts",
        protocol_artifacts,
        "--configs",
        "persona:Ms+Ml",
        "--max-test-per-user",
        "2",
        "--no-studies",
        "--dtype",
        "float32",
        "--out",
        out_dir,
    )
    assert code == 0, err
    results = json.loads((out_dir / "results.json").read_text())
    test = logged_test(protocol_artifacts)
    assert results["data"]["n_test_total"] == len(test) and results["data"]["n_evaluated"] == 8
    predictions = pd.read_parquet(out_dir / "predictions.parquet")
    first_two = test.sort_values(["user_id", "timestamp", "item_id"]).groupby("user_id").head(2)
    assert sorted(zip(predictions["user_id"], predictions["item_id"], strict=True)) == sorted(
        zip(first_two["user_id"], first_two["item_id"], strict=True)
    )
    errors = predictions["pred:persona:Ms+Ml"] - predictions["rating"]
    rmse = results["configs"][0]["expected"]["rmse"]
    assert rmse == pytest.approx(math.sqrt((errors**2).mean()))
    assert f"{rmse:.3f}" in (out_dir / "report.md").read_text() and f"{rmse:.3f}" in out
    assert not (protocol_artifacts / "evaluation").exists()  # --out, not the artifacts


def test_evaluate_bad_config_names_the_form(capsys, protocol_artifacts, tmp_path):
    assert_one_line(
        run(
            capsys,
            "evaluate",
            "--artifacts",
            protocol_artifacts,
            "--configs",
            "persona:XY",
            "--out",
            tmp_path / "eval",
        ),
        "evaluate",
        "'persona:XY'",
        "VARIANT:MEMORIES",
        "'persona:Ms+Ml'",
    )
    assert not (tmp_path / "eval").exists()


# -- train-agent ---------------------------------------------------------------------------------
def test_train_agent_run_writes_the_run_folder(capsys, tmp_path, protocol_artifacts):
    """An item-scoring MaskablePPO (its collaborative features fitted on the split's training
    ratings) on the protocol artifacts' SLM users."""
    from agents.policies import SB3Policy
    from agents.runs import read_run

    code, out, err = run(
        capsys,
        "train-agent",
        "--artifacts",
        protocol_artifacts,
        "--env",
        "PersonaML1M-v0",
        "--policy",
        "items",
        "--dtype",
        "float32",
        "--timesteps",
        "16",
        "--n-envs",
        "2",
        "--n-steps",
        "4",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "8",
        "--out",
        tmp_path,
        "--no-progress",
    )
    assert code == 0, err
    (run_dir,) = tmp_path.iterdir()
    assert out.strip().endswith(f"{run_dir}/model.zip") and "for 16 steps" in out
    info = read_run(run_dir)
    assert info["timesteps"] == 16 and info["config"]["env_kwargs"] == {
        "artifacts": str(protocol_artifacts)
    }
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [
        "model_16_steps.zip",
        "model_8_steps.zip",
    ]
    for name in ("features.npz", "run.json", "monitor.csv", "learning_curve.png"):
        assert (run_dir / name).is_file(), name
    assert SB3Policy.load(run_dir).features is not None


def test_train_agent_unknown_env_setting(capsys, tmp_path):
    assert_one_line(
        run(capsys, "train-agent", "--env-kwargs", "horizon=3", "--out", tmp_path),
        "train-agent",
        "'horizon'",
        "max_episode_steps",
    )
    assert not list(tmp_path.iterdir())


# -- evaluate-policy -----------------------------------------------------------------------------
def test_evaluate_policy_run_writes_the_comparison(capsys, tmp_path, protocol_artifacts):
    code, out, err = run(
        capsys,
        "evaluate-policy",
        "--env",
        "PersonaML1M-v0",
        "--artifacts",
        protocol_artifacts,
        "--policies",
        "random",
        "item-mean",
        "mf",
        "--episodes",
        "2",
        "--seeds",
        "0",
        "1",
        "--n-envs",
        "2",
        "--k",
        "5",
        "--dtype",
        "float32",
        "--env-kwargs",
        "max_episode_steps=5",
        "--out",
        tmp_path / "eval",
    )
    assert code == 0, err
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert set(results["policies"]) == {"random", "item-mean", "mf"}
    n_test = len(logged_test(protocol_artifacts))
    for name, entry in results["policies"].items():
        assert entry["simulator"]["episodes"] == 4, name  # 2 episodes x 2 seeds
        assert entry["logged"]["test_interactions"] == n_test, name
    assert results["env"] == {
        "id": "PersonaML1M-v0",
        "dtype": "float32",
        "max_episode_steps": 5,
        "artifacts": str(protocol_artifacts),
    }
    assert "| item-mean |" in (tmp_path / "eval" / "report.md").read_text() and "item-mean" in out
    assert (tmp_path / "eval" / "policies.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_policy_unknown_policy(capsys, tmp_path, protocol_artifacts):
    assert_one_line(
        run(
            capsys,
            "evaluate-policy",
            "--env",
            "PersonaML1M-v0",
            "--artifacts",
            protocol_artifacts,
            "--policies",
            "greedy",
            "--dtype",
            "float32",
            "--out",
            tmp_path / "eval",
        ),
        "evaluate-policy",
        "'greedy'",
        "most-popular",
        "persona-gym train-agent",
    )


# -- demo ----------------------------------------------------------------------------------------
def test_demo_smoke_run_on_a_trained_simulator(capsys, tmp_path, protocol_artifacts):
    """The demo's whole job on the protocol artifacts: the baselines (the shipped agent left
    out: another catalogue), 2 episodes each and the logged data, the report files."""
    code, out, err = run(
        capsys,
        "demo",
        "--artifacts",
        protocol_artifacts,
        "--episodes",
        "2",
        "--train-steps",
        "0",
        "--dtype",
        "float32",
        "--out",
        tmp_path / "demo",
    )
    assert code == 0, err
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(results["policies"]) == {"random", "most-popular", "mf"}
    assert all(e["simulator"]["episodes"] == 2 for e in results["policies"].values())
    assert results["policies"]["mf"]["logged"]["test_interactions"] == len(
        logged_test(protocol_artifacts)
    )
    report = (tmp_path / "demo" / "report.md").read_text()
    assert f"Main job on the simulator `{protocol_artifacts}` (float32), seed 0." in report
    assert "| most-popular |" in out and "report: " in out
    assert "Best in the simulator: " in report and "Best in the simulator: " in out
    assert "(simulator " in out and "evaluation " in out  # the time of each part


def test_demo_missing_simulator(capsys, tmp_path):
    assert_one_line(
        run(capsys, "demo", "--artifacts", tmp_path / "nowhere", "--out", tmp_path / "demo"),
        "demo",
        str(tmp_path / "nowhere" / "manifest.json"),
        "persona-gym build ml-100k --out",
    )


def test_demo_bad_episodes_fail_before_work(capsys, tmp_path, monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("the demo started work before checking its arguments")

    monkeypatch.setattr("agents.evaluate.load_evaluation", started)
    assert_one_line(
        run(capsys, "demo", "--episodes", "0", "--out", tmp_path / "demo"),
        "demo",
        "(--episodes) must be >= 1",
    )
