"""The sequence user model (persona_gym.simulator.sequence) on the tiny random SmolLM2-layout
model: exact cached scoring, window semantics, tokens per rating, its training and install;
the prior-only rater on the same artifacts; both behind gym.make with the same policy code."""

from __future__ import annotations

import dataclasses
import shutil

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest
import torch

import persona_gym  # noqa: F401  (registers the ids)
from persona_gym.artifacts import load_tables
from persona_gym.simulator.collaborative import CF_FILE, fit_collaborative
from persona_gym.simulator.memory import Interaction
from persona_gym.simulator.sequence import TOKENS_FILE, SequenceTokens
from training.sequence_training import SequenceTrainConfig, train_sequence

TINY = SequenceTrainConfig(
    history=2,
    window=2,
    targets_per_user=3,
    rank=4,
    alpha=8,
    epochs=1,
    batch=2,
    eval_every=1,
    val_per_user=1,
    other_users=False,
)


def write_sequence_artifacts(source, root, base_model: str):
    """The tables and personas of artifacts ``source`` as ``distill`` and ``personas`` leave them
    (no manifest, no adapters) copied to ``root``, a collaborative model fitted on them, then
    the sequence adapters trained on ``base_model``."""
    shutil.copytree(
        source,
        root,
        ignore=shutil.ignore_patterns("cache", "checkpoints", "adapters", "manifest.json"),
    )
    catalog, _, memories, _ = load_tables(root)
    columns = ["user_id", "item_id", "rating", "timestamp"]
    fit_collaborative(memories[columns], pd.DataFrame(columns=columns), catalog, seed=0).save(
        root / CF_FILE
    )
    train_sequence(root, TINY, base_model)
    return root


@pytest.fixture(scope="module")
def seq_artifacts(tmp_path_factory, trained_tiny_artifacts, tiny_base):
    return write_sequence_artifacts(
        trained_tiny_artifacts, tmp_path_factory.mktemp("sequence") / "art", tiny_base
    )


@pytest.fixture(scope="module")
def simulator(seq_artifacts, tiny_base):
    from persona_gym.simulator.simulator import UserSimulator

    return UserSimulator.load(seq_artifacts, base_model=tiny_base, dtype="float32")


@pytest.fixture(scope="module")
def lora_lm(simulator, tiny_base):
    """The LM with the LoRA adapters unmerged (peft), apart from the engine's merged copies."""
    from persona_gym.simulator.sequence import SequenceLM
    from persona_gym.simulator.simulator import load_model

    artifacts = simulator.artifacts
    peft_model, tokenizer = load_model(
        artifacts, artifacts.adapter_dirs, tiny_base, dtype="float32"
    )
    return SequenceLM(peft_model, tokenizer)


def _full_forward(sim, lm, user, candidate, window) -> np.ndarray:
    """The rating distribution from ONE forward pass over prefix + block, through the unmerged
    LoRA adapter (no cache, no merged weights)."""
    model = sim.model
    request = sim.request(user, candidate, window)
    prefix, block = model.embeddings(request)
    lm.model.set_adapter(request.adapter)
    with torch.no_grad():
        hidden = lm.body(inputs_embeds=torch.cat([prefix, block])[None]).last_hidden_state
        logits = lm.logits(hidden[0, -1:])
        prediction = torch.tensor(request.cf_prediction, dtype=torch.float32)[None]
        logits = model.combine(request.adapter, logits, prediction, torch.tensor([request.gap]))
    return logits.softmax(-1).double().numpy()[0]


def test_the_artifacts_are_sequence_users(seq_artifacts, simulator):
    from persona_gym.artifacts import load_artifacts

    config = load_artifacts(seq_artifacts).prompt_config
    assert (config.layout, config.history, config.window_size) == ("sequence", 2, 2)
    assert type(simulator.model).__name__ == "SequenceRatingModel"
    assert sorted(simulator.model.adapters) == ["persona-0", "persona-1"]


def test_cached_scores_equal_one_full_forward(simulator, lora_lm):
    user = simulator.user_ids[0]
    history = simulator.history(user)
    episode = (Interaction(history[0].item_index, 5.0, history[-1].timestamp + 1),)
    windows = [(), history[-1:], history[-2:], history[-1:] + episode, episode]
    users = [user] * len(windows)
    candidates = [history[0].item_index] * len(windows)
    probs = simulator.rate(users, candidates, windows)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    for row, window in enumerate(windows):
        np.testing.assert_allclose(
            probs[row], _full_forward(simulator, lora_lm, user, candidates[row], window), atol=1e-5
        )
    one_by_one = np.vstack(
        [simulator.rate([u], [c], [w]) for u, c, w in zip(users, candidates, windows, strict=True)]
    )
    np.testing.assert_allclose(probs, one_by_one, atol=1e-5)


