"""What only the SLM rater shows in the environments (tiny trained artifacts): one simulator per
process and config, reloaded through the cache after pickling, and compiled scoring."""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np

from persona_gym.simulator.simulator import UserSimulator

ENV_ID = "PersonaML100K-v0"


def rewards(env, seed: int, actions) -> list[float]:
    env.reset(seed=seed)
    return [env.step(int(a))[1] for a in actions]


def test_env_loads_the_slm_simulator_once(slm_kwargs):
    env = gym.make(ENV_ID, **slm_kwargs)
    assert isinstance(env.unwrapped.rater, UserSimulator)
    vec = gym.make_vec(ENV_ID, num_envs=3, vectorization_mode="sync", **slm_kwargs)
    assert {id(e.unwrapped.rater) for e in vec.envs} == {id(env.unwrapped.rater)}


def test_pickle_reloads_the_simulator_through_the_cache(slm_kwargs):
    env = gym.make(ENV_ID, **slm_kwargs)
    env.reset(seed=3)
    env.step(1)
    clone = pickle.loads(pickle.dumps(env))
    assert clone.unwrapped.rater is env.unwrapped.rater
    for action in (0, 2, 3):
        step = env.step(action)
        np.testing.assert_equal(step, clone.step(action))
        if step[2] or step[3]:  # the episode ended: the env refuses further steps
            break


def test_compiled_rating_model_gives_the_same_rewards(slm_kwargs):
    """Two steps: the first compiles each layer for its shapes, the second (a longer window)
    goes through the dynamic-shape recompile; later steps would reuse that graph."""
    actions = [0, 1]
    eager = rewards(gym.make(ENV_ID, **slm_kwargs), 3, actions)
    compiled = rewards(gym.make(ENV_ID, **slm_kwargs, compile=True), 3, actions)
    np.testing.assert_allclose(compiled, eager, atol=1e-4)
