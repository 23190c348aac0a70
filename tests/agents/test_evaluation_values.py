"""The policy evaluation pinned with values (tiny tables, table rater): what ``simulate`` records
for each episode (replayed by hand with the env's own episode logic), every summary metric,
the paired differences and the gap closed, the logged top-k metrics, and the settings' checks."""

from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import pytest

from agents.evaluate import (
    PolicyEvalConfig,
    evaluate_logged,
    evaluate_policies,
    gap_closed,
    make_batch,
    paired_differences,
    simulate,
    summarize_episodes,
    top_k,
)
from agents.policies import Policy, RandomPolicy
from persona_gym.envs.core import RecCore
from persona_gym.errors import ConfigError
from persona_gym.evaluation.policy import bootstrap_ci, intra_list_diversity, novelty


class Ranked(Policy):
    """Recommends by a fixed preference over the items; records the seeds it is given."""

    name = "ranked"

    def __init__(self, preference, masked=True):
        self.preference, self.masked, self.seeds = np.asarray(preference, dtype=float), masked, []

    def seed(self, seed):
        self.seeds.append(seed)

    def scores(self, batch):
        scores = np.broadcast_to(self.preference, batch.masks.shape).astype(float)
        return np.where(batch.masks, scores, -np.inf) if self.masked else scores


def core_with(core, **overrides) -> RecCore:
    return RecCore(core.config.replace(**overrides), core.rater)


def replay(core, preference, seed, episode):
    """One episode by hand: the user and every draw from ``default_rng([seed, episode])``."""
    rng = np.random.default_rng([seed, episode])
    state = core.new_episode(rng, None)
    record = {
        "seed": seed,
        "episode": episode,
        "user_id": state.user_id,
        "persona": state.persona,
        "return": 0.0,
        "items": [],
        "expected": [],
        "sampled": [],
        "masked": 0,
        "left": False,
    }
    while True:
        scores = np.where(state.allowed, preference, -np.inf)
        action = int(np.argmax(scores))
        (result,) = core.step([state], [action], [rng])
        record["return"] += result.reward
        if state.last["masked"]:
            record["masked"] += 1
        else:
            record["items"].append(action)
            record["expected"].append(state.last["expected"])
            record["sampled"].append(state.last["sampled"])
        if result.terminated or result.truncated or core.at_horizon(state):
            record["left"] = state.left
            return record


def test_simulate_records_each_episode_as_the_env_plays_it(core):
    core = core_with(
        core, max_episode_steps=4, leave_prob=0.5, leave_threshold=3.0, reward="sampled"
    )
    preference = [3.0, 5.0, 1.0, 4.0, 2.0, 0.0]
    policy = Ranked(preference)
    records = simulate(policy, core, episodes=5, seed=2, n_envs=2)
    assert records == [replay(core, np.array(preference), 2, e) for e in range(5)]
    assert [r["episode"] for r in records] == [0, 1, 2, 3, 4]
    assert policy.seeds == [
        2 * 1_000_003 + start for start in (0, 2, 4)
    ]  # one per batch of episodes
    assert any(r["left"] for r in records) and any(not r["left"] for r in records)
    assert all(len(r["items"]) <= 4 for r in records)


def test_masked_actions_are_counted_not_recorded(core):
    core = core_with(core, max_episode_steps=3, repeat_penalty=-2.0)
    (record,) = simulate(
        Ranked([1, 0, 0, 0, 0, 0], masked=False), core, episodes=1, seed=0, n_envs=1
    )
    assert record["items"] == [0] and record["masked"] == 2 and len(record["expected"]) == 1
    assert record["return"] == pytest.approx(record["expected"][0] - 4.0)
    terminate = core_with(core, max_episode_steps=3, repeat_rule="terminate")
    (record,) = simulate(
        Ranked([1, 0, 0, 0, 0, 0], masked=False), terminate, episodes=1, seed=0, n_envs=1
    )
    assert record["items"] == [0] and record["masked"] == 1 and record["left"] is False


def records_by_hand():
    return [
        {
            "seed": 0,
            "episode": 0,
            "user_id": 0,
            "return": 7.0,
            "items": [0, 1],
            "expected": [3.0, 4.0],
            "sampled": [4.0, 2.0],
            "left": True,
        },
        {
            "seed": 0,
            "episode": 1,
            "user_id": 1,
            "return": -1.0,
            "items": [],
            "expected": [],
            "sampled": [],
            "left": False,
        },
        {
            "seed": 0,
            "episode": 2,
            "user_id": 2,
            "return": 9.0,
            "items": [1, 2, 3],
            "expected": [2.0, 3.0, 5.0],
            "sampled": [5.0, 4.0, 1.0],
            "left": False,
        },
    ]


