"""The environments across processes, on the tiny tables with the table rater: Gymnasium's
``AsyncVectorEnv`` (one worker process per sub-environment) steps exactly like its
``SyncVectorEnv`` and like the native ``PersonaRecVectorEnv``; a seeded rollout gives the same
rewards, ratings and flags in two fresh interpreters (different hash seeds) as in this one."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from persona_gym.envs import EnvConfig, PersonaRecVectorEnv, load_env_config
from tests.envs import rollouts

ENV_ID = "PersonaML100K-v0"
ROOT = Path(__file__).resolve().parents[2]
# churn on and sampled rewards: resets, leaving and the random draws all take part
CHURN = {"reward": "sampled", "leave_prob": 0.5, "leave_threshold": 3.0}


def table_rater(config: dict[str, Any]):
    """The tiny tables' rater (window of 2, as ``tests/conftest.py::table_rater``)."""
    from persona_gym.simulator.table import TableRater

    return TableRater.from_artifacts(config["artifacts"], window_size=2)


def env_config(config: dict[str, Any], horizon: int) -> EnvConfig:
    """The tiny config with horizon ``horizon`` (also ``step_fraction``'s denominator, which
    ``gym.make(max_episode_steps=...)`` alone would not change)."""
    return load_env_config("ml100k", **{**config, "max_episode_steps": horizon})


def table_env(config: dict[str, Any], horizon: int) -> gym.Env:
    """A single env on the tiny tables, its table rater built in the calling process (a
    worker process of ``AsyncVectorEnv`` builds its own)."""
    import persona_gym  # noqa: F401  (registers the ids in a worker process)

    return gym.make(
        ENV_ID,
        config=env_config(config, horizon),
        max_episode_steps=horizon,
        rater=table_rater(config),
    )


def vector_trace(vec: gym.vector.VectorEnv, seed: int, n_steps: int) -> list[tuple]:
    """Reset with ``seed`` and take ``n_steps`` seeded allowed actions: every step's
    observation, reward, flags and users."""
    actions = np.random.default_rng(seed)
    obs, info = vec.reset(seed=seed)
    trace: list[tuple] = [(obs, None, None, None, info["user_id"])]
    for _ in range(n_steps):
        masks = info["action_mask"]
        action = np.array([actions.choice(np.flatnonzero(m)) for m in masks])
        obs, reward, terminated, truncated, info = vec.step(action)
        trace.append((obs, reward, terminated, truncated, info["user_id"]))
    return trace


def test_async_vector_env_equals_sync_and_native(tiny_config):
    n, horizon, seed, steps = 3, 5, 11, 20
    config = {**tiny_config, **CHURN}
    make = functools.partial(table_env, config, horizon)
    sync = gym.vector.SyncVectorEnv([make] * n)
    native = PersonaRecVectorEnv(
        num_envs=n, config=env_config(config, horizon), rater=table_rater(config)
    )
    async_ = gym.vector.AsyncVectorEnv([make] * n)
    try:
        got = vector_trace(async_, seed, steps)
    finally:
        async_.close()
    want, own = vector_trace(sync, seed, steps), vector_trace(native, seed, steps)
    rewards = np.array([t[1] for t in want[1:]])
    ends = np.array([t[2] | t[3] for t in want[1:]])
    assert ends.any() and len(np.unique(rewards)) > 2  # episodes ended; sampled rewards vary
    np.testing.assert_equal(got, want)  # exact: the same draws in another process
    for (obs_a, *rest_a), (obs_b, *rest_b) in zip(own, want, strict=True):
        for key in obs_b:
            np.testing.assert_allclose(obs_a[key], obs_b[key], atol=1e-6, err_msg=key)
        np.testing.assert_equal(rest_a, rest_b)


_ROLLOUT = """
import json, sys
from tests.envs.rollouts import rollout
from tests.envs.test_processes import table_env

print(json.dumps(rollout(table_env(json.loads(sys.argv[1]), 8), seeds=(0, 1, 2), steps=8)))
"""


def test_seeded_rollout_is_identical_in_fresh_processes(tiny_config):
    """Nothing depends on the process: no unseeded global RNG, no set or dict order that
    changes with the hash seed, no state left from earlier tests."""
    config = {**tiny_config, **CHURN}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _ROLLOUT, json.dumps(config)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": str(hash_seed)},
        )
        for hash_seed in (1, 2)
    ]
    outputs = []
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        outputs.append(json.loads(out))
    assert outputs[0] == outputs[1]  # bit for bit (JSON floats round-trip exactly)
    here = rollouts.rollout(table_env(config, 8), seeds=(0, 1, 2), steps=8)
    assert json.loads(json.dumps(here)) == outputs[0]
    steps = [s for episode in here for s in episode["steps"]]
    assert any(s["left"] for s in steps) and any(s["masked_action"] for s in steps)
