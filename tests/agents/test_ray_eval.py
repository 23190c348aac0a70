"""``evaluate-policy --ray-workers N`` on a local Ray instance (2 CPUs, started once for the
module through :func:`agents.ray_eval.ray_session`): the episodes split over Ray actors give
exactly the single-process results, through the API and the CLI; the bad settings' one-line
errors. Tiny tables, table rater (picklable: the actors rebuild the env core in their own
process), churn on so the per-episode draws matter."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from agents.evaluate import PolicyEvalConfig, evaluate_policies, simulate
from agents.policies import make_policy
from agents.ray_eval import chunks, ray_available
from persona_gym.envs import load_env_config
from persona_gym.envs.core import RecCore
from tests.test_reliability_cli import assert_one_line
from tests.test_reliability_cli import run as run_cli

needs_ray = pytest.mark.skipif(
    not ray_available(),
    reason="Ray is not installed: pip install "
    "'persona-gym[ray]' (`make install` installs it, so CI runs these)",
)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray instance with 2 CPUs for the module (started and shut down by ray_session)."""
    import ray

    from agents.ray_eval import ray_session

    assert not ray.is_initialized()
    with ray_session(2):
        yield ray
    assert not ray.is_initialized()


@pytest.fixture
def churn_core(tiny_config, table_artifacts) -> RecCore:
    """The tiny tables' core with churn on, rated by the (picklable) table rater."""
    from persona_gym.simulator.table import TableRater

    config = load_env_config("ml100k", **{**tiny_config, "leave_prob": 0.5})
    return RecCore(config, TableRater.from_artifacts(table_artifacts, window_size=2))


@pytest.fixture
def logged(churn_core) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": churn_core.user_ids,
            "item_index": [0, 1, 2, 3],
            "rating": [5.0, 4.0, 2.0, 1.0],
            "timestamp": [1, 1, 1, 1],
        }
    )


def _policies(core: RecCore, ratings: pd.DataFrame) -> dict:
    mf = make_policy("mf", core, ratings)
    return {
        "random": make_policy("random", core),
        "most-popular": make_policy("most-popular", core),
        "item-mean": make_policy("item-mean", core, ratings),
        "mf": mf,
        "simulator-greedy": make_policy("simulator-greedy", core, ratings, mf=mf),
    }


def _without_seconds(results: dict) -> dict:
    return {
        **results,
        "policies": {
            n: {k: v for k, v in e.items() if k != "seconds"}
            for n, e in results["policies"].items()
        },
    }


def test_chunks_are_whole_batches_in_order():
    assert chunks(7, 2, 2) == [(0, 4), (4, 7)]
    assert chunks(16, 4, 3) == [(0, 8), (8, 12), (12, 16)]
    assert chunks(5, 16, 2) == [(0, 5)]  # one batch: one chunk
    assert chunks(6, 1, 4) == [(0, 2), (2, 4), (4, 5), (5, 6)]
    for episodes, n_envs, workers in [(7, 2, 2), (33, 4, 5), (1, 1, 3), (12, 5, 2)]:
        parts = chunks(episodes, n_envs, workers)
        assert [e for first, end in parts for e in range(first, end)] == list(range(episodes))
        assert all(first % n_envs == 0 for first, _ in parts)


def test_a_chunk_replays_its_episodes(churn_core, ratings):
    """simulate from a batch boundary plays those episodes as the run from episode 0 does (the
    property the split rests on), whatever the process played before."""
    policy = make_policy("random", churn_core)
    whole = simulate(policy, churn_core, 7, seed=3, n_envs=2)
    tail = simulate(make_policy("random", churn_core), churn_core, 7, seed=3, n_envs=2, first=4)
    assert tail == whole[4:]
    assert any(r["left"] for r in whole) and any(not r["left"] for r in whole)  # churn is on
    with pytest.raises(ValueError, match="first episode 8 outside 0..7"):
        simulate(policy, churn_core, 7, seed=3, n_envs=2, first=8)


@needs_ray
def test_ray_workers_give_the_single_process_results(ray_cluster, churn_core, ratings, logged):
    """3 actors on the 2 CPUs (each reserves 2/3 of one), uneven chunks (4, 2 and 1 episodes)."""
    workers = 3
    config = dict(episodes=7, seeds=(0, 3), n_envs=2, k=2)
    alone = evaluate_policies(
        churn_core, _policies(churn_core, ratings), PolicyEvalConfig(**config), logged, n_users=4
    )
    spread = evaluate_policies(
        churn_core,
        _policies(churn_core, ratings),
        PolicyEvalConfig(**config, ray_workers=workers),
        logged,
        n_users=4,
    )
    assert _without_seconds(spread) == _without_seconds(alone)
    assert spread["config"] == {"episodes": 7, "seeds": [0, 3], "n_envs": 2, "k": 2, "logged": True}
    assert spread["policies"]["random"]["simulator"]["episodes"] == 14
    assert ray_cluster.is_initialized()  # an open session is left running
    assert ray_cluster.cluster_resources()["CPU"] == 2


@needs_ray
def test_cli_ray_workers_writes_the_same_results(
    ray_cluster, capsys, tmp_path, monkeypatch, churn_core, ratings, logged
):
    """The CLI with --ray-workers 2 writes the results.json of the single-process CLI run (the
    simulator replaced by the table rater: the tiny tables have no adapters)."""
    monkeypatch.setattr(
        "agents.evaluate.load_evaluation",
        lambda env_id, dtype, **overrides: (churn_core, ratings, logged, 4),
    )
    argv = [
        "evaluate-policy",
        "--policies",
        "random",
        "mf",
        "simulator-greedy",
        "--episodes",
        "5",
        "--seeds",
        "0",
        "1",
        "--n-envs",
        "2",
        "--k",
        "2",
    ]
    outputs = []
    for extra, out in [((), tmp_path / "alone"), (("--ray-workers", "2"), tmp_path / "ray")]:
        code, _, err = run_cli(capsys, *argv, *extra, "--out", out)
        assert code == 0, err
        outputs.append(_without_seconds(json.loads((out / "results.json").read_text())))
    assert outputs[1] == outputs[0]
    assert outputs[1]["policies"]["simulator-greedy"]["simulator"]["episodes"] == 10


@pytest.fixture
def no_evaluation_work(monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("evaluate-policy started work before checking its arguments")

    monkeypatch.setattr("agents.evaluate.load_evaluation", started)


@pytest.mark.parametrize("value", ["0", "-2"])
def test_ray_workers_below_one_fail_before_work(capsys, tmp_path, no_evaluation_work, value):
    assert_one_line(
        run_cli(capsys, "evaluate-policy", "--ray-workers", value, "--out", tmp_path / "out"),
        "evaluate-policy",
        "(--ray-workers) must be >= 1",
        value,
    )


def test_ray_missing_names_the_extra(capsys, tmp_path, no_evaluation_work, monkeypatch):
    monkeypatch.setattr("agents.ray_eval.ray_available", lambda: False)
    assert_one_line(
        run_cli(capsys, "evaluate-policy", "--ray-workers", "2", "--out", tmp_path / "out"),
        "evaluate-policy",
        "--ray-workers",
        "Ray is not installed",
        "pip install 'persona-gym[ray]'",
    )
    with pytest.raises(ImportError, match=r"persona-gym\[ray\]"):
        from agents.ray_eval import ray_session

        with ray_session(2):
            pass