def test_every_summary_metric_by_hand(core):
    records = records_by_hand()
    summary = summarize_episodes(records, core, n_users=100)
    genres = core.catalog.genres
    expected = {
        "return": (7.0 - 1.0 + 9.0) / 3,
        "mean_rating": (3.5 + 10 / 3) / 2,  # the episode without ratings is left out
        "share_ge4": (0.5 + 2 / 3) / 2,
        "churn": 1 / 3,
        "diversity": (
            intra_list_diversity([genres[0], genres[1]])
            + 0.0
            + intra_list_diversity([genres[i] for i in (1, 2, 3)])
        )
        / 3,
        "novelty": (
            novelty([0, 1], core.catalog.n_ratings, 100)
            + 0.0
            + novelty([1, 2, 3], core.catalog.n_ratings, 100)
        )
        / 3,
        "coverage": 4 / 6,
    }
    assert summary["episodes"] == 3 and set(summary) == set(expected) | {"episodes"}
    for name, value in expected.items():
        entry = summary[name]
        assert entry["mean"] == pytest.approx(value), name
        assert entry["low"] <= entry["mean"] <= entry["high"], name
    returns = np.array([7.0, -1.0, 9.0])
    _, low, high = bootstrap_ci(3, lambda idx: float(np.nanmean(returns[idx])), seed=0)
    assert (summary["return"]["low"], summary["return"]["high"]) == (low, high)
    other = summarize_episodes(records, core, n_users=100, seed=5)["return"]
    assert other["mean"] == summary["return"]["mean"] and (other["low"], other["high"]) != (
        low,
        high,
    )


def test_gap_closed_by_hand():
    def entry(ret, rating):
        return {"simulator": {"return": {"mean": ret}, "mean_rating": {"mean": rating}}}

    entries = {
        "random": entry(1.0, 3.0),
        "mf": entry(2.0, 3.5),
        "simulator-greedy": entry(5.0, 4.0),
    }
    assert gap_closed(entries) == {
        "return": {"random": 0.0, "mf": 0.25, "simulator-greedy": 1.0},
        "mean_rating": {"random": 0.0, "mf": 0.5, "simulator-greedy": 1.0},
    }
    flat = {**entries, "simulator-greedy": entry(1.0, 4.0)}  # no return gap to close
    assert gap_closed(flat) == {"mean_rating": {"random": 0.0, "mf": 0.5, "simulator-greedy": 1.0}}
    assert gap_closed({"mf": entries["mf"], "simulator-greedy": entries["simulator-greedy"]}) == {}
    assert gap_closed({"random": entries["random"], "mf": entries["mf"]}) == {}
    assert gap_closed(entries, low="mf", high="random") == {
        "return": {"random": 1.0, "mf": 0.0, "simulator-greedy": -3.0},
        "mean_rating": {"random": 1.0, "mf": 0.0, "simulator-greedy": -1.0},
    }


def test_paired_differences_by_hand():
    a = records_by_hand()
    b = [
        dict(r, **{"return": r["return"] - d, "expected": [x - d for x in r["expected"]]})
        for r, d in zip(a, (1.0, -2.0, 3.0), strict=True)
    ]
    diffs = paired_differences({"a": a, "b": b})
    assert [(d["a"], d["b"], d["metric"]) for d in diffs] == [
        ("a", "b", "return"),
        ("a", "b", "mean_rating"),
    ]
    ret, rating = diffs
    assert ret["mean"] == pytest.approx(2 / 3) and rating["mean"] == pytest.approx(
        2.0
    )  # NaN episode left out
    diff = np.array([1.0, -2.0, 3.0])
    _, low, high = bootstrap_ci(3, lambda idx: float(np.nanmean(diff[idx])), seed=0)
    assert (ret["low"], ret["high"]) == (low, high)
    assert ret["distinguishable"] is bool(low > 0 or high < 0)
    assert rating["distinguishable"] is True and 0.0 < rating["low"] < 2.0 < rating["high"]
    below = paired_differences({"b": b, "a": a})[1]
    assert below["mean"] == pytest.approx(-2.0) and below["distinguishable"] is True
    three = paired_differences({"a": a, "b": b, "c": a})
    assert [(d["a"], d["b"]) for d in three[::2]] == [("a", "b"), ("a", "c"), ("b", "c")]
    moved = [dict(r, user_id=r["user_id"] + 1) if i == 2 else r for i, r in enumerate(a)]
    with pytest.raises(ValueError) as err:
        paired_differences({"a": a, "b": b, "c": moved})
    assert str(err.value) == (
        "policies 'a' and 'c' met different episodes; paired differences need "
        "the same seeds and episodes"
    )


