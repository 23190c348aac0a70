"""The environments on the tiny tables with the table rater: Gymnasium/SB3 conventions,
determinism, pickling, vector == single, rules and errors (``test_slm_env.py``: what needs the
SLM rater)."""

from __future__ import annotations

import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest

from persona_gym.envs import PersonaRecEnv, PersonaRecVectorEnv, load_env_config

ENV_ID = "PersonaML100K-v0"

# Warnings Gymnasium's checker may raise for a correct env, each with the reason it is fine.
ALLOWED_GYM_WARNINGS = (
    # the Dict observation's bounds are finite and tight; nothing to allow at present
)


def make(tiny_kwargs, **kwargs) -> gym.Env:
    return gym.make(ENV_ID, **{**tiny_kwargs, **kwargs})


def rollout(env, seed: int, n_steps: int, action_seed: int = 123):
    """``n_steps`` random (seeded) actions, resetting on termination/truncation."""
    actions = np.random.default_rng(action_seed)
    obs, info = env.reset(seed=seed)
    trace = [(obs, 0.0, False, False, info)]
    for _ in range(n_steps):
        obs, reward, terminated, truncated, info = env.step(
            int(actions.integers(env.action_space.n))
        )
        trace.append((obs, reward, terminated, truncated, info))
        if terminated or truncated:
            obs, info = env.reset()
            trace.append((obs, 0.0, False, False, info))
    return trace


def assert_same(a, b) -> None:
    """Exact equality of nested steps (NaN equals NaN: masked steps carry NaN ratings)."""
    np.testing.assert_equal(a, b)


def same(a, b) -> bool:
    try:
        assert_same(a, b)
    except AssertionError:
        return False
    return True


# -- conventions -------------------------------------------------------------------------------
def test_gymnasium_check_env(tiny_kwargs):
    from gymnasium.utils.env_checker import check_env

    env = make(tiny_kwargs, render_mode="ansi")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env.unwrapped)
    unexpected = [
        str(w.message) for w in caught if not any(a in str(w.message) for a in ALLOWED_GYM_WARNINGS)
    ]
    assert unexpected == []


@pytest.mark.parametrize("flatten", [False, True])
def test_sb3_check_env_no_warnings(tiny_kwargs, flatten):
    from stable_baselines3.common.env_checker import check_env

    env = make(tiny_kwargs)
    if flatten:  # one Box, for MlpPolicy
        env = gym.wrappers.FlattenObservation(env)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_env(env, warn=True)
    assert [str(w.message) for w in caught] == []


def test_spaces_and_info_keys(tiny_kwargs):
    env = make(tiny_kwargs, render_mode="ansi")
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    assert env.action_space == gym.spaces.Discrete(6)
    keys = {
        "user_id",
        "persona",
        "step",
        "item_index",
        "item_id",
        "title",
        "rating_probs",
        "expected_rating",
        "sampled_rating",
        "masked_action",
        "left",
        "action_mask",
        "text",
    }
    assert set(info) == keys
    obs, reward, terminated, truncated, info2 = env.step(2)
    assert set(info2) == keys
    assert info2["item_index"] == 2 and info2["title"].startswith("Heat")
    assert np.isclose(info2["rating_probs"].sum(), 1.0)
    assert np.isclose(info2["expected_rating"], info2["rating_probs"] @ np.arange(1, 6))
    assert info2["sampled_rating"] in {1.0, 2.0, 3.0, 4.0, 5.0}
    assert reward == pytest.approx(info2["expected_rating"])
    assert not info2["action_mask"][2] and env.unwrapped.action_masks().sum() == 5
    assert obs["recent_mask"].sum() == 3 and obs["step_fraction"][0] == pytest.approx(1 / 20)
    text = env.render()
    assert "Heat (1995)" in text and "Profile:" in text and text == info2["text"]


def test_window_holds_episode_interactions(tiny_kwargs):
    env = make(tiny_kwargs)
    env.reset(seed=0, options={"user_id": 1})
    core, state = env.unwrapped.core, env.unwrapped.state
    logged = state.history
    env.step(4)
    window = core.window(state)
    assert window[-1].item_index == 4 and window[-1].timestamp == logged[-1].timestamp + 1
    assert window[:-1] == logged[-(core.window_size - 1) :]


# -- determinism, pickling, vector ------------------------------------------------------------
def test_same_seed_same_trajectory_50_steps(tiny_kwargs):
    kwargs = dict(reward="sampled", leave_prob=0.5, leave_threshold=3.0, max_episode_steps=50)
    a = rollout(make(tiny_kwargs, **kwargs), seed=7, n_steps=50)
    b = rollout(make(tiny_kwargs, **kwargs), seed=7, n_steps=50)
    assert len(a) == len(b) and len(a) > 50
    for step_a, step_b in zip(a, b, strict=True):
        assert_same(step_a, step_b)
    rewards = [r for _, r, *_ in a]
    assert len(set(rewards)) > 2  # sampled ratings and penalties actually vary
    c = rollout(make(tiny_kwargs, **kwargs), seed=8, n_steps=50)
    assert not all(same(x, y) for x, y in zip(a, c, strict=False))


