"""The item-scoring MaskableDQN (``--algo maskable-dqn --policy items``) on the tiny tables."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agents import item_dqn
from agents.evaluate import make_batch
from agents.item_dqn import MaskableDQN
from agents.item_policy import add_user_features
from agents.policies import MFPolicy, SB3Policy, make_policy
from agents.runs import read_run
from agents.sb3_env import SB3VecEnv
from agents.train import AgentConfig, train_agent


def _config(tmp_path, tiny_config, **kwargs) -> AgentConfig:
    return AgentConfig(
        **{
            "algo": "maskable-dqn",
            "policy": "items",
            "timesteps": 16,
            "n_envs": 2,
            "batch_size": 4,
            "checkpoint_every": 8,
            "eval_every": 8,
            "eval_episodes": 3,
            "out": str(tmp_path),
            "env_kwargs": dict(tiny_config),
            **kwargs,
        }
    )


def test_item_dqn_trains_reloads_and_starts_as_mf(
    tmp_path, tiny_config, table_rater, core, ratings
):
    """A run trains, resumes and loads as a policy whose scores are its Q-values under the
    env's masks; before any update the Q-values are MF's predicted ratings (so the greedy
    policy is MF-greedy)."""
    config = _config(tmp_path, tiny_config)
    run_dir = train_agent(config, progress=False, rater=table_rater, ratings=ratings)
    assert read_run(run_dir)["algo"] == "maskable-dqn"
    policy = make_policy(str(run_dir), core)
    assert isinstance(policy, SB3Policy) and isinstance(policy.model, MaskableDQN)
    states = [core.new_episode(np.random.default_rng(0), {"user_id": u}) for u in core.user_ids]
    states[0].allowed[:2] = False
    batch = make_batch(core, states)
    scores = policy.scores(batch)
    assert np.isneginf(scores[0, :2]).all() and np.isfinite(scores[1]).all()
    obs = add_user_features(batch.obs, batch.user_ids, policy.features)
    net = policy.model.policy
    with torch.no_grad():
        q = net.q_net(net.obs_to_tensor(obs)[0]).numpy()
    np.testing.assert_allclose(scores[batch.masks], q[batch.masks], rtol=1e-6)

    untrained = MaskableDQN(
        type(net),
        _env(config, table_rater, policy.features),
        policy_kwargs={
            k: v
            for k, v in net._get_constructor_parameters().items()
            if k in ("item_side", "item_vectors", "item_embeddings", "item_gain")
        },
        seed=0,
        device="cpu",
    )
    with torch.no_grad():
        start = untrained.q_net(untrained.policy.obs_to_tensor(obs)[0]).numpy()
    mf = policy.features.users(batch.user_ids) @ policy.features.item_vectors.T
    np.testing.assert_allclose(start, mf, atol=1e-3)
    np.testing.assert_array_equal(
        SB3Policy(untrained, "start", policy.features).act(batch),
        MFPolicy(core, ratings).act(batch),
    )
    resumed = train_agent(
        AgentConfig(**{**vars(config), "timesteps": 24}),
        resume=run_dir,
        progress=False,
        rater=table_rater,
        ratings=ratings,
    )
    assert read_run(resumed)["timesteps"] == 24


def _env(config: AgentConfig, rater, features) -> SB3VecEnv:
    return SB3VecEnv(
        config.env_id, config.n_envs, rater=rater, features=features, **config.env_kwargs
    )


def test_exploration_stays_within_the_masks_and_the_top_movies(
    tmp_path, tiny_config, table_rater, ratings, monkeypatch
):
    """Exploring actions are drawn among the ``EXPLORE_TOP`` best allowed movies by the current
    Q-values, greedy ones are the best allowed movie: never a masked one."""
    config = _config(tmp_path, tiny_config)
    run_dir = train_agent(config, progress=False, rater=table_rater, ratings=ratings)
    model = MaskableDQN.load(run_dir / "model.zip", device="cpu")
    features = SB3Policy.load(run_dir).features
    env = _env(config, table_rater, features)
    model.set_env(env)
    model._last_obs = env.reset()
    monkeypatch.setattr(item_dqn, "EXPLORE_TOP", 2)
    masks = env.action_masks()
    with torch.no_grad():
        q = model.q_net(model.policy.obs_to_tensor(model._last_obs)[0]).numpy()
    q = np.where(masks, q, -np.inf)
    top = np.argsort(-q, axis=1, kind="stable")[:, :2]
    np.random.seed(0)
    model.exploration_rate = 1.0
    explored = np.stack([model._sample_action(0, n_envs=2)[0] for _ in range(40)])
    for row in range(2):
        assert set(explored[:, row]) == set(top[row])
    model.exploration_rate = 0.0
    greedy = model._sample_action(0, n_envs=2)[0]
    np.testing.assert_array_equal(greedy, q.argmax(axis=1))
    assert masks[np.arange(2), greedy].all()


def test_item_dqn_bad_settings_are_clear():
    with pytest.raises(ValueError, match="'maskable-dqn' needs policy='items'"):
        AgentConfig(algo="maskable-dqn", policy="mlp")
    with pytest.raises(ValueError, match="cf_start is maskable-ppo's"):
        AgentConfig(algo="maskable-dqn", policy="items", cf_start=4.0)
