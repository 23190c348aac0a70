"""Adversarial tests of the environment's settings and episode order: non-finite numbers, wrong
types, empty or broken YAML, unusable devices and users fail when the env is made (or reset),
naming the field; a step after the episode ended is refused until reset."""

from __future__ import annotations

import math

import gymnasium as gym
import numpy as np
import pytest

import persona_gym  # noqa: F401  (registers the env ids)
from persona_gym.envs.config import EnvConfig, load_env_config

ENV_ID = "PersonaML100K-v0"
FLOATS = (
    "reward_scale",
    "reward_offset",
    "repeat_penalty",
    "leave_threshold",
    "like_threshold",
    "leave_prob",
)


@pytest.fixture(scope="module")
def kwargs(trained_tiny_artifacts) -> dict:
    return {
        "artifacts": str(trained_tiny_artifacts),
        "dataset": "synthetic",
        "mask_rated": False,
        "leave_rule": "threshold",
        "leave_prob": 0.0,
        "obs_window": 3,
    }


@pytest.mark.parametrize("field", FLOATS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(field, value):
    with pytest.raises(ValueError, match=f"EnvConfig.{field} must be a finite number"):
        EnvConfig(**{field: value})


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", ".NaN"])
def test_yaml_non_finite_numbers_are_refused(tmp_path, text):
    path = tmp_path / "env.yaml"
    path.write_text(f"artifacts: ml-100k\nreward_scale: {text}\n")
    with pytest.raises(ValueError, match=f"{path}: EnvConfig.reward_scale must be a finite"):
        load_env_config(path)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_an_empty_yaml_config_is_an_error(tmp_path, text):
    path = tmp_path / "env.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path} is empty"):
        load_env_config(path)


def test_broken_yaml_names_the_line(tmp_path):
    path = tmp_path / "env.yaml"
    path.write_text("artifacts: ml-100k\nreward_scale: [1,\n")
    with pytest.raises(ValueError, match=f"{path} line .*not valid YAML"):
        load_env_config(path)


@pytest.mark.parametrize("value", [-1, 0])
def test_the_horizon_cannot_be_switched_off(kwargs, value):
    with pytest.raises(ValueError, match="max_episode_steps must be >= 1"):
        EnvConfig(max_episode_steps=value)
    with pytest.raises(ValueError, match="max_episode_steps must be >= 1"):
        gym.make_vec(ENV_ID, num_envs=2, max_episode_steps=value, **kwargs)


@pytest.mark.parametrize("device", ["meta", "gpu", "cpu:1", "", "CPU", "cuda:99"])
def test_unusable_devices_fail_at_make(kwargs, device):
    with pytest.raises(ValueError, match="EnvConfig.device"):
        gym.make(ENV_ID, **{**kwargs, "device": device})


def test_cuda_without_a_gpu_fails_at_make(kwargs):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="no cuda device is available"):
        gym.make(ENV_ID, **{**kwargs, "device": "cuda"})


@pytest.mark.parametrize("user_id", [True, False, 1.0, "1", np.bool_(True), 1.5, None])
def test_user_ids_must_be_integers(kwargs, user_id):
    env = gym.make(ENV_ID, **kwargs)
    if user_id is None:  # None = drawn with the env's generator
        assert env.reset(seed=0, options={"user_id": None})[1]["user_id"] in env.unwrapped.user_ids
        return
    with pytest.raises(ValueError, match="is not a simulated user"):
        env.reset(seed=0, options={"user_id": user_id})


def test_numpy_integer_user_ids_are_accepted(kwargs):
    env = gym.make(ENV_ID, **kwargs)
    assert env.reset(seed=0, options={"user_id": np.int64(1)})[1]["user_id"] == 1


def test_a_step_after_termination_is_refused_until_reset(kwargs):
    env = gym.make(
        ENV_ID, **{**kwargs, "leave_prob": 1.0, "leave_threshold": 5.0}
    )  # first rating ends it
    env.reset(seed=0)
    *_, terminated, _, info = env.step(0)
    assert terminated and info["left"]
    with pytest.raises(gym.error.ResetNeeded, match="episode ended"):
        env.step(1)
    env.reset(seed=1)
    env.step(1)


def test_a_step_after_truncation_is_refused_until_reset(kwargs):
    env = gym.make(ENV_ID, **kwargs, max_episode_steps=50)
    env.reset(seed=0)
    for item in range(6):  # six movies: the last step shows the last one
        *_, truncated, _ = env.step(item)
    assert truncated
    with pytest.raises(gym.error.ResetNeeded):
        env.step(0)


def test_a_masked_step_under_the_terminate_rule_ends_the_episode(kwargs):
    env = gym.make(ENV_ID, **kwargs, repeat_rule="terminate")
    env.reset(seed=0)
    env.step(2)
    *_, terminated, _, _ = env.step(2)
    assert terminated
    with pytest.raises(gym.error.ResetNeeded):
        env.step(3)
