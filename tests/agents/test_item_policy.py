"""The item-scoring MaskablePPO policy (``--policy items``) on the tiny tables (table rater)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sb3_contrib import MaskablePPO

from agents.evaluate import make_batch
from agents.item_policy import CFFeatures, add_user_features
from agents.policies import MFPolicy, SB3Policy, make_policy
from agents.runs import FEATURES_FILE, read_run, ship_agent
from agents.train import AgentConfig, train_agent
from persona_gym.simulator.cf_models import BiasedMF


def test_cf_features_reproduce_the_mf_prediction(core, ratings):
    model = BiasedMF(factors=2, reg=1.0, reg_bias=1.0).fit(ratings)
    features = CFFeatures.fit(
        model, core.catalog.item_ids, core.catalog.n_ratings, core.item_embeddings
    )
    users = np.array(core.user_ids)
    dots = features.users(users) @ features.item_vectors.T
    for row, user in zip(dots, users, strict=True):
        expected = model.predict(np.full(core.n_items, user), core.catalog.item_ids)
        np.testing.assert_allclose(np.clip(row, 1, 5), expected, rtol=1e-5)
    assert np.allclose(features.item_side.mean(axis=0), 0, atol=1e-5)
    unknown = features.users(np.array([10**9]))
    assert unknown[0, -1] == 1.0 and not unknown[0, :-1].any()


def test_items_policy_trains_reloads_and_scores_with_its_model(
    tmp_path, tiny_config, table_rater, core, ratings
):
    config = AgentConfig(
        policy="items",
        timesteps=16,
        n_envs=2,
        n_steps=4,
        batch_size=4,
        checkpoint_every=8,
        eval_every=8,
        eval_episodes=3,
        out=str(tmp_path),
        env_kwargs=dict(tiny_config),
    )
    run_dir = train_agent(config, progress=False, rater=table_rater, ratings=ratings)
    assert (run_dir / FEATURES_FILE).is_file() and read_run(run_dir)["config"]["policy"] == "items"
    evals = (run_dir / "eval.csv").read_text().splitlines()
    assert evals[0] == "steps,mean_rating,return,churn" and [
        int(x.split(",")[0]) for x in evals[1:]
    ] == [0, 8, 16]
    policy = make_policy(str(run_dir), core)
    assert isinstance(policy, SB3Policy) and policy.features is not None
    states = [core.new_episode(np.random.default_rng(0), {"user_id": u}) for u in core.user_ids]
    states[0].allowed[:2] = False
    batch = make_batch(core, states)
    scores = policy.scores(batch)
    assert np.isneginf(scores[0, :2]).all() and np.isfinite(scores[1]).all()
    # the scores are the model's own logits for the observation with the users' CF vectors
    net = policy.model.policy
    obs = {**batch.obs, "user": policy.features.users(batch.user_ids)}
    with torch.no_grad():
        logits = net.get_distribution(net.obs_to_tensor(obs)[0]).distribution.logits.numpy()
    np.testing.assert_allclose(scores[batch.masks], logits[batch.masks], rtol=1e-6)
    # with only the collaborative term, the agent ranks exactly as the MF baseline
    scorer = net.action_net
    with torch.no_grad():
        for p in (scorer.query.weight, scorer.query.bias, scorer.keys.weight, scorer.item_bias):
            p.zero_()
        scorer.cf_weight.fill_(1.0)
    mf = MFPolicy(core, ratings)
    np.testing.assert_array_equal(policy.act(batch), mf.act(batch))
    resumed = train_agent(
        AgentConfig(**{**vars(config), "timesteps": 24}),
        resume=run_dir,
        progress=False,
        rater=table_rater,
        ratings=ratings,
    )
    assert read_run(resumed)["timesteps"] == 24
    # shipping: the model (or a checkpoint), its features and curve, no machine path in run.json
    dest = ship_agent(run_dir, tmp_path / "shipped" / "agent", steps=16)
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        ["model.zip", "run.json", FEATURES_FILE, "eval.csv", "learning_curve.png", "manifest.json"]
    )
    assert (
        str(tmp_path) not in (dest / "run.json").read_text() and read_run(dest)["timesteps"] == 16
    )
    shipped = SB3Policy.load(dest)
    fresh = SB3Policy(
        MaskablePPO.load(run_dir / "checkpoints" / "model_16_steps.zip", device="cpu"),
        "ckpt",
        CFFeatures.load(run_dir / FEATURES_FILE),
    )
    np.testing.assert_array_equal(shipped.scores(batch), fresh.scores(batch))
    with pytest.raises(FileNotFoundError, match="train the agent first"):
        ship_agent(run_dir, tmp_path / "other", steps=5)


def test_items_policy_bad_settings_are_clear(tmp_path):
    with pytest.raises(ValueError, match="policy='items' needs algo='maskable-ppo'"):
        AgentConfig(policy="items", algo="dqn")
    with pytest.raises(ValueError, match="choose from"):
        AgentConfig(policy="transformer")
    with pytest.raises(ValueError, match="cf_start=4.0 needs policy='items'"):
        AgentConfig(policy="mlp", cf_start=4.0)
    with pytest.raises(ValueError, match="item_gain must be > 0"):
        AgentConfig(policy="items", item_gain=0.0)
    (tmp_path / FEATURES_FILE).write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="not the collaborative features"):
        CFFeatures.load(tmp_path / FEATURES_FILE)


def _untrained_policy(core, ratings, **kwargs):
    """An ``ItemScoringPolicy`` for the tiny env with MF features fitted on ``ratings``."""
    from gymnasium import spaces

    from agents.item_policy import ItemScoringPolicy, user_space

    torch.manual_seed(0)
    model = BiasedMF(factors=2, reg=1.0, reg_bias=1.0).fit(ratings)
    features = CFFeatures.fit(
        model, core.catalog.item_ids, core.catalog.n_ratings, core.item_embeddings
    )
    space = spaces.Dict({**core.observation_space.spaces, "user": user_space(features)})
    policy = ItemScoringPolicy(
        space,
        core.action_space,
        lambda _: 3e-4,
        item_side=features.item_side,
        item_vectors=features.item_vectors,
        **kwargs,
    )
    return policy, features


def test_window_term_follows_the_observed_window(core, ratings):
    """The window term finds the window's movies from their embeddings, reads their MF
    residuals, and scores each item by its centred cosine to them (a numpy reference)."""
    emb = core.item_embeddings
    policy, features = _untrained_policy(core, ratings, item_embeddings=emb)
    w = core.config.obs_window
    user = core.user_ids[0]
    window = np.arange(w - 1)  # one empty slot: the mask counts
    stars = np.array([5.0, 1.0, 4.0][: w - 1])
    obs = core.observation(core.new_episode(np.random.default_rng(0), {"user_id": user}))
    obs["recent_items"] = np.zeros((w, emb.shape[1]), np.float32)
    obs["recent_items"][1:] = emb[window]
    obs["recent_items"] = obs["recent_items"].reshape(-1)
    obs["recent_mask"] = np.r_[0.0, np.ones(w - 1)].astype(np.float32)
    obs["recent_ratings"] = np.r_[0.0, (stars - 1) / 4].astype(np.float32)
    batch = add_user_features({k: v[None] for k, v in obs.items()}, np.array([user]), features)
    scorer = policy.action_net
    with torch.no_grad():
        for p in (scorer.query.weight, scorer.query.bias, scorer.item_bias, scorer.cf_weight):
            p.zero_()
        scorer.window.alpha.fill_(0.5)
        scorer.window.beta.fill_(0.25)
        logits = policy.get_distribution(policy.obs_to_tensor(batch)[0]).distribution.logits

    unit = emb - emb.mean(axis=0)
    unit /= np.linalg.norm(unit, axis=1, keepdims=True)
    expected = np.clip(features.users(np.array([user])) @ features.item_vectors[window].T, 1, 5)
    weight = (0.5 + 0.25 * (stars - expected[0])) / len(window)
    reference = 30.0 * unit @ unit[window].T @ weight
    # the distribution normalises the logits: compare them up to their constant
    got = logits[0].numpy().astype(np.float64)
    np.testing.assert_allclose(got - got.mean(), reference - reference.mean(), atol=2e-3)
    # the residual matters: a window rated as MF expected it scores by similarity alone
    obs_expected = dict(batch)
    obs_expected["recent_ratings"] = np.r_[0.0, (expected[0] - 1) / 4][None].astype(np.float32)
    with torch.no_grad():
        flat = policy.get_distribution(policy.obs_to_tensor(obs_expected)[0]).distribution.logits
    plain = 30.0 * unit @ unit[window].T @ np.full(len(window), 0.5 / len(window))
    got = flat[0].numpy().astype(np.float64)
    np.testing.assert_allclose(got - got.mean(), plain - plain.mean(), atol=2e-3)


def test_cf_start_sets_the_starting_sharpness_on_mf(core, ratings):
    """``cf_start`` logits per star of MF's prediction before any update: the untrained policy
    ranks as MF, with that sharpness; ``item_gain`` scales the per-item corrections."""
    policy, features = _untrained_policy(core, ratings, cf_start=4.0, item_gain=10.0)
    user = core.user_ids[0]
    obs = core.observation(core.new_episode(np.random.default_rng(0), {"user_id": user}))
    batch = add_user_features({k: v[None] for k, v in obs.items()}, np.array([user]), features)
    with torch.no_grad():
        scorer = policy.action_net
        scorer.query.weight.zero_()  # the learned part starts near 0, not at 0
        scorer.item_bias[0] = 0.1  # x item_gain: one logit
        logits = policy.get_distribution(policy.obs_to_tensor(batch)[0]).distribution.logits[0]
    mf = (features.users(np.array([user])) @ features.item_vectors.T)[0]
    got = logits.numpy().astype(np.float64)
    reference = 4.0 * mf
    reference[0] += 1.0
    np.testing.assert_allclose(got - got.mean(), reference - reference.mean(), atol=1e-3)
