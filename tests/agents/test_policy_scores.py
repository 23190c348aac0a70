"""Each policy's scores pinned with values (tiny tables, table rater): the seeded random scores,
the popularity counts, the shrunk item means, the MF baseline with its defaults, the
simulator-greedy re-ranking of the MF candidates, and a stable-baselines3 model's own logits or
Q-values under the env's mask (untrained models saved as run folders, no training)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from agents.evaluate import make_batch
from agents.policies import (
    ItemMeanPolicy,
    MFPolicy,
    MostPopularPolicy,
    RandomPolicy,
    SB3Policy,
    SimulatorGreedyPolicy,
    WindowGreedyPolicy,
    make_policy,
)
from persona_gym.ratings import RATING_VALUES
from persona_gym.simulator.cf_models import BiasedMF, ItemMean


def batch_of(core, masked=()):
    """Every tiny user at reset; ``masked``: (row, item) pairs taken out of the masks."""
    states = [core.new_episode(np.random.default_rng(0), {"user_id": u}) for u in core.user_ids]
    for row, item in masked:
        states[row].allowed[item] = False
    return make_batch(core, states)


MASKED = ((0, 1), (0, 4), (2, 0), (3, 5))


def test_random_scores_are_the_seeded_uniforms(core):
    batch = batch_of(core, MASKED)
    for policy, seed in ((RandomPolicy(), 0), (RandomPolicy(seed=7), 7)):
        expected = np.where(
            batch.masks, np.random.default_rng(seed).random(batch.masks.shape), -np.inf
        )
        np.testing.assert_array_equal(policy.scores(batch), expected)
    policy = RandomPolicy(seed=7)
    policy.scores(batch)
    policy.seed(3)
    np.testing.assert_array_equal(
        policy.scores(batch)[batch.masks],
        np.random.default_rng(3).random(batch.masks.shape)[batch.masks],
    )
    assert (
        make_policy("random", core, seed=5).scores(batch)[0, 0]
        == np.random.default_rng(5).random((4, 6))[0, 0]
    )
    assert (
        make_policy("random", core).scores(batch)[0, 0]
        == np.random.default_rng(0).random((4, 6))[0, 0]
    )


def test_static_scores_are_counts_and_shrunk_means(core, ratings):
    batch = batch_of(core, MASKED)
    popular = MostPopularPolicy(core)
    expected = np.where(batch.masks, core.catalog.n_ratings.astype(np.float64)[None, :], -np.inf)
    np.testing.assert_array_equal(popular.scores(batch), expected)
    assert popular.scores(batch).dtype == np.float64
    ids = core.catalog.item_ids
    means = ItemMean(10.0).fit(ratings).predict(np.zeros(len(ids), dtype=np.int64), ids)
    np.testing.assert_allclose(ItemMeanPolicy(core, ratings).item_scores, means)
    unshrunk = ItemMean(0.0).fit(ratings).predict(np.zeros(len(ids), dtype=np.int64), ids)
    np.testing.assert_allclose(ItemMeanPolicy(core, ratings, shrinkage=0.0).item_scores, unshrunk)
    assert not np.allclose(means, unshrunk)
    np.testing.assert_array_equal(
        make_policy("item-mean", core, ratings).scores(batch),
        np.where(batch.masks, means[None, :], -np.inf),
    )
    # the best allowed item of each row, ties to the lower index
    np.testing.assert_array_equal(popular.act(batch), np.argmax(expected, axis=1))


def test_mf_scores_are_the_biased_mf_with_its_defaults(core, ratings):
    batch = batch_of(core, MASKED)
    reference = BiasedMF(factors=5, reg=5.0, reg_bias=5.0, seed=0).fit(ratings)
    mf = MFPolicy(core, ratings)
    expected = np.stack(
        [reference.predict(np.full(6, u), core.catalog.item_ids) for u in core.user_ids]
    )
    np.testing.assert_allclose(
        mf.scores(batch), np.where(batch.masks, expected, -np.inf), rtol=1e-12
    )
    assert mf.user_scores(core.user_ids[1]) is mf.user_scores(core.user_ids[1])  # cached per user
    other = MFPolicy(core, ratings, factors=2, reg=0.5, reg_bias=0.5, seed=3)
    custom = BiasedMF(factors=2, reg=0.5, reg_bias=0.5, seed=3).fit(ratings)
    np.testing.assert_allclose(
        other.user_scores(2), custom.predict(np.full(6, 2), core.catalog.item_ids)
    )
    assert not np.allclose(other.user_scores(2), mf.user_scores(2))
    seeded = make_policy("mf", core, ratings, seed=3).model
    assert (seeded.factors, seeded.seed) == (5, 3)


def test_simulator_greedy_rates_the_mf_candidates_with_the_window(core, ratings):
    batch = batch_of(core, MASKED)
    mf = MFPolicy(core, ratings)
    prior = mf.scores(batch)
    greedy = SimulatorGreedyPolicy(core, mf, n_candidates=3)
    calls = core.rater.calls
    scores = greedy.scores(batch)
    assert core.rater.calls == calls + 1  # one simulator call for the whole batch
    for r, state in enumerate(batch.states):
        allowed = np.flatnonzero(batch.masks[r])
        top = allowed[np.argsort(-prior[r, allowed], kind="stable")][:3]
        window = core.window(state)
        rated = core.rater.rate([state.user_id] * 3, list(top), [window] * 3) @ RATING_VALUES
        np.testing.assert_allclose(scores[r, top], rated, rtol=1e-12)
        rest = np.setdiff1d(allowed, top)
        np.testing.assert_allclose(
            scores[r, rest], -1.0 / (1.0 + np.exp(-prior[r, rest])), rtol=1e-12
        )
        assert np.isneginf(scores[r, ~batch.masks[r]]).all()
        assert scores[r, top].min() >= 1.0 > 0.0 > scores[r, rest].max()  # candidates first
    everyone = SimulatorGreedyPolicy(core, mf)  # 20 candidates: every allowed item is rated
    assert everyone.n_candidates == 20 and (everyone.scores(batch)[batch.masks] >= 1.0).all()
    shared = make_policy("simulator-greedy", core, ratings, mf=mf)
    assert (
        isinstance(shared, SimulatorGreedyPolicy) and shared.mf is mf and shared.n_candidates == 20
    )
    assert make_policy("mf", core, ratings, mf=mf) is mf
    assert greedy.logged_eval is False and mf.logged_eval is True
    with pytest.raises(
        ValueError, match="^SimulatorGreedyPolicy needs the episode states in the Batch$"
    ):
        greedy.scores(type(batch)(batch.obs, batch.masks, batch.user_ids))


def test_simulator_greedy_refuses_a_rater_output_that_is_not_distributions(
    core, ratings, monkeypatch
):
    from persona_gym.simulator.rater import RaterOutputError

    greedy = SimulatorGreedyPolicy(core, MFPolicy(core, ratings), n_candidates=3)
    batch = batch_of(core)
    monkeypatch.setattr(core.rater, "rate", lambda u, i, w: np.full((len(u), 5), np.nan))
    with pytest.raises(RaterOutputError, match=r"rating distribution of row 0, .* is not finite"):
        greedy.scores(batch)
    monkeypatch.setattr(core.rater, "rate", lambda u, i, w: np.full((len(u) - 1, 5), 0.2))
    with pytest.raises(RaterOutputError, match=r"returned an array of shape \(11, 5\) for 12"):
        greedy.scores(batch)


def test_simulator_greedy_breaks_ties_toward_the_lower_index():
    from types import SimpleNamespace

    from agents.policies import Batch

    prior = np.zeros((1, 300))
    prior[0, ::7] = 1.0  # 43 candidates tied first
    rated = []
    rater = SimpleNamespace(
        rate=lambda users, items, windows: (
            rated.append(list(items)) or np.tile([0.0, 0.0, 1.0, 0.0, 0.0], (len(items), 1))
        ),
        source="fake",
    )
    core = SimpleNamespace(rater=rater, window=lambda state: ())
    mf = SimpleNamespace(scores=lambda batch: prior)
    batch = Batch({}, np.ones((1, 300), dtype=bool), np.array([4]), [SimpleNamespace(user_id=4)])
    scores = SimulatorGreedyPolicy(core, mf, n_candidates=5).scores(batch)
    assert rated == [[0, 7, 14, 21, 28]]
    assert (scores[0, [0, 7, 14, 21, 28]] == 3.0).all() and (scores[0, 35] < 0)


def test_simulator_greedy_with_nothing_allowed_scores_minus_infinity(core, ratings):
    batch = batch_of(core)
    batch.masks[:] = False
    scores = SimulatorGreedyPolicy(core, MFPolicy(core, ratings)).scores(batch)
    assert np.isneginf(scores).all() and scores.shape == (4, 6)


def test_policy_names_and_errors(core, ratings, tmp_path):
    names = {
        "random": RandomPolicy,
        "most-popular": MostPopularPolicy,
        "item-mean": ItemMeanPolicy,
        "mf": MFPolicy,
        "window-greedy": WindowGreedyPolicy,
        "simulator-greedy": SimulatorGreedyPolicy,
    }
    for name, cls in names.items():
        policy = make_policy(name, core, ratings)
        assert type(policy) is cls and policy.name == name
    for name in ("item-mean", "mf", "simulator-greedy"):
        with pytest.raises(ValueError) as err:
            make_policy(name, core)
        assert (
            str(err.value)
            == f"policy {name!r} needs the training ratings (fit_frame(train, background))"
        )
    with pytest.raises(ValueError) as err:
        make_policy(str(tmp_path / "nowhere"), core, ratings)
    assert str(err.value) == (
        f"unknown policy {str(tmp_path / 'nowhere')!r}: choose from ['random', 'most-popular', 'item-mean', "
        "'mf', 'window-greedy', 'simulator-greedy'], 'agent' (the shipped agent) or give a run folder / model.zip written "
        "by `persona-gym train-agent`"
    )


# -- trained models -----------------------------------------------------------------------------
def save_run(folder, model, algo, policy="mlp", timesteps=64, seed=2, features=None):
    from agents.runs import FEATURES_FILE

    folder.mkdir(parents=True)
    model.save(folder / "model.zip")
    run = {"config": {"algo": algo, "policy": policy, "seed": seed}, "algo": algo}
    if timesteps is not None:
        run["timesteps"] = timesteps
    (folder / "run.json").write_text(json.dumps(run))
    if features is not None:
        features.save(folder / FEATURES_FILE)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_config, table_artifacts, ratings):
    """Untrained PPO and DQN (MultiInputPolicy) and an items MaskablePPO, saved as run folders."""
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import DQN, PPO

    from agents.item_policy import CFFeatures, ItemScoringPolicy
    from agents.sb3_env import SB3VecEnv
    from persona_gym.simulator.table import TableRater

    root = tmp_path_factory.mktemp("runs")
    rater = TableRater.from_artifacts(table_artifacts, window_size=2)
    env = SB3VecEnv("PersonaML100K-v0", 2, rater=rater, **tiny_config)
    torch.manual_seed(0)
    out = {
        "ppo": save_run(
            root / "ppo",
            PPO("MultiInputPolicy", env, n_steps=8, batch_size=16, seed=0, device="cpu"),
            "ppo",
        ),
        "dqn": save_run(
            root / "dqn",
            DQN("MultiInputPolicy", env, buffer_size=64, learning_starts=0, seed=0, device="cpu"),
            "dqn",
            timesteps=None,
        ),
    }
    features = CFFeatures.from_ratings(ratings, rater.catalog, rater.item_embeddings)
    items_env = SB3VecEnv("PersonaML100K-v0", 2, rater=rater, features=features, **tiny_config)
    model = MaskablePPO(
        ItemScoringPolicy,
        items_env,
        n_steps=8,
        batch_size=16,
        seed=0,
        device="cpu",
        policy_kwargs={"item_side": features.item_side, "item_vectors": features.item_vectors},
    )
    out["items"] = save_run(
        root / "items", model, "maskable-ppo", policy="items", features=features
    )
    return out


def test_a_saved_ppo_scores_with_its_logits_under_the_mask(core, runs):
    batch = batch_of(core, MASKED)
    policy = SB3Policy.load(runs["ppo"])
    assert policy.name == "ppo:s2:64" and policy.features is None
    net = policy.model.policy
    with torch.no_grad():
        logits = net.get_distribution(net.obs_to_tensor(batch.obs)[0]).distribution.logits.numpy()
    scores = policy.scores(batch)
    assert scores.dtype == np.float64
    np.testing.assert_allclose(scores, np.where(batch.masks, logits, -np.inf), rtol=1e-6)
    np.testing.assert_array_equal(
        policy.act(batch), np.argmax(np.where(batch.masks, logits, -np.inf), axis=1)
    )
    by_zip = SB3Policy.load(runs["ppo"] / "model.zip", name="mine")
    assert by_zip.name == "mine"
    np.testing.assert_array_equal(by_zip.scores(batch), scores)
    assert type(make_policy(str(runs["ppo"]), core)) is SB3Policy


def test_a_saved_dqn_scores_with_its_q_values(core, runs):
    batch = batch_of(core, MASKED)
    policy = SB3Policy.load(runs["dqn"])
    assert policy.name == "dqn:s2:?"
    net = policy.model.policy
    with torch.no_grad():
        q = net.q_net(net.obs_to_tensor(batch.obs)[0]).numpy()
    np.testing.assert_allclose(policy.scores(batch), np.where(batch.masks, q, -np.inf), rtol=1e-6)


def test_a_saved_items_policy_reads_the_users_collaborative_vectors(core, runs):
    from agents.item_policy import CFFeatures

    batch = batch_of(core, MASKED)
    policy = SB3Policy.load(runs["items"])
    assert policy.name == "maskable-ppo:s2:64" and isinstance(policy.features, CFFeatures)
    net = policy.model.policy
    obs = {**batch.obs, "user": policy.features.users(batch.user_ids)}
    with torch.no_grad():
        logits = net.get_distribution(net.obs_to_tensor(obs)[0]).distribution.logits.numpy()
    np.testing.assert_allclose(
        policy.scores(batch), np.where(batch.masks, logits, -np.inf), rtol=1e-6
    )


def test_a_folder_without_a_model_is_named(core, runs, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    (folder / "run.json").write_text((runs["ppo"] / "run.json").read_text())
    with pytest.raises(FileNotFoundError) as err:
        SB3Policy.load(folder)
    assert str(err.value) == (
        f"{folder / 'model.zip'}: no trained model; train one with "
        "`persona-gym train-agent` (or pass the run folder)"
    )


def test_the_shipped_agent_is_the_policy_named_agent(core):
    from agents.runs import SHIPPED_AGENT
    from persona_gym.errors import ConfigError

    # "agent" loads the shipped agent, checked against the env: the tiny one has 6 items
    with pytest.raises(ConfigError, match=re.escape(str(SHIPPED_AGENT / "model.zip"))):
        make_policy("agent", core)
    policy = SB3Policy.load(SHIPPED_AGENT, name="agent")
    assert isinstance(policy, SB3Policy) and policy.name == "agent" and policy.features is not None
    assert policy.features.user_vectors.shape[0] > 100  # the ML-100k users it was trained with
    assert SB3Policy.load(SHIPPED_AGENT).name == "maskable-dqn:s0:40960"
