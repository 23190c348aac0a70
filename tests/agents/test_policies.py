"""Baseline policies, simulator and logged-data evaluation on the tiny tables (table rater)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from agents.evaluate import evaluate_logged, make_batch, simulate, summarize_episodes
from agents.policies import BASELINES, Policy, make_policy


class FixedScores(Policy):
    """Scores items by a fixed vector (for hand-computed cases)."""

    name = "fixed"

    def __init__(self, scores):
        self.item_scores = np.asarray(scores, dtype=float)

    def scores(self, batch):
        return np.where(batch.masks, self.item_scores[None, :], -np.inf)


def test_every_baseline_respects_action_masks(core, ratings):
    rng = np.random.default_rng(0)
    for name in BASELINES:
        policy = make_policy(name, core, ratings, seed=0)
        for trial in range(3):
            states = [core.new_episode(rng, {"user_id": u}) for u in core.user_ids]
            for state in states:  # mask a random subset, keep at least one item
                state.allowed[:] = rng.random(core.n_items) < 0.5
                state.allowed[rng.integers(core.n_items)] = True
            batch = make_batch(core, states)
            actions = policy.act(batch)
            assert batch.masks[np.arange(len(states)), actions].all(), (name, trial)
            assert np.isneginf(policy.scores(batch)[~batch.masks]).all(), name


def test_data_driven_baselines_rank_as_their_models(core, ratings):
    states = [core.new_episode(np.random.default_rng(0), {"user_id": u}) for u in core.user_ids]
    batch = make_batch(core, states)
    popular = make_policy("most-popular", core).scores(batch)[0]
    assert np.argmax(popular) == int(np.argmax(core.catalog.n_ratings))
    mf = make_policy("mf", core, ratings)
    np.testing.assert_allclose(
        mf.scores(batch)[1],
        mf.model.predict(np.full(core.n_items, core.user_ids[1]), core.catalog.item_ids),
    )


def test_simulation_is_deterministic_under_a_seed(core, ratings):
    policy = make_policy("random", core)
    first = simulate(policy, core, episodes=5, seed=3, n_envs=2)
    again = simulate(make_policy("random", core), core, episodes=5, seed=3, n_envs=2)
    assert first == again
    other = simulate(policy, core, episodes=5, seed=4, n_envs=2)
    assert other != first
    # the same episodes (users, items) whatever the batch size, for a deterministic policy;
    # ratings equal up to the last bits (batch shapes change the float summation order)
    mf = make_policy("mf", core, ratings)
    small, large = simulate(mf, core, 5, seed=3, n_envs=2), simulate(mf, core, 5, seed=3, n_envs=5)
    assert [(r["user_id"], r["items"]) for r in small] == [
        (r["user_id"], r["items"]) for r in large
    ]
    np.testing.assert_allclose(
        [r["return"] for r in small], [r["return"] for r in large], rtol=1e-6
    )
    summary = summarize_episodes(first, core, n_users=4)
    for metric in ("return", "mean_rating", "share_ge4", "churn", "diversity", "novelty"):
        entry = summary[metric]
        assert entry["low"] <= entry["mean"] <= entry["high"], metric
    assert summary["coverage"]["high"] <= summary["coverage"]["mean"]  # resamples cover less
    assert summary == summarize_episodes(first, core, n_users=4)
    # the estimates are the per-episode means averaged, by hand
    assert summary["mean_rating"]["mean"] == pytest.approx(
        np.mean([np.mean(r["expected"]) for r in first])
    )
    assert summary["return"]["mean"] == pytest.approx(np.mean([r["return"] for r in first]))
    assert (
        summary["churn"]["mean"] == np.mean([r["left"] for r in first]) and summary["episodes"] == 5
    )


def test_logged_metrics_and_replay_by_hand(core):
    user = core.user_ids[0]
    # the policy prefers item 0, then 1, 2, ...; k = 2
    policy = FixedScores([6, 5, 4, 3, 2, 1])
    test = pd.DataFrame(
        {
            "user_id": [user] * 3,
            "item_index": [1, 3, 2],
            "rating": [4.0, 2.0, 5.0],
            "timestamp": [10, 11, 12],
        }
    )
    result = evaluate_logged(policy, core, test, k=2)
    # static top-2 = [0, 1]: item 1 is a hit at rank 2; ideal: 2 hits at ranks 1-2
    assert result["hit_rate"]["mean"] == 1.0
    assert result["ndcg"]["mean"] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert result["hit_rating"]["mean"] == 4.0
    # replay: item 1 in [0, 1] -> accepted (4), then top = [0, 2]: item 3 skipped, item 2 accepted (5)
    assert result["replay"]["mean"] == pytest.approx(4.5)
    assert result["replay_accepted"] == 2 and result["test_interactions"] == 3


def test_logged_evaluation_rejects_unknown_users(core):
    test = pd.DataFrame({"user_id": [999], "item_index": [0], "rating": [3.0], "timestamp": [1]})
    with pytest.raises(ValueError, match="does not have"):
        evaluate_logged(make_policy("random", core), core, test)


def test_unknown_policy_is_a_clear_error(core, ratings, tmp_path):
    with pytest.raises(ValueError, match="unknown policy 'greedy'"):
        make_policy("greedy", core, ratings)
    with pytest.raises(ValueError, match="needs the training ratings"):
        make_policy("mf", core)
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        make_policy(str(tmp_path), core, ratings)


def test_evaluate_policies_writes_the_report(tmp_path, core, ratings):
    from agents.evaluate import PolicyEvalConfig, evaluate_policies, write_report

    users = core.user_ids
    test = pd.DataFrame(
        {
            "user_id": users * 2,
            "item_index": [0] * len(users) + [3] * len(users),
            "rating": [5.0] * len(users) + [2.0] * len(users),
            "timestamp": [1] * len(users) + [2] * len(users),
        }
    )
    policies = {
        name: make_policy(name, core, ratings)
        for name in ("random", "mf", "item-mean", "simulator-greedy")
    }
    results = evaluate_policies(
        core, policies, PolicyEvalConfig(episodes=3, seeds=(0, 1), n_envs=2, k=2), test, n_users=4
    )
    assert results["policies"]["random"]["simulator"]["episodes"] == 6
    assert "logged" not in results["policies"]["simulator-greedy"]  # too costly to replay
    assert "agreement" not in results  # 3 policies on logged data: too few
    report = write_report(results, tmp_path, "tiny")
    text = report.read_text()
    assert "| simulator-greedy |" in text and "at least 4 policies evaluated on logged data" in text
    assert (tmp_path / "policies.png").stat().st_size > 0 and (tmp_path / "results.json").exists()


def test_paired_differences_gap_closed_and_the_verdict_in_the_report(tmp_path, core, ratings):
    from agents.evaluate import (
        PolicyEvalConfig,
        evaluate_policies,
        paired_differences,
        write_report,
    )

    policies = {
        name: make_policy(name, core, ratings) for name in ("random", "mf", "simulator-greedy")
    }
    results = evaluate_policies(
        core,
        policies,
        PolicyEvalConfig(episodes=4, seeds=(0,), n_envs=2, logged=False),
        None,
        n_users=4,
    )
    diffs = {(d["a"], d["b"], d["metric"]): d for d in results["differences"]}
    assert len(diffs) == 6  # 3 pairs x (return, mean_rating)
    # the paired difference is the difference of the two means (same episodes), inside its interval
    for (a, b, metric), d in diffs.items():
        gap = (
            results["policies"][a]["simulator"][metric]["mean"]
            - results["policies"][b]["simulator"][metric]["mean"]
        )
        assert d["mean"] == pytest.approx(gap) and d["low"] <= d["mean"] <= d["high"]
        assert d["distinguishable"] == (d["low"] > 0 or d["high"] < 0)
    gap = results["gap_closed"]["mean_rating"]
    assert gap["random"] == 0.0 and gap["simulator-greedy"] == 1.0
    text = write_report(results, tmp_path, "tiny").read_text()
    assert "Paired differences" in text and "Gap closed toward simulator-greedy" in text
    # a policy against itself: difference 0, never distinguishable, said so in the report
    same = {"mf": results["policies"]["mf"], "mf'": results["policies"]["mf"]}
    records = {n: simulate(policies["mf"], core, 4, 0, 2) for n in same}
    twin = paired_differences(records)
    assert all(d["mean"] == 0 and not d["distinguishable"] for d in twin)
    text = write_report({"policies": same, "differences": twin}, tmp_path / "twin").read_text()
    assert "**not distinguishable**" in text
    # different users for two policies is an error, not a silent comparison
    other = simulate(policies["mf"], core, 4, 1, 2)
    with pytest.raises(ValueError, match="different episodes"):
        paired_differences({"a": records["mf"], "b": other})


def test_coverage_interval_contains_its_estimate(core, ratings):
    from agents.evaluate import summarize_episodes

    records = simulate(make_policy("random", core), core, episodes=12, seed=0, n_envs=4)
    coverage = summarize_episodes(records, core, n_users=4)["coverage"]
    assert coverage["low"] <= coverage["mean"] <= coverage["high"]


def test_window_greedy_adds_genre_similarity_to_the_liked_window(core, ratings):
    from persona_gym.simulator.memory import Interaction

    policy = make_policy("window-greedy", core, ratings)
    state = core.new_episode(np.random.default_rng(0), {"user_id": core.user_ids[0]})
    state.history = ()  # the window is the episode's alone
    mf = policy.mf.scores(make_batch(core, [state]))[0]
    np.testing.assert_allclose(policy.scores(make_batch(core, [state]))[0], mf)  # empty window
    genres = core.catalog.genres
    liked = next(i for i in range(core.n_items) if genres[i])
    state.episode.append(Interaction(liked, 5.0, 1))
    boost = policy.scores(make_batch(core, [state]))[0] - mf
    for i in range(core.n_items):
        union = set(genres[i]) | set(genres[liked])
        jaccard = len(set(genres[i]) & set(genres[liked])) / max(len(union), 1)
        assert boost[i] == pytest.approx(policy.weight * jaccard)
    state.episode[-1] = Interaction(liked, 2.0, 1)  # not liked: no boost
    np.testing.assert_allclose(policy.scores(make_batch(core, [state]))[0], mf)
