"""PersonaML100K-v0 on the shipped SmolLM2-135M persona adapters (``persona_gym/default_artifacts``)."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest

import persona_gym  # noqa: F401  (registers the ids)
from persona_gym.registry import simulator_dir

# one pytest-xdist worker materialises the shipped simulator (a distil of ML-100k) for all of them
pytestmark = pytest.mark.xdist_group("shipped")


@pytest.fixture(scope="module")
def shipped() -> str:
    root = simulator_dir("ml-100k")
    if not (root / "manifest.json").is_file():
        pytest.fail(
            f"the default ML-100k artifacts are not shipped: {root}/manifest.json is missing. "
            "Copy a trained artifacts directory there (persona-gym distill --dataset ml-100k "
            "--out DIR && persona-gym personas --artifacts DIR && persona-gym train "
            "--artifacts DIR)."
        )
    return str(root)


def test_the_shipped_tests_share_one_worker(request):
    """Under `make test` (pytest-xdist, --dist loadgroup) this module's tests carry the group's
    suffix, so they run on one worker and the shipped simulator is materialised once."""
    if request.config.getvalue("loadgroup"):
        assert request.node.nodeid.endswith("@shipped"), (
            "pytest-xdist did not group the shipped tests (see the pytest pin in pyproject.toml)"
        )


@pytest.mark.integration
def test_default_env_20_step_episode(shipped):
    env = gym.make("PersonaML100K-v0", render_mode="ansi")
    assert env.unwrapped.config.artifacts == "ml-100k" and env.spec.max_episode_steps == 20
    obs, info = env.reset(seed=0)
    rng = np.random.default_rng(0)
    rewards = []
    for _ in range(20):
        action = int(rng.choice(np.flatnonzero(info["action_mask"])))
        obs, reward, terminated, truncated, info = env.step(action)
        assert env.observation_space.contains(obs) and not info["masked_action"]
        # the reward is the expected rating of the distribution the step reports
        assert info["expected_rating"] == pytest.approx(info["rating_probs"] @ np.arange(1, 6))
        assert reward == pytest.approx(info["expected_rating"]) and info[
            "rating_probs"
        ].sum() == pytest.approx(1)
        rewards.append(reward)
        if terminated or truncated:
            break
    assert truncated or info["left"]
    assert "Recently rated:" in info["text"]


@pytest.mark.integration
def test_default_vector_env_matches_single(shipped):
    vec = gym.make_vec("PersonaML100K-v0", num_envs=2)
    single = gym.make("PersonaML100K-v0")
    vec.reset(seed=5)
    single.reset(seed=5)
    for step in range(3):
        action = np.array([10 + step, 20 + step])
        _, rewards, terminated, truncated, _ = vec.step(action)
        _, reward, *_ = single.step(int(action[0]))
        assert rewards[0] == pytest.approx(reward, abs=1e-5)
        if terminated[0] or truncated[0]:
            break


@pytest.mark.integration
def test_the_shipped_simulator_is_materialised_once_per_session(shipped, user_dirs, monkeypatch):
    """The shipped simulator's tables are regenerated into the session's cache (never the
    user's) by its first use; every later use in the session reuses that copy."""
    from persona_gym.artifacts import resolve_artifacts
    from persona_gym.artifacts import shipped as shipped_module

    root = resolve_artifacts("ml-100k")
    assert user_dirs in root.parents and (root / "memories.parquet").is_file()

    def regenerate(*args):
        raise AssertionError("the shipped simulator was materialised again")

    monkeypatch.setattr(shipped_module, "_regenerate_tables", regenerate)
    assert resolve_artifacts("ml-100k") == root
    gym.make("PersonaML100K-v0").reset(seed=0)  # the env's simulator comes from that copy too
