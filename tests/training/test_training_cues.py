"""Training with the collaborative signal: cues in the prompt, CF item tokens, the logit prior."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from persona_gym.artifacts import load_tables
from persona_gym.collaborative import CF_FILE, fit_collaborative
from persona_gym.simulator.prior import PRIOR_FILE, RatingPrior, load_rating_prior
from persona_gym.simulator.prompts import PromptConfig


def test_prior_is_a_gaussian_around_the_prediction():
    prior = RatingPrior(precision=0.5)
    logits = prior(torch.zeros(2, 5), torch.tensor([1.0, 4.2]))
    assert logits.argmax(-1).tolist() == [0, 3]
    expected = -0.5 * (torch.arange(1, 6) - 4.2) ** 2
    torch.testing.assert_close(logits[1], expected)


@pytest.fixture(scope="module")
def cued_artifacts(tmp_path_factory, trained_tiny_artifacts, tiny_base):
    from training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("cued") / "art"
    shutil.copytree(trained_tiny_artifacts, root, ignore=shutil.ignore_patterns("adapters", "checkpoints",
                                                                                 "cache", "manifest.json"))
    catalog, _, memories, _ = load_tables(root)
    fit_collaborative(memories[["user_id", "item_id", "rating", "timestamp"]], pd.DataFrame(
        columns=["user_id", "item_id", "rating", "timestamp"]), catalog, seed=0).save(root / CF_FILE)
    prompt = PromptConfig(window_size=2, n_memories=1, max_tokens=256, item_tokens=True, cf_cue=True,
                          surprise_cue=True, cf_items=True, cf_prior=True)
    config = TrainConfig(base_model=tiny_base, variants=("persona",), rank=4, alpha=8, lora_layers=2,
                         epochs=1, batch_examples=4, blocks_per_sequence=2, max_examples_per_user=0,
                         val_per_user=1, eval_every=2, checkpoint_every=100, prompt=prompt)
    train(root, config, progress=False)
    return root


def test_adapters_carry_their_prior_and_item_tokens(cued_artifacts):
    for name in ("persona-0", "persona-1"):
        folder = cued_artifacts / "adapters" / name
        assert (folder / PRIOR_FILE).exists() and (folder / "item_tokens.pt").exists()
        prior = load_rating_prior(folder)
        assert prior.log_precision.item() != pytest.approx(np.log(0.5))  # it was trained


def test_simulator_applies_the_prior(cued_artifacts, tiny_base):
    from persona_gym.simulator.simulator import UserSimulator

    sim = UserSimulator.load(cued_artifacts, base_model=tiny_base, dtype="float32")
    user = sim.user_ids[0]
    probs = sim.rate([user] * 3, [0, 1, 2], [sim.history(user)[-2:]] * 3)
    assert probs.shape == (3, 5) and np.allclose(probs.sum(1), 1)
    predicted = [sim.request(user, c, sim.history(user)[-2:]).cf_prediction for c in (0, 1, 2)]
    # the tiny random SLM is nearly flat: the prior pulls the expected rating toward the prediction
    expected = probs @ np.arange(1, 6)
    assert np.corrcoef(expected, predicted)[0, 1] > 0.9 or np.ptp(predicted) < 0.05


def test_missing_prior_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="--cf-prior"):
        load_rating_prior(tmp_path)


def test_evaluate_reports_studies_and_the_prior_alone(cued_artifacts, tmp_path):
    from persona_gym.artifacts import rehash
    from tests.training.test_evaluate import _held_out_artifacts
    from training.evaluate import evaluate, render_markdown

    root, test = _held_out_artifacts(cued_artifacts, tmp_path / "art")
    rehash(root)  # the memories changed on purpose
    results = evaluate(root, ["persona:Ms+Ml"], test=test, dtype="float32", write=False,
                       study_rows_per_user=2)
    prior = results["baselines"]["collaborative prior alone (no SLM)"]
    assert prior["evaluated_rows"]["n"] == len(test)
    studies = results["studies"]
    assert studies["persona_specificity"]["users"] == 4 and studies["persona_specificity"]["personas"] == 2
    assert studies["memory"]["simulated_rows"] > 0
    assert studies["landscape"] == {}  # the tiny users rated every movie: no unseen ones
    text = render_markdown(results)
    assert "Persona specificity" in text and "collaborative prior alone" in text
