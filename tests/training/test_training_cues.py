"""Training with the collaborative signal: cues in the prompt, CF item tokens, the logit prior."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from persona_gym.artifacts import load_tables
from persona_gym.simulator.collaborative import CF_FILE, fit_collaborative
from persona_gym.simulator.prompts import PromptConfig
from persona_gym.simulator.rating_prior import PRIOR_FILE, RatingPrior, load_rating_prior


def test_prior_is_a_gaussian_around_the_prediction():
    prior = RatingPrior(precision=0.5)
    logits = prior(torch.zeros(2, 5), torch.tensor([1.0, 4.2]), torch.zeros(2))
    assert logits.argmax(-1).tolist() == [0, 3]
    expected = -0.5 * (torch.arange(1, 6) - 4.2) ** 2
    torch.testing.assert_close(logits[1], expected)


def test_prior_centre_moves_with_the_window_surprise(tmp_path):
    from persona_gym.simulator.rating_prior import PRIOR_FILE, load_rating_prior

    prior = RatingPrior(precision=0.5)
    with torch.no_grad():
        prior.memory.fill_(0.25)
    logits = prior(torch.zeros(2, 5), torch.tensor([3.0, 3.0]), torch.tensor([0.0, 2.0]))
    torch.testing.assert_close(logits[1], -0.5 * (torch.arange(1, 6) - 3.5) ** 2)
    assert logits[0].argmax() == 2 and logits[1][2] == logits[1][3]  # 3.5: halfway between 3 and 4
    prior.save(tmp_path)
    assert load_rating_prior(tmp_path).memory.item() == 0.25
    # a prior saved before the memory term loads with none
    state = torch.load(tmp_path / PRIOR_FILE, weights_only=True)
    del state["memory"]
    torch.save(state, tmp_path / PRIOR_FILE)
    assert load_rating_prior(tmp_path).memory.item() == 0.0


@pytest.fixture(scope="module")
def cued_artifacts(tmp_path_factory, trained_tiny_artifacts, tiny_base):
    from training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("cued") / "art"
    shutil.copytree(
        trained_tiny_artifacts,
        root,
        ignore=shutil.ignore_patterns("adapters", "checkpoints", "cache", "manifest.json"),
    )
    catalog, _, memories, _ = load_tables(root)
    fit_collaborative(
        memories[["user_id", "item_id", "rating", "timestamp"]],
        pd.DataFrame(columns=["user_id", "item_id", "rating", "timestamp"]),
        catalog,
        seed=0,
    ).save(root / CF_FILE)
    prompt = PromptConfig.paper(
        window_size=2,
        n_memories=1,
        max_tokens=256,
        item_tokens=True,
        cf_cue=True,
        surprise_cue=True,
        cf_items=True,
        cf_prior=True,
    )
    config = TrainConfig(
        base_model=tiny_base,
        variants=("persona",),
        rank=4,
        alpha=8,
        lora_layers=2,
        epochs=1,
        batch_examples=4,
        blocks_per_sequence=2,
        max_examples_per_user=0,
        val_per_user=1,
        eval_every=2,
        checkpoint_every=100,
        prompt=prompt,
    )
    train(root, config, progress=False)
    return root


def test_adapters_carry_their_prior_and_item_tokens(cued_artifacts):
    for name in ("persona-0", "persona-1"):
        folder = cued_artifacts / "adapters" / name
        assert (folder / PRIOR_FILE).exists() and (folder / "item_tokens.pt").exists()
        prior = load_rating_prior(folder)
        assert prior.log_precision.item() != pytest.approx(np.log(0.5))  # it was trained


def test_simulator_applies_the_prior(cued_artifacts, tiny_base, tmp_path):
    import shutil

    from persona_gym.artifacts import rehash
    from persona_gym.simulator.rating_prior import PRIOR_FILE
    from persona_gym.simulator.simulator import UserSimulator

    # a sharp saved prior (sd 0.2) must dominate the tiny random SLM's nearly flat logits
    root = tmp_path / "art"
    shutil.copytree(cued_artifacts, root)
    for path in (root / "adapters").glob(f"*/{PRIOR_FILE}"):
        state = torch.load(path, weights_only=True)
        state["log_precision"] = torch.tensor(12.5).log()
        torch.save(state, path)
    rehash(root)
    sim = UserSimulator.load(root, base_model=tiny_base, dtype="float32")
    user = sim.user_ids[0]
    window = sim.history(user)[-2:]
    probs = sim.rate([user] * 6, list(range(6)), [window] * 6)
    assert probs.shape == (6, 5) and np.allclose(probs.sum(1), 1)
    requests = [sim.request(user, c, window) for c in range(6)]
    memory = load_rating_prior(root / "adapters" / requests[0].adapter).memory.item()
    centre = np.array([r.cf_prediction + memory * r.surprise for r in requests])
    np.testing.assert_array_equal(probs.argmax(1), np.clip(np.rint(centre), 1, 5) - 1)


def test_missing_prior_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="retrain with `persona-gym train`"):
        load_rating_prior(tmp_path)


def test_evaluate_reports_studies_and_the_prior_alone(cued_artifacts, tmp_path):
    from persona_gym.artifacts import rehash
    from tests.training.test_evaluate import held_out_artifacts
    from training.evaluate import evaluate, render_markdown

    root, test = held_out_artifacts(cued_artifacts, tmp_path / "art")
    rehash(root)  # the memories changed on purpose
    results = evaluate(
        root, ["persona:Ms+Ml"], test=test, dtype="float32", write=False, study_rows_per_user=2
    )
    prior = results["baselines"]["collaborative prior alone (no SLM)"]
    assert prior["evaluated_rows"]["n"] == len(test)
    studies = results["studies"]
    assert (
        studies["persona_specificity"]["users"] == 4
        and studies["persona_specificity"]["personas"] == 2
    )
    assert studies["memory"]["simulated_rows"] > 0
    assert studies["landscape"] == {}  # the tiny users rated every movie: no unseen ones
    sequential = studies["sequential"]  # the rolling-window study, in the shape the report reads
    assert sequential["n"] == len(test)
    for row in ("real", "simulator", "prior", "mf"):
        for effect in ("mood", "similarity", "text_similarity"):
            cell = sequential[row][effect]
            assert set(cell) == {"slope", "low", "high"} and cell["low"] <= cell["high"]
    assert set(sequential["rmse_rolling"]) == {"simulator", "prior", "mf", "simulator_minus_prior"}
    for row in ("simulator", "prior", "mf"):  # ratios to real, from the same bootstrap draws
        assert set(sequential["ratio"][row]) == {"mood", "similarity", "text_similarity"}
        assert set(sequential["ratio"][row]["mood"]) == {"ratio", "low", "high"}
    text = render_markdown(results)
    assert "Persona specificity" in text and "collaborative prior alone" in text
    assert "## Sequential fidelity" in text


def test_fit_rating_prior_recovers_the_generating_prior():
    from persona_gym.simulator.rating_prior import fit_rating_prior

    true = RatingPrior(precision=1.5)
    with torch.no_grad():
        true.memory.fill_(0.4)
        true.bias.copy_(torch.tensor([0.3, -0.2, 0.0, 0.1, 0.2]))
    gen = torch.Generator().manual_seed(0)
    predictions = 1 + 4 * torch.rand(20_000, generator=gen)
    surprises = torch.randn(20_000, generator=gen)
    with torch.no_grad():
        probs = true(torch.zeros(20_000, 5), predictions, surprises).softmax(-1)
    ratings = torch.multinomial(probs, 1, generator=gen).squeeze(1) + 1
    fitted = fit_rating_prior(predictions, surprises, ratings)
    assert fitted.log_precision.exp().item() == pytest.approx(1.5, rel=0.05)
    assert fitted.memory.item() == pytest.approx(0.4, abs=0.03)
    # the biases are identified up to a constant
    torch.testing.assert_close(
        fitted.bias - fitted.bias.mean(), true.bias - true.bias.mean(), atol=0.05, rtol=0
    )
    again = fit_rating_prior(predictions, surprises, ratings)
    assert torch.equal(again.memory, fitted.memory)
    with pytest.raises(ValueError, match="1..5"):
        fit_rating_prior(predictions[:2], surprises[:2], [0, 3])


def test_persona_taste_moves_the_cues_toward_the_rating_adapters_persona(
    cued_artifacts, tiny_base, tmp_path
):
    import json

    from persona_gym.artifacts import load_artifacts, rehash
    from persona_gym.simulator.collaborative import load_collaborative, persona_tastes
    from persona_gym.simulator.simulator import UserSimulator
    from training.examples import build_examples

    root = tmp_path / "art"
    shutil.copytree(cued_artifacts, root)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["prompt"]["persona_taste"] = 0.5
    (root / "manifest.json").write_text(json.dumps(manifest))
    rehash(root)
    artifacts = load_artifacts(root)
    cf = load_collaborative(root / CF_FILE)
    tastes = persona_tastes(cf, artifacts.user_persona, artifacts.training_user_ids)
    assert not np.allclose(tastes[0], tastes[1])
    user = artifacts.training_user_ids[0]
    mine = artifacts.user_persona[user]
    for variant, persona in (("persona", mine), (f"persona-{1 - mine}", 1 - mine)):
        sim = UserSimulator.load(root, variant=variant, base_model=tiny_base, dtype="float32")
        request = sim.request(user, 3)
        own = cf.user_factors[cf.user_rows([user])[0]]
        axis = (tastes[0] - tastes[1]) / np.linalg.norm(
            tastes[0] - tastes[1]
        )  # two personas: one axis
        expected = cf.predict([user], [3], own - 0.5 * ((own - tastes[persona]) @ axis) * axis)
        assert request.cf_prediction == pytest.approx(float(expected[0]))
    assert artifacts.taste(user, "single-max") is None  # an adapter of no persona: the user's own
    # the training examples show the same moved cues (their out-of-fold predictions moved alike)
    from persona_gym.simulator.retrieval import MemoryIndex
    from training.train import TrainConfig

    config = TrainConfig(
        base_model=tiny_base, variants=("persona",), prompt=artifacts.prompt_config
    )
    index = MemoryIndex(artifacts.memories, artifacts.item_embeddings)
    moved = {user: artifacts.taste(user, f"persona-{mine}")}
    plain = build_examples({user: artifacts.profiles[user]}, artifacts.memories, index, config, cf)
    shown = build_examples(
        {user: artifacts.profiles[user]}, artifacts.memories, index, config, cf, moved
    )
    item = shown[0].request.candidate
    assert shown[0].request.cf_prediction == pytest.approx(
        float(cf.predict([user], [item], moved[user])[0])
    )
    assert [e.request.cf_prediction for e in shown] != [e.request.cf_prediction for e in plain]
    with pytest.raises(ValueError, match="--variants persona"):
        TrainConfig(variants=("persona", "single-max"), prompt=artifacts.prompt_config)
    with pytest.raises(ValueError, match="persona_taste"):
        PromptConfig.paper(persona_taste=1.5, cf_cue=True)
    with pytest.raises(ValueError, match="needs cf_cue"):
        PromptConfig.paper(persona_taste=0.5)