def test_pickle_round_trip(tiny_kwargs):
    env = make(tiny_kwargs, reward="sampled", leave_prob=0.3, leave_threshold=3.0)
    env.reset(seed=3)
    env.step(1)
    clone = pickle.loads(pickle.dumps(env))
    assert clone.unwrapped.rater is not env.unwrapped.rater  # an injected rater is pickled along
    for action in (0, 2, 3):
        step = env.step(action)
        assert_same(step, clone.step(action))
        if step[2] or step[3]:  # the episode ended: the env refuses further steps
            break


def test_vector_env_equals_single_envs(tiny_kwargs):
    n, horizon, seed = 3, 6, 11
    kwargs = dict(reward="sampled", leave_prob=0.5, leave_threshold=3.0)
    vec = gym.make_vec(ENV_ID, num_envs=n, max_episode_steps=horizon, **{**tiny_kwargs, **kwargs})
    assert isinstance(vec.unwrapped, PersonaRecVectorEnv)
    singles = [make(tiny_kwargs, max_episode_steps=horizon, **kwargs) for _ in range(n)]
    obs, infos = vec.reset(seed=seed)
    for i, env in enumerate(singles):
        single_obs, single_info = env.reset(seed=seed + i)
        assert single_info["user_id"] == infos["user_id"][i]
        assert_same(single_obs["profile"], obs["profile"][i])
    actions = np.random.default_rng(0)
    done = np.zeros(n, dtype=bool)
    rater = vec.unwrapped.core.rater
    calls = rater.calls
    for _ in range(25):
        action = actions.integers(6, size=n)
        before = rater.calls
        obs, rewards, terminated, truncated, infos = vec.step(action)
        assert rater.calls - before <= 1  # every rated sub-environment in one call
        for i, env in enumerate(singles):
            if done[i]:  # NEXT_STEP autoreset: this step reset sub-env i
                single_obs, single_info = env.reset()
                expected = (single_obs, 0.0, False, False)
            else:
                single_obs, reward, term, trunc, single_info = env.step(int(action[i]))
                expected = (single_obs, reward, term, trunc)
            assert np.isclose(rewards[i], expected[1], atol=1e-6)
            assert (terminated[i], truncated[i]) == expected[2:]
            assert single_info["user_id"] == infos["user_id"][i] and infos["_user_id"][i]
            np.testing.assert_allclose(
                obs["recent_ratings"][i], single_obs["recent_ratings"], atol=1e-6
            )
            np.testing.assert_array_equal(
                vec.unwrapped.action_masks()[i], env.unwrapped.action_masks()
            )
        done = terminated | truncated
    assert rater.calls > calls
    assert infos["rating_probs"].shape == (n, 5) and infos["action_mask"].shape == (n, 6)


def test_vector_reset_options(tiny_config, table_rater):
    vec = PersonaRecVectorEnv(
        num_envs=2, config=load_env_config("ml100k", **tiny_config), rater=table_rater
    )
    _, infos = vec.reset(seed=0, options={"user_id": [2, 3]})
    assert list(infos["user_id"]) == [2, 3]
    _, infos = vec.reset(options={"user_id": 0, "reset_mask": np.array([True, False])})
    assert list(infos["user_id"]) == [0, 3]


# -- rules ------------------------------------------------------------------------------------
def test_repeat_penalty_without_model_call(tiny_kwargs):
    env = make(tiny_kwargs, repeat_penalty=-2.5)
    env.reset(seed=0)
    env.step(3)
    rater = env.unwrapped.rater
    before = rater.calls
    _, reward, terminated, truncated, info = env.step(3)
    assert reward == -2.5 and not terminated and info["masked_action"]
    assert np.isnan(info["expected_rating"]) and rater.calls == before


def test_repeat_terminate_rule(tiny_kwargs):
    env = make(tiny_kwargs, repeat_rule="terminate")
    env.reset(seed=0)
    env.step(3)
    _, reward, terminated, _, info = env.step(3)
    assert terminated and reward == -1.0 and not info["left"]


def test_churn_and_exhaustion(tiny_kwargs):
    env = make(tiny_kwargs, leave_prob=1.0, leave_threshold=5.0)  # every rating is low
    env.reset(seed=0)
    _, _, terminated, _, info = env.step(0)
    assert terminated and info["left"]
    env = make(tiny_kwargs, max_episode_steps=50)
    env.reset(seed=0)
    for item in range(6):
        _, _, terminated, truncated, _ = env.step(item)
    assert truncated and not terminated and not env.unwrapped.action_masks().any()


def test_reward_affine_and_expected(tiny_kwargs):
    env = make(tiny_kwargs, reward_scale=0.5, reward_offset=-1.5)
    env.reset(seed=0)
    _, reward, *_, info = env.step(0)
    assert reward == pytest.approx(0.5 * info["expected_rating"] - 1.5)