def test_users_of_every_persona_in_one_call_get_their_own_adapter(simulator, lora_lm):
    users = simulator.user_ids[:8]
    candidates = [simulator.history(u)[0].item_index for u in users]
    windows = [simulator.history(u)[-2:] for u in users]
    adapters = {
        simulator.request(u, c, w).adapter
        for u, c, w in zip(users, candidates, windows, strict=True)
    }
    assert adapters == {"persona-0", "persona-1"}  # the batch mixes both personas
    model = simulator.model
    model._prefixes.clear()
    before = model.tokens_processed
    probs = simulator.rate(users, candidates, windows)
    for row, user in enumerate(users):
        expected = _full_forward(simulator, lora_lm, user, candidates[row], windows[row])
        np.testing.assert_allclose(probs[row], expected, atol=1e-5)
    # each user's prefix and block once (history=2, window=2: 2 * 2 + 1 block tokens)
    prefix = len(model.prefix_embeddings(users[0], simulator.request(users[0], 0, ()).adapter))
    assert model.tokens_processed - before == len(users) * (prefix + 2 * 2 + 1)


def test_the_prefix_is_the_logged_history_before_the_first_window(simulator):
    user = simulator.user_ids[1]
    history = simulator.history(user)
    model = simulator.model
    assert model.prefix_events(user) == history[-4:-2]  # history=2, window=2
    # at an episode's start prefix + window is the user's contiguous logged tail
    request = simulator.request(user, 0, history[-2:])
    prefix, block = model.embeddings(request)
    assert len(prefix) == len(model.head) + 4 and len(block) == 2 * 2 + 1


def test_the_window_moves_the_rating(simulator):
    user = simulator.user_ids[0]
    last = simulator.history(user)[-1].timestamp
    loved = tuple(Interaction(i, 5.0, last + 1 + i) for i in range(2))
    hated = tuple(Interaction(i, 1.0, last + 1 + i) for i in range(2))
    probs = simulator.rate([user, user], [3, 3], [loved, hated])
    assert np.abs(probs[0] - probs[1]).max() > 1e-4


def test_a_rating_costs_two_tokens_per_window_event_plus_one(simulator):
    model = simulator.model
    user = simulator.user_ids[2]
    simulator.rate([user], [0], [()])  # the prefix is now cached
    window = (Interaction(1, 4.0, 10**9), Interaction(2, 2.0, 10**9 + 1))
    before = model.tokens_processed
    simulator.rate([user], [0], [window])
    assert model.tokens_processed - before == 2 * len(window) + 1


def test_training_records_each_adapter_and_resumes(seq_artifacts, tiny_base, caplog):
    import json

    for name in ("persona-0", "persona-1"):
        folder = seq_artifacts / "adapters" / name
        record = json.loads((folder / "training.json").read_text())
        assert record["config"] == dataclasses.asdict(TINY)
        assert record["best"]["rmse"] <= record["history"][0]["rmse"]
        assert {"nll", "rmse"} <= set(record["prior_alone"])
        assert (folder / TOKENS_FILE).exists()
    with caplog.at_level("INFO"):
        train_sequence(seq_artifacts, TINY, tiny_base)
    assert caplog.text.count("already trained with this config") == 2


def test_missing_tokens_file_names_the_fix(seq_artifacts, tmp_path):
    folder = tmp_path / "persona-0"
    shutil.copytree(seq_artifacts / "adapters" / "persona-0", folder)
    (folder / TOKENS_FILE).unlink()
    with pytest.raises(
        FileNotFoundError, match="retrain it with `persona-gym train --preset sequence`"
    ):
        SequenceTokens.load(folder, np.zeros((6, 3)))


def test_tokens_of_an_older_trainer_name_the_fix(seq_artifacts, tmp_path):
    from persona_gym.artifacts import ArtifactsError

    folder = tmp_path / "persona-0"
    shutil.copytree(seq_artifacts / "adapters" / "persona-0", folder)
    state = torch.load(folder / TOKENS_FILE, weights_only=True)
    del state["gap.weight"]  # the tokens before the candidate's gap existed
    torch.save(state, folder / TOKENS_FILE)
    features = load_tables(seq_artifacts)[3]
    with pytest.raises(ArtifactsError, match=r"lacks \['gap.weight'\].*--preset sequence"):
        SequenceTokens.load(folder, features)