def test_top_k_keeps_the_best_finite_scores_ties_to_the_lower_index():
    scores = np.array([[1.0, 3.0, 3.0, -np.inf, 2.0], [-np.inf, -np.inf, 0.5, -np.inf, -np.inf]])
    assert top_k(scores, 3) == [[1, 2, 4], [2]]
    assert top_k(scores, 1) == [[1], [2]]
    assert top_k(scores, 10) == [[1, 2, 4, 0], [2]]
    assert all(type(i) is int for row in top_k(scores, 3) for i in row)
    ties = np.zeros((1, 300))
    ties[0, ::7] = 1.0  # 43 items tied first, the rest tied second: lower indices first in each
    assert top_k(ties, 10) == [[0, 7, 14, 21, 28, 35, 42, 49, 56, 63]]
    assert top_k(ties, 45)[0][43:] == [1, 2]


def test_logged_metrics_of_two_users_by_hand(core):
    u0, u1 = core.user_ids[:2]
    policy = Ranked([6, 5, 4, 3, 2, 1])
    test = pd.DataFrame(
        {
            "user_id": [u1, u0, u0, u0, u1],
            "item_index": [5, 2, 0, 4, 1],
            "rating": [1.0, 5.0, 3.0, 2.0, 4.0],
            "timestamp": [7, 30, 10, 20, 8],
        }
    )
    result = evaluate_logged(policy, core, test, k=2)
    assert policy.seeds == [0]
    assert result["users"] == 2 and result["k"] == 2 and result["test_interactions"] == 5
    # top-2 [0, 1]: user 0's test {0, 4, 2} has 0 at rank 1; user 1's {5, 1} has 1 at rank 2
    ndcg0 = 1.0 / (1 + 1 / math.log2(3))
    ndcg1 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert result["hit_rate"]["mean"] == 1.0 and result["ndcg"]["mean"] == pytest.approx(
        (ndcg0 + ndcg1) / 2
    )
    assert result["hit_rating"]["mean"] == pytest.approx((3.0 + 4.0) / 2)
    # replay in time order. user 0: 0 (t=10) in [0, 1] -> 3; 4 (t=20) not in [1, 2]; 2 (t=30) in [1, 2] -> 5.
    # user 1: 5 (t=7) not in [0, 1]; 1 (t=8) in [0, 1] -> 4
    assert result["replay_accepted"] == 3 and result["replay"]["mean"] == pytest.approx(4.0)
    for name in ("hit_rate", "ndcg", "hit_rating", "replay"):
        assert result[name]["low"] <= result[name]["mean"] <= result[name]["high"], name
    assert evaluate_logged(policy, core, test, k=2, seed=4) != result  # the intervals' seed
    assert policy.seeds[-1] == 4


def test_logged_metrics_without_hits_or_acceptances(core):
    user = core.user_ids[0]
    test = pd.DataFrame({"user_id": [user], "item_index": [5], "rating": [5.0], "timestamp": [1]})
    result = evaluate_logged(Ranked([6, 5, 4, 3, 2, 1]), core, test, k=1)
    assert result["hit_rate"]["mean"] == 0.0 and result["ndcg"]["mean"] == 0.0
    assert (
        result["hit_rating"] is None and result["replay"] is None and result["replay_accepted"] == 0
    )
    default = evaluate_logged(Ranked([6, 5, 4, 3, 2, 1]), core, test)
    assert default["k"] == 10 and default["hit_rate"]["mean"] == 1.0
    with pytest.raises(ValueError, match="^no test interactions to evaluate on$"):
        evaluate_logged(Ranked([1] * 6), core, test.iloc[:0])
    unknown = pd.DataFrame(
        {
            "user_id": [77, 5, 99, 8, 9, 10, 11],
            "item_index": [0] * 7,
            "rating": [3.0] * 7,
            "timestamp": [1] * 7,
        }
    )
    with pytest.raises(ValueError) as err:
        evaluate_logged(Ranked([1] * 6), core, unknown)
    assert (
        str(err.value)
        == "test interactions of users the simulator does not have: [5, 8, 9, 10, 11]"
    )


def test_policy_eval_settings_and_their_checks():
    config = PolicyEvalConfig()
    assert (config.episodes, config.seeds, config.n_envs, config.k, config.logged) == (
        32,
        (0,),
        16,
        10,
        True,
    )
    for name in ("episodes", "n_envs", "k"):
        with pytest.raises(ConfigError) as err:
            PolicyEvalConfig(**{name: 0})
        flag = name.replace("_", "-")
        assert str(err.value) == f"PolicyEvalConfig.{name} (--{flag}) must be >= 1, got 0"
        assert getattr(PolicyEvalConfig(**{name: 1}), name) == 1
    with pytest.raises(ConfigError) as err:
        PolicyEvalConfig(seeds=())
    assert str(err.value) == "PolicyEvalConfig.seeds (--seeds) must name at least one seed"


