"""``RecCore``'s rules pinned with values on a scripted rater: what reset, rated and masked steps
produce (rewards, end flags, info, text), the logged-history mask, the observation's numbers,
the draws' order, one rater call per step, the errors' wording, pickling and the simulator cache.

The rater is a hand-made :class:`~persona_gym.simulator.rater.Rater`: four users with chosen histories,
six items with chosen embeddings, a fixed distribution per item, every call recorded.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from gymnasium import spaces

from persona_gym import ratings
from persona_gym.envs.config import EnvConfig
from persona_gym.envs.core import RecCore, clear_simulator_cache, get_simulator
from persona_gym.leave import LeaveModel, episode_features
from persona_gym.simulator.memory import Interaction
from persona_gym.simulator.rater import Rater

# six items (the tiny catalogue's order: Toy Story, GoldenEye, Heat, Casino, Babe, Se7en)
EMBEDDINGS = np.array(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0.6, 0.8, 0], [0, 0.6, 0.8], [1.5, -1.5, 0]],
    dtype=np.float32,
)  # item 5 lies outside [-1, 1]: the observation clips it
HISTORIES = {
    10: (Interaction(0, 5.0, 100), Interaction(1, 2.0, 101), Interaction(2, 4.0, 102)),
    11: (Interaction(3, 1.0, 50),),  # likes nothing: the profile is the mean of all its items
    12: (),  # no logged history
    13: tuple(Interaction(i, 3.0, 10 + i) for i in range(6)),  # rated everything
}
PERSONAS = {10: 0, 11: 1, 13: 1}
# the distribution over 1..5 of each item (the same for every user)
PROBS = np.array(
    [
        [0, 0, 0, 0, 1],
        [1, 0, 0, 0, 0],
        [0, 0, 0.5, 0.5, 0],
        [0, 0, 0, 0, 1],
        [0, 0.25, 0, 0.75, 0],
        [0.5, 0, 0, 0, 0.5],
    ],
    dtype=np.float64,
)


class Scripted:
    """A Rater with chosen users, histories, embeddings and per-item distributions."""

    def __init__(
        self, catalog, histories=HISTORIES, embeddings=EMBEDDINGS, probs=PROBS, window_size=2
    ):
        self.catalog, self.histories, self.probs = catalog, dict(histories), np.asarray(probs)
        self.item_embeddings, self.window_size, self.source = embeddings, window_size, "scripted"
        self.user_ids = sorted(self.histories)
        self.training_user_ids = self.user_ids[:1]  # the others are users the model never saw
        self.calls: list[tuple[list[int], list[int], list[tuple]]] = []

    def profile(self, user_id):
        return f"profile of {user_id}"

    def persona(self, user_id):
        return PERSONAS.get(user_id, -1)

    def history(self, user_id):
        return self.histories[user_id]

    def rate(self, user_ids, items, windows=None):
        self.calls.append((list(user_ids), list(items), [tuple(w) for w in windows]))
        return self.probs[list(items)]


@pytest.fixture
def rater(catalog) -> Scripted:
    return Scripted(catalog)


def make_core(rater, **overrides) -> RecCore:
    fields = dict(
        artifacts="scripted",
        dataset="synthetic",
        mask_rated=False,
        leave_rule="threshold",
        leave_prob=0.0,
        obs_window=3,
        max_episode_steps=20,
    )
    return RecCore(EnvConfig(**{**fields, **overrides}), rater)


def start(core, user):
    return core.new_episode(np.random.default_rng(0), {"user_id": user})


def step(core, state, item, seed=0):
    return core.step([state], [item], [np.random.default_rng(seed)])[0]


def test_the_scripted_rater_is_a_rater(rater):
    assert isinstance(rater, Rater)


def test_episodes_are_drawn_from_all_users_or_only_the_training_users(rater):
    everyone = make_core(rater)
    assert everyone.user_ids == rater.user_ids and len(rater.user_ids) > 1
    drawn = {everyone.new_episode(np.random.default_rng(seed), None).user_id for seed in range(30)}
    assert drawn == set(rater.user_ids)
    training = make_core(rater, users="training")
    assert training.user_ids == rater.training_user_ids
    drawn = {training.new_episode(np.random.default_rng(seed), None).user_id for seed in range(30)}
    assert drawn == set(rater.training_user_ids)


# -- spaces -------------------------------------------------------------------------------------
def test_spaces_follow_the_embeddings_and_the_window(rater):
    core = make_core(rater, obs_window=4)
    assert core.action_space == spaces.Discrete(6) and core.n_items == 6 and core.dim == 3
    expected = {
        "profile": ((3,), -1.0, 1.0),
        "recent_items": ((12,), -1.0, 1.0),
        "recent_ratings": ((4,), 0.0, 1.0),
        "recent_mask": ((4,), 0.0, 1.0),
        "step_fraction": ((1,), 0.0, 1.0),
    }
    assert list(core.observation_space) == sorted(expected)
    for key, (shape, low, high) in expected.items():
        box = core.observation_space[key]
        assert box.shape == shape and box.dtype == np.float32, key
        assert (box.low == low).all() and (box.high == high).all(), key
    assert core.window_size == 2 and core.user_ids == [10, 11, 12, 13]
    assert core.item_embeddings.dtype == np.float32


def test_item_embeddings_must_cover_the_catalogue(catalog):
    with pytest.raises(
        ValueError,
        match=r"^scripted: 5 item embeddings for 6 catalogue items; "
        r"re-run `persona-gym distill`$",
    ):
        make_core(Scripted(catalog, embeddings=EMBEDDINGS[:5]))


# -- reset --------------------------------------------------------------------------------------
def test_the_user_is_drawn_with_one_integer_of_the_rng(rater):
    core = make_core(rater)
    seen = set()
    for seed in range(12):
        rng, reference = np.random.default_rng(seed), np.random.default_rng(seed)
        state = core.new_episode(rng, None if seed % 2 else {"user_id": None})
        assert state.user_id == core.user_ids[int(reference.integers(4))]
        assert rng.random() == reference.random()  # nothing else was drawn
        seen.add(state.user_id)
    assert seen == {10, 11, 12, 13}


def test_a_chosen_user_starts_from_their_logged_history(rater):
    core = make_core(rater)
    rng, reference = np.random.default_rng(3), np.random.default_rng(3)
    state = core.new_episode(rng, {"user_id": np.int64(11)})
    assert rng.random() == reference.random()  # a chosen user draws nothing
    assert type(state.user_id) is int and state.user_id == 11 and state.persona == 1
    assert state.history == HISTORIES[11] and state.episode == [] and state.steps == 0
    assert state.left is False and state.last == {} and state.allowed.all()
    assert start(core, 12).persona == -1


def test_mask_rated_masks_the_logged_items_and_each_episode_has_its_own_mask(rater):
    core = make_core(rater, mask_rated=True)
    state = start(core, 10)
    np.testing.assert_array_equal(state.allowed, [False, False, False, True, True, True])
    step(core, state, 3)
    assert not state.allowed[3]
    again = start(core, 10)  # a new episode: the last one's recommendations are allowed again
    np.testing.assert_array_equal(again.allowed, [False, False, False, True, True, True])
    assert start(core, 12).allowed.all()  # nothing logged, nothing masked
    with pytest.raises(
        ValueError,
        match=r"^user 13 rated every item of the catalogue in the logged "
        r"history, so nothing can be recommended with "
        r"mask_rated=True; pass mask_rated=False$",
    ):
        start(core, 13)
    unmasked = make_core(rater, mask_rated=False)
    assert start(unmasked, 13).allowed.all()
    state = start(unmasked, 10)
    step(unmasked, state, 0)
    assert start(unmasked, 10).allowed.all()


def test_unknown_users_and_options_are_named(rater):
    core = make_core(rater)
    for bad in (99, True, np.bool_(True), "10", 10.0):
        with pytest.raises(ValueError) as err:
            core.check_user(bad)
        assert str(err.value) == (
            f"options['user_id']={bad!r} is not a simulated user of scripted: 4 users with ids in "
            "[10, 13] (not contiguous), e.g. 10, 11, 12, 13; see env.unwrapped.user_ids"
        )
    assert core.check_user(np.int32(12)) == 12 and type(core.check_user(np.int32(12))) is int
    with pytest.raises(
        ValueError,
        match=r"^unknown reset option\(s\) \['persona', 'seed'\]; "
        r"supported: \['user_id'\]$",
    ):
        core.new_episode(np.random.default_rng(0), {"seed": 1, "persona": 2, "user_id": 10})


# -- actions ------------------------------------------------------------------------------------
def test_actions_are_one_integer_inside_the_catalogue(rater):
    core = make_core(rater)
    assert [core.check_action(a) for a in (0, 5, np.int64(3), np.array(2))] == [0, 5, 3, 2]
    for bad in (1.0, np.array([1]), np.float32(2), "1"):
        with pytest.raises(ValueError) as err:
            core.check_action(bad)
        assert str(err.value) == (
            f"action {bad!r} is not one integer item index (the action space is Discrete(6))"
        )
    for outside in (-1, 6):
        with pytest.raises(ValueError) as err:
            core.check_action(outside)
        assert str(err.value) == (
            f"action {outside} is outside Discrete(6): valid actions are catalogue indices 0..5"
        )


# -- rated steps --------------------------------------------------------------------------------
def test_a_rated_step_records_the_sampled_rating_and_earns_the_expected_one(rater):
    core = make_core(rater)
    state = start(core, 10)
    rng, reference = np.random.default_rng(4), np.random.default_rng(4)
    (result,) = core.step([state], [2], [rng])
    sampled = float(ratings.sample(PROBS[2][None], reference)[0])
    reference.random()  # the churn draw
    assert rng.random() == reference.random()  # exactly two draws: the rating, then churn
    assert result.reward == 3.5 and result.terminated is False and result.truncated is False
    assert state.steps == 1 and state.episode == [Interaction(2, sampled, 103)]
    assert not state.allowed[2] and state.allowed.sum() == 5
    last = dict(state.last)
    np.testing.assert_array_equal(last.pop("probs"), PROBS[2])
    assert last == {"item": 2, "expected": 3.5, "sampled": sampled, "masked": False}
    assert rater.calls == [([10], [2], [HISTORIES[10][-2:]])]


def test_the_reward_is_affine_in_the_chosen_rating(rater):
    for reward, rating in (("expected", 3.5), ("sampled", None)):
        core = make_core(rater, reward=reward, reward_scale=2.0, reward_offset=-1.0)
        state = start(core, 10)
        result = step(core, state, 2, seed=1)
        rating = state.last["sampled"] if rating is None else rating
        assert result.reward == 2.0 * rating - 1.0, reward
    # a one-hot distribution: sampled == expected == 1
    assert (
        step(
            make_core(rater, reward="sampled", reward_offset=0.5), start(make_core(rater), 10), 1
        ).reward
        == 1.5
    )


def test_the_last_allowed_item_truncates(rater):
    core = make_core(rater)
    state = start(core, 12)
    results = [step(core, state, item) for item in range(6)]
    assert [r.truncated for r in results] == [False] * 5 + [True]
    assert not any(r.terminated for r in results) and not state.allowed.any()


def test_churn_draw_follows_the_sample(rater):
    """threshold rule: leave when the sampled rating is <= leave_threshold AND the second uniform
    is < leave_prob (item 5: rating 1 or 5 with probability 1/2 each)."""
    core = make_core(rater, leave_prob=0.5, leave_threshold=1.0)
    outcomes = set()
    for seed in range(40):
        state, reference = start(core, 10), np.random.default_rng(seed)
        result = step(core, state, 5, seed=seed)
        sampled = float(ratings.sample(PROBS[5][None], reference)[0])
        left = sampled <= 1.0 and reference.random() < 0.5
        assert result.terminated is left and state.left is left
        outcomes.add((sampled, left))
    assert outcomes == {(1.0, True), (1.0, False), (5.0, False)}


def test_the_leave_model_churns_at_its_probability_of_the_episode(rater, tmp_path):
    model = LeaveModel((-1.0, 0.5, 0.25, 0.2), 0.3)
    path = model.save(tmp_path / "leave.json")
    core = make_core(rater, leave_rule="model", leave_model=str(path))
    for user, mean in ((10, 11 / 3), (12, 3.0)):  # no logged history: the user mean is 3
        state = start(core, user)
        for item in (0, 1, 3):
            step(core, state, item)
        p = core.leave_probability(state)
        assert p == pytest.approx(model.probability(episode_features([5.0, 1.0, 5.0], mean)))
        assert 0.0 < p < 1.0
    never = LeaveModel((0.0, 0.0, 0.0, 0.0), -50.0).save(tmp_path / "never.json")
    always = LeaveModel((0.0, 0.0, 0.0, 0.0), 50.0).save(tmp_path / "always.json")
    for file, left in ((never, False), (always, True)):
        core = make_core(rater, leave_rule="model", leave_model=str(file))
        state = start(core, 10)
        assert step(core, state, 0).terminated is left and state.left is left
    with pytest.raises(ValueError, match=r"^leave_probability needs leave_rule='model'$"):
        make_core(rater).leave_probability(state)
    assert make_core(rater).leave_model is None


# -- masked steps -------------------------------------------------------------------------------
def test_a_masked_step_costs_the_penalty_and_calls_no_model(rater):
    core = make_core(rater, repeat_penalty=-2.5)
    state = start(core, 10)
    step(core, state, 1)
    calls = list(rater.calls)
    rng, reference = np.random.default_rng(0), np.random.default_rng(0)
    (result,) = core.step([state], [1], [rng])
    assert rng.random() == reference.random()  # a masked step draws nothing
    assert rater.calls == calls and state.steps == 2 and len(state.episode) == 1
    assert (result.reward, result.terminated, result.truncated) == (-2.5, False, False)
    assert state.left is False
    last = dict(state.last)
    assert (
        np.isnan(last.pop("probs")).all()
        and np.isnan(last.pop("expected"))
        and np.isnan(last.pop("sampled"))
    )
    assert last == {"item": 1, "masked": True}


def test_masked_steps_under_each_repeat_rule(rater):
    for rule, terminated in (("penalty", False), ("terminate", True)):
        core = make_core(rater, repeat_rule=rule)
        state = start(core, 12)
        for item in range(6):
            step(core, state, item)
        result = step(core, state, 0)  # nothing is left: truncated, unless the rule terminated
        assert (result.reward, result.terminated, result.truncated) == (
            -1.0,
            terminated,
            not terminated,
        ), rule
        state = start(core, 12)
        step(core, state, 0)
        result = step(core, state, 0)
        assert (result.terminated, result.truncated) == (terminated, False), rule


def test_one_rate_call_for_the_rated_states_of_a_step(rater):
    core = make_core(rater)
    states = [start(core, u) for u in (10, 11, 12)]
    states[1].allowed[0] = False
    results = core.step(states, [4, 0, 2], [np.random.default_rng(i) for i in range(3)])
    assert rater.calls == [([10, 12], [4, 2], [HISTORIES[10][-2:], ()])]
    assert [r.reward for r in results] == [ratings.expected(PROBS[4][None])[0], -1.0, 3.5]
    assert [s.last["masked"] for s in states] == [False, True, False]
    np.testing.assert_array_equal(states[2].last["probs"], PROBS[2])
    rater.calls.clear()
    core.step(states[1:2], [0], [np.random.default_rng(0)])  # only masked actions: no call
    assert rater.calls == []


def test_the_horizon(rater):
    core = make_core(rater, max_episode_steps=2)
    state = start(core, 12)
    horizon = [core.at_horizon(state)]
    for _ in range(3):
        step(core, state, 0)
        horizon.append(core.at_horizon(state))
    assert horizon == [False, False, True, True]


# -- the window and the episode's records ---------------------------------------------------------
def test_records_continue_the_logged_timestamps(rater):
    core = make_core(rater)
    state = start(core, 10)
    state.record(4, 3.0)
    state.record(5, 2.0)
    state.record(0, 4.0, timestamp=7)
    assert state.episode == [
        Interaction(4, 3.0, 103),
        Interaction(5, 2.0, 104),
        Interaction(0, 4.0, 7),
    ]
    assert (
        state.steps == 3 and not state.allowed[[0, 4, 5]].any() and state.allowed[[1, 2, 3]].all()
    )
    assert state.interactions() == HISTORIES[10] + tuple(state.episode)
    assert core.window(state) == (Interaction(5, 2.0, 104), Interaction(0, 4.0, 7))
    fresh = start(core, 12)
    fresh.record(1, 5.0)
    fresh.record(2, 5.0)
    assert [x.timestamp for x in fresh.episode] == [1, 2]


# -- observations ---------------------------------------------------------------------------------
def test_the_observation_pads_at_the_front_and_follows_the_episode(rater):
    core = make_core(rater, obs_window=3, max_episode_steps=4)
    state = start(core, 11)
    obs = core.observation(state)
    np.testing.assert_array_equal(obs["recent_mask"], [0, 0, 1])
    np.testing.assert_array_equal(obs["recent_ratings"], [0, 0, 0])  # a 1 maps to 0
    np.testing.assert_allclose(obs["recent_items"], np.r_[np.zeros(6), EMBEDDINGS[3]])
    np.testing.assert_allclose(obs["profile"], EMBEDDINGS[3])  # nothing liked: all items
    assert obs["step_fraction"].tolist() == [0.0]
    step(core, state, 5)  # rated 1 or 5
    step(core, state, 4)
    obs = core.observation(state)
    first, second = (x.rating for x in state.episode)
    np.testing.assert_array_equal(obs["recent_mask"], [1, 1, 1])
    np.testing.assert_allclose(obs["recent_ratings"], [0.0, (first - 1) / 4, (second - 1) / 4])
    np.testing.assert_allclose(obs["recent_items"], np.r_[EMBEDDINGS[3], [1, -1, 0], EMBEDDINGS[4]])
    assert obs["step_fraction"].tolist() == [0.5]
    for key, value in obs.items():
        assert value.dtype == np.float32 and value.shape == core.observation_space[key].shape, key
    for _ in range(3):
        step(core, state, 4)  # masked steps count toward the fraction, capped at 1
    assert core.observation(state)["step_fraction"].tolist() == [1.0]


def test_observed_ratings_are_clipped_into_the_unit_interval(catalog):
    odd = {20: (Interaction(0, 0.5, 1), Interaction(1, 6.0, 2))}
    core = make_core(Scripted(catalog, histories=odd), obs_window=2)
    np.testing.assert_array_equal(core.observation(start(core, 20))["recent_ratings"], [0.0, 1.0])


def test_the_profile_is_the_normalised_mean_of_the_liked_items(rater):
    core = make_core(rater)
    r = 1 / np.sqrt(2)
    np.testing.assert_allclose(
        core.observation(start(core, 10))["profile"], [r, 0, r], rtol=1e-6
    )  # 5 and 4
    only_five = make_core(rater, like_threshold=5.0)
    np.testing.assert_allclose(only_five.observation(start(only_five, 10))["profile"], [1, 0, 0])
    np.testing.assert_array_equal(core.observation(start(core, 12))["profile"], np.zeros(3))
    obs = core.observation(start(core, 10))
    obs["profile"][:] = 9.0  # a copy: the next observation is unchanged
    np.testing.assert_allclose(core.observation(start(core, 10))["profile"], [r, 0, r], rtol=1e-6)
    data = core.user_data(10)
    assert data is core.user_data(10)  # computed once
    np.testing.assert_array_equal(data.rated, [True, True, True, False, False, False])


def test_observations_stack_per_key(rater):
    core = make_core(rater)
    states = [start(core, u) for u in (10, 11)]
    batch = core.observations(states)
    assert list(batch) == list(core.observation_space)
    for key in batch:
        np.testing.assert_array_equal(
            batch[key], np.stack([core.observation(s)[key] for s in states])
        )


# -- info and text ------------------------------------------------------------------------------
def test_info_after_reset_a_rated_and_a_masked_step(rater):
    core = make_core(rater)
    state = start(core, 10)
    info = core.info(state)
    assert "text" not in info
    probs = info.pop("rating_probs")
    assert probs.dtype == np.float64 and probs.shape == (5,) and np.isnan(probs).all()
    assert np.isnan(info.pop("expected_rating")) and np.isnan(info.pop("sampled_rating"))
    mask = info.pop("action_mask")
    assert mask.all() and mask is not state.allowed
    assert info == {
        "user_id": 10,
        "persona": 0,
        "step": 0,
        "item_index": -1,
        "item_id": -1,
        "title": "",
        "masked_action": False,
        "left": False,
    }
    step(core, state, 2)
    info = core.info(state, with_text=True)
    np.testing.assert_array_equal(info.pop("rating_probs"), PROBS[2])
    assert info.pop("text") == core.text(state)
    np.testing.assert_array_equal(info.pop("action_mask"), [True, True, False, True, True, True])
    assert info == {
        "user_id": 10,
        "persona": 0,
        "step": 1,
        "item_index": 2,
        "item_id": 3,
        "title": "Heat (1995)",
        "expected_rating": 3.5,
        "sampled_rating": state.last["sampled"],
        "masked_action": False,
        "left": False,
    }
    step(core, state, 2)
    info = core.info(state)
    assert info["masked_action"] is True and info["step"] == 2 and info["item_index"] == 2
    assert np.isnan(info["rating_probs"]).all() and np.isnan(info["expected_rating"])
    assert all(
        type(info[k]) is int for k in ("user_id", "persona", "step", "item_index", "item_id")
    )
    first = start(core, 12)
    step(core, first, 0)  # the first catalogue item is an item like any other
    info = core.info(first)
    assert (info["item_index"], info["item_id"], info["title"]) == (0, 1, "Toy Story (1995)")


def test_the_text_view(rater):
    core = make_core(rater, repeat_rule="terminate", leave_prob=1.0, leave_threshold=1.0)
    state = start(core, 10)
    assert core.text(state).split("\n") == [
        "User 10 (persona 0), step 0/20",
        "Profile: profile of 10",
        "Recently rated: GoldenEye (1995) 2; Heat (1995) 4",
    ]
    step(core, state, 3)  # a certain 5
    assert (
        core.text(state).split("\n")[-1]
        == "Last: recommended Casino (1995); rated 5 (expected 5.00)"
    )
    assert core.text(state).split("\n")[0] == "User 10 (persona 0), step 1/20"
    step(core, state, 3)
    assert core.text(state).split("\n")[-1] == (
        "Last: Casino (1995) was masked (already rated or shown): terminate"
    )
    state = start(core, 10)
    step(core, state, 1)  # a certain 1: the user leaves
    lines = core.text(state).split("\n")
    assert lines[-2:] == [
        "Last: recommended GoldenEye (1995); rated 1 (expected 1.00)",
        "The user left.",
    ]
    assert lines[2] == "Recently rated: Heat (1995) 4; GoldenEye (1995) 1"


# -- pickling and the simulator cache --------------------------------------------------------------
def test_pickling_keeps_the_config_and_the_injected_rater(rater):
    core = make_core(rater, obs_window=2)
    state = start(core, 10)
    clone = pickle.loads(pickle.dumps(core))
    assert (
        clone.config == core.config
        and isinstance(clone.rater, Scripted)
        and clone.rater is not rater
    )
    assert clone.user_ids == core.user_ids and clone.observation_space == core.observation_space
    for key, value in core.observation(state).items():
        np.testing.assert_array_equal(clone.observation(start(clone, 10))[key], value)


def test_the_slm_simulator_is_loaded_once_per_key(rater, tmp_path, monkeypatch):
    from persona_gym.simulator.simulator import UserSimulator

    (tmp_path / "manifest.json").write_text("{}")
    loads = []

    def fake_load(root, **kwargs):
        loads.append((Path(root), kwargs))
        return rater

    monkeypatch.setattr(UserSimulator, "load", staticmethod(fake_load))
    clear_simulator_cache()
    try:
        config = EnvConfig(
            artifacts=str(tmp_path),
            dataset="synthetic",
            leave_rule="threshold",
            mask_rated=False,
            variant="single-max",
            device="cpu",
            dtype="float32",
            base_model="tiny-base",
        )
        assert get_simulator(config) is rater and get_simulator(config) is rater
        assert loads == [
            (
                tmp_path,
                {
                    "variant": "single-max",
                    "base_model": "tiny-base",
                    "device": "cpu",
                    "dtype": "float32",
                    "compile": False,
                },
            )
        ]
        core = RecCore(config)  # no rater: the cached simulator
        assert core.rater is rater and len(loads) == 1
        assert pickle.loads(pickle.dumps(core)).rater is rater  # reloaded through the cache
        get_simulator(config.replace(variant="persona"))
        assert len(loads) == 2 and loads[-1][1]["variant"] == "persona"
        clear_simulator_cache()
        get_simulator(config)
        assert len(loads) == 3
        other = tmp_path / "other"  # another artifacts directory is another simulator
        other.mkdir()
        (other / "manifest.json").write_text("{}")
        get_simulator(config.replace(artifacts=str(other)))
        assert len(loads) == 4 and loads[-1][0] == other
    finally:
        clear_simulator_cache()


def test_the_served_backends_load_through_vllm_settings(rater, tmp_path, monkeypatch):
    from persona_gym.simulator import served

    (tmp_path / "manifest.json").write_text("{}")
    loads = []

    def fake_load_served(root, **kwargs):
        loads.append((Path(root), kwargs))
        return rater

    monkeypatch.setattr(served, "load_served", fake_load_served)
    clear_simulator_cache()
    try:
        config = EnvConfig(
            artifacts=str(tmp_path),
            dataset="synthetic",
            leave_rule="threshold",
            variant="persona",
            backend="vllm-server",
            server_url="http://127.0.0.1:9/v1",
            vllm_kv_cache_gb=1.5,
            dtype="float32",
            base_model="tiny",
        )
        assert get_simulator(config) is rater and get_simulator(config) is rater
        ((root, kwargs),) = loads
        assert root == tmp_path and kwargs.pop("settings") == served.VLLMSettings(
            url="http://127.0.0.1:9/v1", kv_cache_gb=1.5
        )
        assert kwargs == {
            "backend": "vllm-server",
            "variant": "persona",
            "base_model": "tiny",
            "dtype": "float32",
        }
        get_simulator(
            config.replace(backend="vllm", server_url=None, vllm_kv_cache_gb=3.0, dtype="bfloat16")
        )
        assert (
            len(loads) == 2
            and loads[1][1]["backend"] == "vllm"
            and loads[1][1]["dtype"] == "bfloat16"
        )
        assert loads[1][1]["settings"] == served.VLLMSettings(url=None, kv_cache_gb=3.0)
        get_simulator(config.replace(vllm_kv_cache_gb=2.5))  # each setting is part of the key
        get_simulator(config.replace(server_url="http://127.0.0.1:10/v1"))
        assert len(loads) == 4
        import persona_gym.assets

        asked = []
        monkeypatch.setattr(
            persona_gym.assets,
            "resolve_dtype",
            lambda dtype, device: asked.append((dtype, device)) or "resolved",
        )
        get_simulator(config.replace(dtype="auto"))
        assert asked == [("auto", "cpu")] and loads[-1][1]["dtype"] == "resolved"
    finally:
        clear_simulator_cache()
