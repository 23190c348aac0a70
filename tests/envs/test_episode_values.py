"""The episode logic pinned with values: churn on the sampled rating at its boundary, the
logged-history mask with partial histories, and the observation's numbers (tiny tables)."""

from __future__ import annotations

import numpy as np
import pytest

from persona_gym.envs import load_env_config
from persona_gym.envs.core import RecCore


class Scripted:
    """The table rater's users and catalogue, with fixed rating distributions and (optionally)
    only the first ``keep`` logged interactions of each user."""

    def __init__(self, inner, probs, keep: int | None = None):
        self.inner, self.probs, self.keep = inner, np.asarray(probs, dtype=np.float64), keep

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def rate(self, users, items, windows):
        return np.tile(self.probs, (len(users), 1))

    def history(self, user_id):
        full = self.inner.history(user_id)
        return full if self.keep is None else full[: self.keep]


def core_with(tiny_config, rater, **overrides) -> RecCore:
    return RecCore(load_env_config("ml100k", **{**tiny_config, **overrides}), rater)


def test_churn_follows_the_sampled_rating_and_its_boundary(tiny_config, table_rater):
    # expected rating 3.5 (never "low"), sampled 2 or 5: the user leaves exactly when the sample is 2
    core = core_with(
        tiny_config, Scripted(table_rater, [0, 0.5, 0, 0, 0.5]), leave_prob=1.0, leave_threshold=2.0
    )
    outcomes = []
    for seed in range(60):
        rng = np.random.default_rng(seed)
        state = core.new_episode(rng, None)
        (result,) = core.step([state], [0], [rng])
        outcomes.append((state.last["sampled"], result.terminated))
    assert {s for s, _ in outcomes} == {2.0, 5.0}
    assert all(
        left == (sampled <= 2.0) for sampled, left in outcomes
    )  # <=: a 2 at threshold 2 leaves


def test_churn_rate_is_leave_prob_within_its_binomial_interval(tiny_config, table_rater):
    core = core_with(
        tiny_config, Scripted(table_rater, [0, 1, 0, 0, 0]), leave_prob=0.3, leave_threshold=2.0
    )
    n, left = 2000, 0
    for seed in range(n):
        rng = np.random.default_rng(seed)
        state = core.new_episode(rng, None)
        left += core.step([state], [1], [rng])[0].terminated
    half_width = 3 * np.sqrt(0.3 * 0.7 / n)
    assert abs(left / n - 0.3) < half_width


def test_masked_steps_never_churn(tiny_config, table_rater):
    for rule in ("threshold", "model"):
        core = core_with(
            tiny_config, Scripted(table_rater, [1, 0, 0, 0, 0]), leave_rule=rule, leave_prob=1.0
        )
        rng = np.random.default_rng(0)
        state = core.new_episode(rng, None)
        state.allowed[3] = False
        (result,) = core.step([state], [3], [rng])
        assert state.last["masked"] and not result.terminated and not state.left


def test_mask_rated_masks_exactly_the_logged_items(tiny_config, table_rater):
    core = core_with(tiny_config, Scripted(table_rater, [0, 0, 1, 0, 0], keep=3), mask_rated=True)
    for user in core.user_ids:
        state = core.new_episode(np.random.default_rng(0), {"user_id": user})
        logged = {x.item_index for x in table_rater.history(user)[:3]}
        assert set(np.flatnonzero(~state.allowed)) == logged
    off = core_with(tiny_config, Scripted(table_rater, [0, 0, 1, 0, 0], keep=3), mask_rated=False)
    assert off.new_episode(np.random.default_rng(0), {"user_id": core.user_ids[0]}).allowed.all()


def test_observation_values(tiny_config, table_rater):
    core = core_with(tiny_config, Scripted(table_rater, [0, 0, 1, 0, 0], keep=4))
    user = core.user_ids[0]
    history = table_rater.history(user)[:4]
    obs = core.observation(core.new_episode(np.random.default_rng(0), {"user_id": user}))
    liked = [x.item_index for x in history if x.rating >= 4.0]
    chosen = liked or [x.item_index for x in history]
    profile = core.item_embeddings[chosen].mean(axis=0)
    np.testing.assert_allclose(obs["profile"], profile / np.linalg.norm(profile), rtol=1e-5)
    w = tiny_config["obs_window"]
    recent = history[-w:]
    np.testing.assert_allclose(
        obs["recent_ratings"][-len(recent) :], [(x.rating - 1) / 4 for x in recent]
    )
    np.testing.assert_allclose(
        obs["recent_items"].reshape(w, -1)[-len(recent) :],
        np.clip(core.item_embeddings[[x.item_index for x in recent]], -1, 1),
        rtol=1e-6,
    )
    assert obs["recent_mask"][-len(recent) :].all() and obs["step_fraction"][0] == 0


def test_profile_uses_only_liked_items(tiny_config, table_rater):
    core = core_with(tiny_config, Scripted(table_rater, [0, 0, 1, 0, 0]))
    for user in core.user_ids:
        history = table_rater.history(user)
        liked = [x.item_index for x in history if x.rating >= 4.0]
        if liked and len(liked) < len(history):
            everything = core.item_embeddings[[x.item_index for x in history]].mean(axis=0)
            profile = core.observation(
                core.new_episode(np.random.default_rng(0), {"user_id": user})
            )["profile"]
            assert not np.allclose(profile, everything / np.linalg.norm(everything), atol=1e-4)
            return
    pytest.fail("no tiny user with both liked and other items")


def test_each_user_is_rated_by_their_own_personas_adapter(trained_tiny_artifacts):
    from persona_gym.simulator.adapter_names import persona_adapter
    from persona_gym.simulator.simulator import UserSimulator

    routed = UserSimulator.load(trained_tiny_artifacts, dtype="float32")
    personas = sorted({routed.persona(u) for u in routed.user_ids})
    assert len(personas) >= 2
    by_persona = {
        p: UserSimulator.load(trained_tiny_artifacts, variant=persona_adapter(p), dtype="float32")
        for p in personas
    }
    for user in routed.user_ids:
        window = routed.history(user)[-2:]
        probs = routed.rate([user, user], [0, 1], [window, window])
        own = by_persona[routed.persona(user)].rate([user, user], [0, 1], [window, window])
        np.testing.assert_allclose(probs, own, atol=1e-6)
        other = next(p for p in personas if p != routed.persona(user))
        assert (
            np.abs(probs - by_persona[other].rate([user, user], [0, 1], [window, window])).max()
            > 1e-4
        )