def test_evaluate_policies_puts_it_together(core, caplog):
    users = core.user_ids
    test = pd.DataFrame(
        {
            "user_id": users,
            "item_index": [0, 1, 2, 3],
            "rating": [5.0, 4.0, 2.0, 1.0],
            "timestamp": [1, 1, 1, 1],
        }
    )
    policies = {
        "first": Ranked([6, 5, 4, 3, 2, 1]),
        "last": Ranked([1, 2, 3, 4, 5, 6]),
        "random": RandomPolicy(0),
    }
    config = PolicyEvalConfig(episodes=3, seeds=(0, 1), n_envs=2, k=2)
    with caplog.at_level(logging.INFO, logger="agents.evaluate"):
        results = evaluate_policies(core, policies, config, test, n_users=4)
    assert results["config"] == {
        "episodes": 3,
        "seeds": [0, 1],
        "n_envs": 2,
        "k": 2,
        "logged": True,
    }
    first = results["policies"]["first"]
    records = [r for s in (0, 1) for r in simulate(Ranked([6, 5, 4, 3, 2, 1]), core, 3, s, 2)]
    assert first["simulator"] == summarize_episodes(records, core, 4, seed=0)
    assert first["logged"] == evaluate_logged(Ranked([6, 5, 4, 3, 2, 1]), core, test, 2)
    assert first["seconds"] >= 0 and isinstance(first["seconds"], float)
    assert len(results["differences"]) == 6 and results["gap_closed"] == {}
    assert "agreement" not in results  # 3 policies: too few to compare orderings
    assert results["policies"]["last"]["logged"]["replay"] is None
    messages = [r.getMessage() for r in caplog.records if r.name == "agents.evaluate"]
    assert messages[0].startswith(
        f"first: mean rating {first['simulator']['mean_rating']['mean']:.3f} ("
    )
    assert messages[0].endswith(" s)") and len(messages) == 3
    # without logged data, or with one logged policy only: no logged metrics, no agreement
    alone = evaluate_policies(core, {"first": Ranked([6, 5, 4, 3, 2, 1])}, config, test, n_users=4)
    assert "agreement" not in alone and "logged" in alone["policies"]["first"]
    off = evaluate_policies(
        core, policies, PolicyEvalConfig(episodes=2, logged=False), test, n_users=4
    )
    assert all("logged" not in e for e in off["policies"].values()) and "agreement" not in off
    none = evaluate_policies(core, policies, PolicyEvalConfig(episodes=2), None, n_users=4)
    assert all("logged" not in e for e in none["policies"].values())


def test_agreement_on_both_logged_metrics(core):
    users = core.user_ids
    test = pd.DataFrame(
        {
            "user_id": users * 2,
            "item_index": [0] * 4 + [1] * 4,
            "rating": [5.0] * 4 + [3.0] * 4,
            "timestamp": [1] * 4 + [2] * 4,
        }
    )
    policies = {
        "first": Ranked([6, 5, 4, 3, 2, 1]),
        "second": Ranked([5, 6, 4, 3, 2, 1]),
        "third": Ranked([6, 4, 5, 3, 2, 1]),
        "fourth": Ranked([4, 6, 5, 3, 2, 1]),
    }
    results = evaluate_policies(core, policies, PolicyEvalConfig(episodes=2, k=1), test, n_users=4)
    logged = {n: results["policies"][n]["logged"] for n in policies}
    assert logged["first"]["replay"]["mean"] == 4.0 and logged["second"]["replay"]["mean"] == 3.0
    assert set(results["agreement"]) == {"mean_rating_vs_ndcg", "mean_rating_vs_replay"}
    from persona_gym.evaluation.policy import rank_agreement

    means = [results["policies"][n]["simulator"]["mean_rating"]["mean"] for n in policies]
    for metric in ("ndcg", "replay"):
        scores = [logged[n][metric]["mean"] for n in policies]
        # (NaN where the tiny table rates every policy alike: the same NaN both ways)
        np.testing.assert_equal(
            results["agreement"][f"mean_rating_vs_{metric}"], rank_agreement(means, scores)
        )
    assert results["agreement"]["mean_rating_vs_ndcg"]["n_policies"] == 4
    # three of them: no agreement
    del policies["fourth"]
    three = evaluate_policies(core, policies, PolicyEvalConfig(episodes=2, k=1), test, n_users=4)
    assert "agreement" not in three


def test_make_batch_stacks_the_episode_states(core):
    states = [
        core.new_episode(np.random.default_rng(0), {"user_id": u}) for u in core.user_ids[1:3]
    ]
    states[0].allowed[2] = False
    batch = make_batch(core, states)
    assert batch.user_ids.tolist() == core.user_ids[1:3] and batch.user_ids.dtype == np.int64
    np.testing.assert_array_equal(batch.masks, np.stack([s.allowed for s in states]))
    assert list(batch.states) == states
    for key, value in core.observations(states).items():
        np.testing.assert_array_equal(batch.obs[key], value)
