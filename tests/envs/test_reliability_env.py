"""Adversarial arguments of the environments, tried as a new user would (table rater, tiny
tables): stepping past the horizon, a horizon that ``gym.make`` would remove, options that are
not a dict, unsupported render modes, a bool ``num_envs``, a ``reset_mask`` of strings; and rater
output that is not rating distributions (a table rater answering NaN, a real tiny model whose
adapter weights were set to NaN and re-sealed): each is one clear error, never a silent pass."""

from __future__ import annotations

import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from persona_gym.envs import PersonaRecEnv, PersonaRecVectorEnv, load_env_config
from persona_gym.errors import ConfigError, PersonaGymError
from persona_gym.simulator.rater import RaterOutputError

ENV_ID = "PersonaML100K-v0"


def one_line(err: pytest.ExceptionInfo) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


# -- the horizon -----------------------------------------------------------------------------
def test_a_step_after_the_registered_time_limit_is_refused_until_reset(tiny_kwargs):
    """The registered TimeLimit (20 steps) truncates; the env itself refuses step 21, as after
    ``terminated`` (masked repeats count as steps, so 20 fit in the 6-item catalogue)."""
    env = gym.make(ENV_ID, **tiny_kwargs)
    env.reset(seed=0)
    flags = [env.step(0)[2:4] for _ in range(20)]
    assert flags[-1] == (False, True) and not any(t or u for t, u in flags[:-1])
    with pytest.raises(gym.error.ResetNeeded, match="episode ended"):
        env.step(1)
    env.reset(seed=1)
    env.step(1)


@pytest.mark.parametrize("horizon", [1, 3, 30])
def test_gym_make_max_episode_steps_is_the_env_horizon(tiny_kwargs, horizon):
    env = gym.make(ENV_ID, **tiny_kwargs, max_episode_steps=horizon)
    assert env.unwrapped.max_episode_steps == horizon and env.spec.max_episode_steps == horizon
    env.reset(seed=0)
    for step in range(1, horizon + 1):
        *_, terminated, truncated, _ = env.step(0)
        assert (terminated, truncated) == (False, step == horizon)
    with pytest.raises(gym.error.ResetNeeded):
        env.step(0)


def test_an_env_made_without_gym_make_truncates_at_its_config_horizon(tiny_config, table_rater):
    config = load_env_config("ml100k", **tiny_config, max_episode_steps=2)
    env = PersonaRecEnv(config=config, rater=table_rater)
    env.reset(seed=0)
    assert env.step(0)[3] is False and env.step(0)[3] is True
    with pytest.raises(gym.error.ResetNeeded):
        env.step(0)


@pytest.mark.parametrize(
    "value, message",
    [
        (-1, r"max_episode_steps=-1\) removes the TimeLimit, and these episodes need a horizon"),
        (0, r"max_episode_steps=0\) is not an int >= 1"),
        (2.5, r"max_episode_steps=2\.5\) is not an int >= 1"),
        (True, r"max_episode_steps=True\) is not an int >= 1"),
        ("5", r"max_episode_steps='5'\) is not an int >= 1"),
    ],
)
def test_a_horizon_gym_make_would_remove_or_break_is_refused(tiny_kwargs, value, message):
    with pytest.raises(ConfigError, match=message) as err:
        gym.make(ENV_ID, **tiny_kwargs, max_episode_steps=value)
    assert "leave it out" in one_line(err)
    with pytest.raises((ConfigError, TypeError), match="max_episode_steps"):
        gym.make_vec(ENV_ID, num_envs=2, **tiny_kwargs, max_episode_steps=value)


# -- reset options ---------------------------------------------------------------------------
@pytest.mark.parametrize("options", ["user_id", [], ("user_id", 1), 3, {1}])
def test_reset_options_that_are_not_a_dict_are_refused(tiny_kwargs, options):
    env = gym.make(ENV_ID, **tiny_kwargs)
    with pytest.raises(TypeError, match=r"options must be a dict such as \{'user_id': 42\}") as err:
        env.reset(seed=0, options=options)
    assert one_line(err).startswith("reset(options=")
    vec = gym.make_vec(ENV_ID, num_envs=2, **tiny_kwargs)
    with pytest.raises(TypeError, match="options must be a dict such as .*'reset_mask'"):
        vec.reset(seed=0, options=options)


def test_empty_and_none_options_still_draw_a_user(tiny_kwargs):
    env = gym.make(ENV_ID, **tiny_kwargs)
    assert env.reset(seed=0, options={})[1]["user_id"] == env.reset(seed=0)[1]["user_id"]


# -- render modes, num_envs, reset_mask ---------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*not in the possible render_modes")
@pytest.mark.parametrize("mode", ["human", "rgb_array", ""])
def test_an_unsupported_render_mode_is_refused_naming_the_supported_ones(tiny_kwargs, mode):
    with pytest.raises(TypeError, match=rf"render_mode='{mode}' is not supported: use one of"):
        gym.make(ENV_ID, **tiny_kwargs, render_mode=mode)
    with pytest.raises(TypeError, match=r"is not supported: use one of \['ansi'\]") as err:
        gym.make_vec(ENV_ID, num_envs=2, **tiny_kwargs, render_mode=mode)
    one_line(err)


@pytest.mark.filterwarnings("ignore:.*not in the possible render_modes")
def test_sb3_make_vec_env_still_works_without_a_render_mode(tiny_kwargs):
    """SB3 asks for render_mode='rgb_array' and retries without it on a TypeError."""
    pytest.importorskip("stable_baselines3")
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env(ENV_ID, n_envs=2, seed=0, env_kwargs=tiny_kwargs)
    assert env.reset()["profile"].shape[0] == 2