def test_user_choice_from_options_and_rng(tiny_kwargs):
    env = make(tiny_kwargs)
    users = {env.reset(seed=s)[1]["user_id"] for s in range(20)}
    assert users == {0, 1, 2, 3}
    assert env.reset(options={"user_id": 2})[1]["user_id"] == 2


# -- errors -----------------------------------------------------------------------------------
def test_bad_action_errors(tiny_kwargs):
    env = make(tiny_kwargs)
    env.reset(seed=0)
    with pytest.raises(ValueError, match=r"outside Discrete\(6\).*0\.\.5"):
        env.unwrapped.step(6)
    with pytest.raises(ValueError, match="not one integer"):
        env.unwrapped.step(1.5)


def test_bad_options_errors(tiny_kwargs):
    env = make(tiny_kwargs)
    with pytest.raises(ValueError, match=r"not a simulated user.*4 users.*\[0, 3\]"):
        env.reset(options={"user_id": 99})
    with pytest.raises(ValueError, match="unknown reset option"):
        env.reset(options={"persona": 1})


def test_mask_rated_on_users_who_rated_everything(tiny_kwargs):
    env = make(tiny_kwargs, mask_rated=True)
    with pytest.raises(ValueError, match="mask_rated=False"):
        env.reset(seed=0)


@pytest.mark.parametrize(
    "env_id, dataset", [("PersonaML100K-v0", "ml-100k"), ("PersonaML1M-v0", "ml-1m")]
)
def test_missing_artifacts_error_names_commands(tmp_path, env_id, dataset):
    """One short line: what is missing and the one command that builds it (build fetches)."""
    where = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError) as err:
        gym.make(env_id, artifacts=str(where))
    text = str(err.value)
    assert "\n" not in text, text
    assert text.startswith(f"{where / 'manifest.json'} not found"), text
    assert f"`persona-gym build {dataset} --out {where}`" in text, text
    assert text.count("persona-gym ") == 1, text  # the one command, not a stage-by-stage recipe


def test_unsupported_render_mode_is_refused_naming_the_supported_ones(tiny_config, table_rater):
    config = load_env_config("ml100k", **tiny_config)
    for mode in ("human", "rgb_array"):
        with pytest.raises(
            TypeError, match=rf"render_mode='{mode}' is not supported: use one of \['ansi'\]"
        ):
            PersonaRecEnv(config=config, render_mode=mode, rater=table_rater)
    env = PersonaRecEnv(config=config, rater=table_rater)
    env.reset(seed=0)
    with pytest.warns(UserWarning, match="render_mode='ansi'"):
        assert env.render() is None


# -- configs ----------------------------------------------------------------------------------
def test_bundled_configs_load():
    from envs_config import available

    assert {"ml100k", "ml1m"} <= set(available())
    assert load_env_config("ml1m").dataset == "ml-1m"
    assert gym.spec("PersonaML1M-v0").max_episode_steps == load_env_config("ml1m").max_episode_steps
    assert gym.spec("PersonaML1M-v0").kwargs == {"config": "ml1m"}


def test_bundled_configs_list_only_what_differs_from_the_defaults():
    """EnvConfig holds the defaults; a bundled YAML lists only the fields it changes."""
    from envs_config import available, read_config
    from persona_gym.envs.config import EnvConfig

    defaults = EnvConfig()
    for name in available():
        data, path = read_config(name)
        same = [key for key, value in data.items() if getattr(defaults, key) == value]
        assert not same, f"{path} repeats EnvConfig's defaults: {same}"
    assert load_env_config("ml100k") == defaults


def test_config_errors_name_key_and_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("reward: expected\nhorizon: 5\n")
    with pytest.raises(ValueError, match=r"mine\.yaml.*'horizon'"):
        load_env_config(str(path))
    path.write_text("leave_prob: 1e5\n")  # YAML 1.1: a string
    with pytest.raises(TypeError, match=r"mine\.yaml.*leave_prob"):
        load_env_config(str(path))
    with pytest.raises(ValueError, match="EnvConfig.reward must be one of"):
        load_env_config("ml100k", reward="mean")
    with pytest.raises(
        ValueError, match=r"EnvConfig.users must be one of \('all', 'training'\), got 'new'"
    ):
        load_env_config("ml100k", users="new")
    with pytest.raises(ValueError, match="unknown EnvConfig field"):
        load_env_config("ml100k", max_steps=3)


# -- training smoke ---------------------------------------------------------------------------
def test_maskable_ppo_smoke(tiny_kwargs):
    sb3_contrib = pytest.importorskip("sb3_contrib")
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env(ENV_ID, n_envs=2, seed=0, env_kwargs={**tiny_kwargs, "render_mode": None})
    model = sb3_contrib.MaskablePPO(
        "MultiInputPolicy", env, n_steps=64, batch_size=32, n_epochs=1, seed=0, device="cpu"
    )
    model.learn(total_timesteps=256)
    obs = env.reset()
    masks = np.stack(env.env_method("action_masks"))
    actions, _ = model.predict(obs, action_masks=masks)
    assert all(masks[i, a] for i, a in enumerate(actions))