def test_tokens_from_before_the_gap_scale_keep_the_slm_part_whole(seq_artifacts, tmp_path):
    folder = tmp_path / "persona-0"
    shutil.copytree(seq_artifacts / "adapters" / "persona-0", folder)
    state = torch.load(folder / TOKENS_FILE, weights_only=True)
    del state["scale"]
    torch.save(state, folder / TOKENS_FILE)
    features = np.random.default_rng(0).normal(size=(6, state["item.weight"].shape[1]))
    tokens = SequenceTokens.load(folder, features)
    assert torch.equal(tokens.scale.detach(), torch.ones_like(tokens.scale))


# -- the prior-only rater ---------------------------------------------------------------------
def test_prior_rater_is_the_fitted_prior_formula(seq_artifacts):
    from persona_gym.simulator.prior_rater import PriorRater

    rater = PriorRater.load(seq_artifacts)
    user = rater.user_ids[0]
    last = rater.history(user)[-1].timestamp
    window = (Interaction(1, 5.0, last + 1), Interaction(2, 4.0, last + 2))
    probs = rater.rate([user, user], [3, 3], [(), window])
    np.testing.assert_allclose(probs.sum(1), 1.0)
    prior = rater.priors[rater.adapter_of(user)]
    prediction = torch.tensor(rater._predict(np.array([user]), np.array([3])), dtype=torch.float32)
    residual = np.array([5.0, 4.0]) - rater._predict(np.array([user, user]), np.array([1, 2]))
    surprise = torch.tensor([residual.mean()], dtype=torch.float32)
    with torch.no_grad():
        expected = prior(torch.zeros(1, 5), prediction, surprise).softmax(-1).numpy()[0]
    np.testing.assert_allclose(probs[1], expected, atol=1e-5)
    with pytest.raises(KeyError, match="not a simulated user"):
        rater.rate([10**6], [0], [()])


def _run_policy(env, steps: int = 4) -> list[float]:
    """A policy written once for every rater: the first allowed item of the action mask."""
    _, info = env.reset(seed=0)
    rewards = []
    for _ in range(steps):
        action = int(np.flatnonzero(info["action_mask"])[0])
        _, reward, terminated, truncated, info = env.step(action)
        rewards.append(float(reward))
        if terminated or truncated:
            _, info = env.reset()
    return rewards


@pytest.mark.parametrize("rater", ["slm", "prior"])
def test_the_same_policy_code_runs_on_both_raters(seq_artifacts, tiny_base, rater):
    env = gym.make(
        "PersonaML100K-v0",
        artifacts=str(seq_artifacts),
        base_model=tiny_base,
        dataset="synthetic",
        dtype="float32",
        mask_rated=False,
        leave_rule="threshold",
        leave_prob=0.0,
        rater=rater,
    )
    rewards = _run_policy(env)
    assert len(rewards) == 4 and all(1.0 <= r <= 5.0 for r in rewards)
    vector = gym.make_vec(
        "PersonaML100K-v0",
        num_envs=2,
        artifacts=str(seq_artifacts),
        base_model=tiny_base,
        dataset="synthetic",
        dtype="float32",
        mask_rated=False,
        leave_rule="threshold",
        leave_prob=0.0,
        rater=rater,
    )
    vector.reset(seed=0)
    _, reward, *_ = vector.step(np.array([0, 1]))
    assert reward.shape == (2,)


def test_an_unknown_rater_name_is_refused():
    from persona_gym.envs import load_env_config

    with pytest.raises(ValueError, match="EnvConfig.rater must be one of"):
        load_env_config("ml100k", rater="table")


def test_candidates_ranked_in_one_state_share_its_window(simulator):
    model = simulator.model
    user = simulator.user_ids[3]
    simulator.rate([user], [0], [()])  # the prefix is now cached
    window = (Interaction(1, 4.0, 10**9), Interaction(2, 2.0, 10**9 + 1))
    before = model.tokens_processed
    ranked = simulator.rate([user] * 4, [0, 3, 4, 5], [window] * 4)
    assert model.tokens_processed - before == 2 * len(window) + 4
    alone = np.vstack([simulator.rate([user], [c], [window]) for c in (0, 3, 4, 5)])
    np.testing.assert_allclose(ranked, alone, atol=1e-5)