@pytest.mark.parametrize("num_envs", [True, False, 0, -2, 2.0, "2"])
def test_num_envs_must_be_a_positive_int(tiny_kwargs, num_envs):
    with pytest.raises(ConfigError, match=f"num_envs must be an int >= 1, got {num_envs!r}") as err:
        PersonaRecVectorEnv(num_envs=num_envs, **tiny_kwargs)
    one_line(err)


def test_num_envs_through_make_vec(tiny_kwargs):
    with pytest.raises(ConfigError, match="num_envs must be an int >= 1, got True"):
        gym.make_vec(ENV_ID, num_envs=True, **tiny_kwargs)
    assert gym.make_vec(ENV_ID, num_envs=np.int64(2), **tiny_kwargs).num_envs == 2


@pytest.mark.parametrize(
    "mask", [["no", ""], [1, 0], [0.0, 1.0], [None, True], "yes", [True], [[True, False]]]
)
def test_a_reset_mask_that_is_not_booleans_is_refused_not_cast(tiny_kwargs, mask):
    vec = gym.make_vec(ENV_ID, num_envs=2, **tiny_kwargs)
    vec.reset(seed=0)
    with pytest.raises(ConfigError, match=r"options\['reset_mask'\] must be 2 booleans") as err:
        vec.reset(options={"reset_mask": mask})
    one_line(err)


def test_a_boolean_reset_mask_resets_only_where_true(tiny_kwargs):
    vec = gym.make_vec(ENV_ID, num_envs=2, **tiny_kwargs)
    vec.reset(seed=0)
    vec.step(np.array([0, 1]))
    for mask in ([False, True], np.array([False, True])):
        _, info = vec.reset(options={"reset_mask": mask})
        assert list(info["step"]) == [1, 0]


# -- rater output that is not a distribution ----------------------------------------------------
class BrokenRater:
    """A table rater whose answers for ``bad_users`` are replaced by ``row``."""

    def __init__(self, inner, row, bad_users=(1,)):
        self.inner, self.row, self.bad_users = inner, np.asarray(row, dtype=float), set(bad_users)

    def __getattr__(self, name):
        if name.startswith("__") or name in ("inner", "row", "bad_users"):
            raise AttributeError(name)
        return getattr(self.inner, name)

    def rate(self, user_ids, items, windows=None):
        out = np.array(self.inner.rate(user_ids, items, windows))
        for i, user in enumerate(user_ids):
            if user in self.bad_users:
                out[i] = self.row
        return out


@pytest.mark.parametrize(
    "row, what",
    [
        ([np.nan] * 5, "is not finite"),
        ([0.2, 0.2, np.inf, 0.2, 0.2], "is not finite"),
        ([0.1, 0.1, 0.1, 0.1, 0.1], "sums to 0.5, not 1"),
        ([0.5, 0.5, 0.5, -0.5, 0.0], "has negative probabilities"),
    ],
)
def test_a_rater_answering_no_distribution_never_reaches_the_agent(tiny_kwargs, row, what):
    rater = BrokenRater(tiny_kwargs["rater"], row)
    env = gym.make(ENV_ID, **{**tiny_kwargs, "rater": rater})
    env.reset(seed=0, options={"user_id": 1})
    with pytest.raises(RaterOutputError, match=f"rating distribution of user 1 .*{what}") as err:
        env.step(0)
    text = one_line(err)
    assert text.startswith(str(rater.source)) and "persona-gym artifacts verify" in text
    assert env.unwrapped.state.steps == 0 and env.unwrapped.state.allowed[0]  # nothing changed
    env.reset(seed=0, options={"user_id": 2})
    assert np.isfinite(env.step(0)[1])  # the other users are rated as before

    vec = gym.make_vec(ENV_ID, num_envs=2, **{**tiny_kwargs, "rater": rater})
    vec.reset(seed=0, options={"user_id": [2, 1]})
    with pytest.raises(RaterOutputError, match="user 1 "):
        vec.step(np.array([0, 0]))


def test_a_rater_answering_the_wrong_shape_is_named(tiny_kwargs):
    class Short(BrokenRater):
        def rate(self, user_ids, items, windows=None):
            return np.full((len(user_ids), 4), 0.25)

    env = gym.make(ENV_ID, **{**tiny_kwargs, "rater": Short(tiny_kwargs["rater"], [0] * 5)})
    env.reset(seed=0)
    with pytest.raises(RaterOutputError, match=r"shape \(1, 4\) for 1 \(user, item\) pairs"):
        env.step(0)


def test_nan_adapter_weights_resealed_never_reach_the_agent(tmp_path, slm_kwargs):
    """The issue's case on a real tiny model: the persona adapters' weights are set to NaN and
    the manifest re-sealed (``artifacts rehash``), so the hashes pass; the first rated step
    fails with one line naming the artifacts and what to run, never a NaN reward."""
    from safetensors.torch import load_file, save_file

    from persona_gym.artifacts import rehash

    art = Path(shutil.copytree(slm_kwargs["artifacts"], tmp_path / "art"))
    for name in ("persona-0", "persona-1"):
        path = art / "adapters" / name / "adapter_model.safetensors"
        save_file({k: v.fill_(float("nan")) for k, v in load_file(path).items()}, path)
    rehash(art)
    with pytest.raises(PersonaGymError) as err:
        env = gym.make(ENV_ID, **{**slm_kwargs, "artifacts": str(art)})
        env.reset(seed=0)
        env.step(0)
    text = one_line(err)
    assert str(art) in text
    if isinstance(err.value, RaterOutputError):
        assert "adapter 'persona-" in text and "persona-gym artifacts verify" in text
