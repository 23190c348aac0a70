"""The item-scoring MaskablePPO policy (``--policy items``) on the tiny tables (table rater)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sb3_contrib import MaskablePPO

from agents.evaluate import make_batch
from agents.item_policy import CFFeatures
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
    (tmp_path / FEATURES_FILE).write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="not the collaborative features"):
        CFFeatures.load(tmp_path / FEATURES_FILE)