def test_training_reads_a_user_as_the_engine_does(simulator, lora_lm):
    """The trainer's layout (prefix, then a block of window + target on its keys/values) gives
    the engine's logits for the same user, window, candidate and gap between them (the
    candidate's cue: gap and the window's surprise); the gap changes them."""
    from persona_gym.simulator.sequence import UserSequence
    from training.sequence_training import BlockExample, block_logits

    model = simulator.model
    user = simulator.user_ids[0]
    history = simulator.history(user)
    window, candidate = history[:2], history[-1]
    request = simulator.request(user, candidate.item_index, window)
    events = model.prefix_events(user)
    prefix = model.user_sequence(user, request.adapter, events)
    block = UserSequence.of(
        (*window, candidate),
        model.predictions(user, request.adapter, [x.item_index for x in (*window, candidate)]),
    )
    tokens = model.tokens[request.adapter]
    trained = [p.detach().clone() for p in (tokens.gap.weight, tokens.surprise)]
    lora_lm.model.set_adapter(request.adapter)
    found = {}
    try:
        with torch.no_grad():  # cues the trained tiny model may have left at zero
            tokens.gap.weight.normal_(generator=torch.Generator().manual_seed(0))
            tokens.surprise.normal_(generator=torch.Generator().manual_seed(1))
            for gap in (0, 5):
                example = BlockExample(prefix, [block], [gap])
                logits, ratings, predictions, gaps = block_logits(lora_lm, tokens, [example], False)
                assert gaps.tolist() == [gap]
                logits = model.combine(request.adapter, logits, predictions, gaps)
                found[gap] = simulator.rate([user], [candidate.item_index], [window], gaps=[gap])[0]
                assert int(ratings[0]) == round(candidate.rating)
                np.testing.assert_allclose(logits.softmax(-1).numpy()[0], found[gap], atol=1e-5)
    finally:
        with torch.no_grad():
            tokens.gap.weight.copy_(trained[0])
            tokens.surprise.copy_(trained[1])
    assert np.abs(found[0] - found[5]).max() > 1e-3


def test_training_sequences_get_blocked_out_of_fold_predictions_and_a_persona(seq_artifacts):
    """The training and other users' sequences: time-ordered, each other user under one of the
    personas, and a rating's prediction never sees the stretch of the sequence around it
    (changing a rating leaves the predictions of its stretch unchanged, not the others')."""
    from training.sequence_training import SequenceInputs, training_sequences

    inputs = SequenceInputs.load(seq_artifacts)
    memories = inputs.memories[["user_id", "item_id", "rating", "timestamp"]]
    half = inputs.users[: len(inputs.users) // 2]  # the rest play the other users
    inputs = dataclasses.replace(inputs, users=half)
    train = memories[memories["user_id"].isin(half)]
    background = memories[~memories["user_id"].isin(half)].reset_index(drop=True)
    own, others = training_sequences(inputs, train, background, folds=5)
    assert set(own) == set(half)
    assert set(others) == set(background["user_id"])
    assert {persona for _, persona in others.values()} <= set(inputs.user_persona.values())
    user = int(background["user_id"].iloc[0])
    seq, _ = others[user]
    rows = background[background["user_id"] == user].sort_values(["timestamp", "item_id"])
    assert len(seq) == len(rows)
    assert np.all((seq.predictions >= 1) & (seq.predictions <= 5))
    first = int(rows.index[0])
    changed = background.copy()
    changed.loc[first, "rating"] = 6 - changed.loc[first, "rating"]
    again, _ = training_sequences(inputs, train, changed, folds=5)[1][user]
    stretch = len(seq) // 5  # the first stretch: the changed rating and the ones after it
    np.testing.assert_array_equal(again.predictions[:stretch], seq.predictions[:stretch])
    assert not np.array_equal(again.predictions[stretch:], seq.predictions[stretch:])
    training_user = half[0]
    assert len(own[training_user]) == int((train["user_id"] == training_user).sum())


def test_agents_take_the_prior_rater_by_name(seq_artifacts, tiny_base, tmp_path):
    """`--env-kwargs rater=prior` reaches the env config in `train-agent` and `evaluate-policy`
    (the name is not a Rater object)."""
    import pandas as pd

    from agents.evaluate import load_evaluation
    from agents.train import AgentConfig, train_agent

    kwargs = dict(
        artifacts=str(seq_artifacts),
        base_model=tiny_base,
        dataset="synthetic",
        mask_rated=False,
        leave_rule="threshold",
        leave_prob=0.0,
        rater="prior",
    )
    ratings = pd.read_parquet(seq_artifacts / "memories.parquet")[["user_id", "item_id", "rating"]]
    config = AgentConfig(
        policy="items",
        timesteps=8,
        n_envs=2,
        n_steps=4,
        batch_size=4,
        out=str(tmp_path),
        dtype="float32",
        env_kwargs=kwargs,
    )
    run_dir = train_agent(config, progress=False, ratings=ratings)
    assert (run_dir / "model.zip").is_file()
    # evaluate-policy's loader builds the prior rater, then wants the logged split these
    # synthetic artifacts do not record
    with pytest.raises(ValueError, match="split.json lacks"):
        load_evaluation("PersonaML100K-v0", "float32", **kwargs)
