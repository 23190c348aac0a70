"""The environment's ``leave_rule="model"``: churn at the leave model's rate, never on masked
steps; the default rule is unchanged."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest

import persona_gym  # noqa: F401  (registers the env ids)
from persona_gym.leave import LeaveModel, load_leave_model

ENV_ID = "PersonaML100K-v0"


@pytest.fixture
def leave_kwargs(tiny_kwargs, tmp_path) -> dict:
    """The tiny env with a leave model whose P(leave) falls with the rating (large enough for
    a binomial check in a few hundred steps)."""
    model = LeaveModel((-0.6, 0.0, 0.3, 0.0), 0.5)
    path = model.save(tmp_path / "leave.json")
    return {
        **tiny_kwargs,
        "leave_rule": "model",
        "leave_model": str(path),
        "reward": "sampled",
        "max_episode_steps": 50,
    }


def test_env_churns_at_the_models_rate(leave_kwargs):
    env = gym.make(ENV_ID, **leave_kwargs)
    core = env.unwrapped.core
    actions = np.random.default_rng(0)
    leaves, expected, variance, masked = 0, 0.0, 0.0, 0
    for episode in range(150):
        env.reset(seed=episode)
        while True:
            _, _, terminated, truncated, info = env.step(int(actions.integers(6)))
            if info["masked_action"]:
                masked += 1
                assert not terminated and not info["left"]  # masked steps never churn
            else:
                p = core.leave_probability(env.unwrapped.state)
                expected, variance = expected + p, variance + p * (1 - p)
                leaves += int(info["left"])
                assert terminated == info["left"] or truncated
            if terminated or truncated:
                break
    assert masked > 50 and expected > 50
    assert abs(leaves - expected) < 4 * math.sqrt(variance)


def test_default_rule_unchanged_and_bad_rule_refused(tiny_kwargs):
    env = gym.make(ENV_ID, **tiny_kwargs)
    assert env.unwrapped.core.leave_model is None
    with pytest.raises(ValueError, match="leave_rule"):
        gym.make(ENV_ID, **{**tiny_kwargs, "leave_rule": "random"})
    shipped = gym.make(ENV_ID, **{**tiny_kwargs, "leave_rule": "model"})
    assert shipped.unwrapped.core.leave_model == load_leave_model()
