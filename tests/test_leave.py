"""The leave model: sessions, fitting, persistence, calibration."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from persona_gym.leave import (
    FEATURES,
    LeaveModel,
    calibration,
    episode_features,
    fit_leave_model,
    load_leave_model,
    session_features,
    sessions,
)


def table(rows: list[tuple[int, int, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


def test_sessions_split_by_gap_and_user():
    df = table(
        [
            (1, 10, 5, 0),
            (1, 11, 4, 100),
            (1, 12, 1, 5000),
            (1, 13, 3, 5100),
            (2, 10, 2, 120),
            (1, 14, 4, 20000),
        ]
    )
    s = sessions(df, gap=3600)
    assert s["user_id"].tolist() == [1, 1, 1, 1, 1, 2]
    assert s["session"].tolist() == [0, 0, 1, 1, 2, 3]
    assert s["position"].tolist() == [0, 1, 0, 1, 0, 0]
    assert s["leave"].tolist() == [False, True, False, True, True, True]
    f = session_features(df, gap=3600)
    assert f["mean_last3"].tolist()[:4] == [5.0, 4.5, 1.0, 2.0]
    assert f["log_position"].tolist()[1] == pytest.approx(math.log1p(2))
    assert f["rating_minus_user_mean"].tolist()[0] == pytest.approx(5 - 17 / 5)
    with pytest.raises(ValueError, match="gap"):
        sessions(df, gap=0)


def test_episode_features_match_session_features():
    df = table([(1, i, r, 10 * i) for i, r in enumerate([4, 2, 5, 1])])
    last = session_features(df).iloc[-1]
    got = episode_features([4, 2, 5, 1], user_mean=3.0)
    assert got == pytest.approx(last[list(FEATURES)].to_numpy(dtype=float))


def synthetic_sessions(n_users: int = 60, seed: int = 0) -> pd.DataFrame:
    """Sessions that end after a rating r with p = sigmoid(2 - 1.2 r): 0.69 after a 1, 0.02
    after a 5 (a logistic truth, so a fitted model can be calibrated)."""
    rng = np.random.default_rng(seed)
    rows, item = [], 0
    for user in range(n_users):
        t = 0
        for _ in range(40):
            rating = int(rng.integers(1, 6))
            rows.append((user, item, rating, t))
            item += 1
            t += 7200 if rng.random() < 1 / (1 + math.exp(1.2 * rating - 2)) else 60
    return table(rows)


def test_fit_low_ratings_end_sessions():
    model = fit_leave_model(synthetic_sessions(), seed=0)
    assert model.coefficients[FEATURES.index("rating")] < 0
    low = model.probability(episode_features([4, 4, 1], 3.0))
    high = model.probability(episode_features([4, 4, 5], 3.0))
    assert low > 2 * high
    again = fit_leave_model(synthetic_sessions(), seed=0)
    assert again.coefficients == model.coefficients  # seeded, deterministic
    report = calibration(model, synthetic_sessions(seed=1), n_bins=5)
    assert sum(b["count"] for b in report["bins"]) == report["n"] == 60 * 40
    assert report["brier"] < report["base_rate_brier"]
    for b in report["bins"]:
        assert abs(b["mean_predicted"] - b["observed"]) < 0.1


def test_save_load_round_trip_and_refusals(tmp_path):
    model = LeaveModel((0.1, -0.2, 0.3, -0.4), -2.0, FEATURES, 1800.0, {"n": 1})
    path = model.save(tmp_path / "leave.json")
    assert LeaveModel.load(path) == model
    with pytest.raises(ValueError, match="finite"):
        LeaveModel((math.nan, 0.0, 0.0, 0.0), 0.0)
    bad = model.to_dict() | {"intercept": math.nan}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"bad\.json.*finite"):
        LeaveModel.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="coefficients for"):
        LeaveModel((0.1,), 0.0)


def test_shipped_model_is_valid():
    model = load_leave_model()
    assert model.features == FEATURES
    p = model.probability(episode_features([3.0], 3.5))
    # by hand: the logistic of the logit of rating 3, last-3 mean 3, log(1 + 1), 3 - 3.5
    logit = model.intercept + np.dot(model.coefficients, [3.0, 3.0, math.log(2), -0.5])
    assert p == pytest.approx(1 / (1 + math.exp(-logit)))
    assert p < 0.5  # a middling rating does not make leaving likely
