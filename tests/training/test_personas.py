"""Personas: elbow choice of K, KMeans++ determinism, cards."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from training.personas import (
    PersonaConfig,
    cluster_profiles,
    distinctive_words,
    elbow_k,
    persona_cards,
)


def _blobs(k: int, per: int = 30, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)) * 5.0
    labels = np.repeat(np.arange(k), per)
    return centres[labels] + rng.normal(scale=0.3, size=(k * per, dim)), labels


@pytest.mark.parametrize("k", [3, 4, 6])
def test_elbow_finds_the_true_k_on_clustered_data(k: int) -> None:
    x, truth = _blobs(k)
    result = cluster_profiles(x, PersonaConfig(k=None, k_min=2, k_max=10, seed=0))
    assert result.k == k
    assert set(result.inertias) == set(result.silhouettes) == set(range(2, 11))
    assert max(result.silhouettes, key=lambda j: result.silhouettes[j]) == k
    # same partition as the truth, up to label names
    pairs = set(zip(truth.tolist(), result.labels.tolist(), strict=True))
    assert len(pairs) == k
    assert "chord" in result.rule


def test_elbow_rule_on_a_hand_made_curve() -> None:
    assert elbow_k([1, 2, 3, 4, 5], [100, 30, 20, 15, 12]) == 2
    assert elbow_k([2, 3, 4, 5, 6], [10, 9, 8, 7, 6]) == 2  # a straight line: ties -> smallest K
    assert elbow_k([2, 3], [5, 1]) == 2


def test_elbow_can_pick_two_when_the_range_starts_at_one() -> None:
    x, _ = _blobs(2)
    result = cluster_profiles(x, PersonaConfig(k=None, k_min=1, k_max=8))
    assert result.k == 2 and result.silhouettes[1] is None


def test_fixed_k_and_determinism() -> None:
    x, _ = _blobs(3, seed=1)
    a = cluster_profiles(x, PersonaConfig(k=5, seed=3))
    b = cluster_profiles(x, PersonaConfig(k=5, seed=3))
    assert a.k == 5 and a.rule == "fixed" and np.array_equal(a.labels, b.labels)
    with pytest.raises(ValueError, match="k_min"):
        PersonaConfig(k=None, k_min=5, k_max=3)
    with pytest.raises(ValueError, match="k_min"):
        PersonaConfig(k=None, k_min=0, k_max=3)


def test_cards_describe_each_cluster() -> None:
    texts = ["PERSONA: You love horror and gore 4.5."] * 3 + ["PERSONA: You love romance 3.2."] * 3
    labels = np.array([0, 0, 0, 1, 1, 1])
    words = distinctive_words(texts, labels, n_words=3)
    assert words[0][0]["word"] in {"horror", "gore"} and words[1][0]["word"] == "romance"
    assert not any(w["word"].isdigit() for ws in words.values() for w in ws)
    items = pd.DataFrame({"item_id": [1, 2], "genres": [("Horror",), ("Romance",)]})
    memories = pd.DataFrame(
        {
            "user_id": [10, 11, 12, 13, 14, 15],
            "item_id": [1, 1, 1, 2, 2, 2],
            "rating": [5.0, 4.0, 5.0, 2.0, 3.0, 2.0],
        }
    )
    cards = persona_cards(
        [10, 11, 12, 13, 14, 15], texts, labels, memories, items, PersonaConfig(k=2)
    )
    assert [c["size"] for c in cards] == [3, 3]
    assert cards[0]["user_ids"] == [10, 11, 12]
    assert cards[0]["mean_rating"] == pytest.approx(14 / 3, abs=1e-3)
    assert cards[0]["top_genres"][0]["genre"] == "Horror"
    assert cards[1]["distinctive_genres"][0]["genre"] == "Romance"


def test_other_users_get_the_nearest_centroids_persona() -> None:
    from training.personas import nearest_centroid

    features = np.array([[0.0, 0.0], [0.0, 2.0], [10.0, 0.0], [10.0, 2.0]])
    labels = np.array([3, 3, 5, 5])  # centroids (0, 1) and (10, 1)
    others = np.array([[1.0, 1.0], [6.0, 5.0], [4.9, -3.0], [100.0, 1.0]])
    assert nearest_centroid(features, labels, others).tolist() == [3, 5, 3, 5]


def test_taste_features_are_the_collaborative_user_factors(protocol_artifacts) -> None:
    from persona_gym.simulator.collaborative import CF_FILE, load_collaborative
    from training.personas import taste_features

    cf = load_collaborative(protocol_artifacts / CF_FILE)
    users = [int(cf.user_ids[1]), 999_999, int(cf.user_ids[0])]
    features = taste_features(users, cf)
    np.testing.assert_array_equal(features[0], cf.user_factors[1])
    np.testing.assert_array_equal(features[2], cf.user_factors[0])
    assert not features[1].any()  # a user the fit never saw: no taste of their own
    with pytest.raises(ValueError, match="features must be one of"):
        PersonaConfig(features="genres")
