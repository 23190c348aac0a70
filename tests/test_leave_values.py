"""The leave model pinned with values: the session cut at exactly ``gap`` seconds, the
features of longer sessions, the logistic probability, the JSON form and its refusals, what a
fit records, and every number of a calibration report by hand (``test_leave.py``: the model's
behaviour on synthetic sessions)."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pandas as pd
import pytest

from persona_gym.leave import (
    DEFAULT_GAP_SECONDS,
    FEATURES,
    SHIPPED_LEAVE_MODEL,
    LeaveModel,
    calibration,
    episode_features,
    fit_leave_model,
    load_leave_model,
    session_features,
    sessions,
)


def table(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])


def test_a_gap_of_exactly_gap_seconds_stays_in_the_session():
    df = table([(1, 1, 3, 0), (1, 2, 3, 3600), (1, 3, 3, 7201), (2, 1, 4, 7201), (2, 2, 4, 7202)])
    s = sessions(df)  # the default gap: one hour
    assert DEFAULT_GAP_SECONDS == 3600
    assert s["session"].tolist() == [0, 0, 1, 2, 2] and s["leave"].tolist() == [
        False,
        True,
        True,
        False,
        True,
    ]
    assert sessions(df, gap=3599)["session"].tolist() == [0, 1, 2, 3, 3]
    assert isinstance(s.index, pd.RangeIndex)
    for gap in (0, -5):
        with pytest.raises(ValueError) as err:
            sessions(df, gap=gap)
        assert str(err.value) == f"session gap must be > 0 seconds, got {gap}"


def test_sessions_sort_by_user_time_and_item():
    df = table([(2, 5, 1, 10), (1, 9, 2, 50), (1, 3, 5, 50), (1, 4, 4, 10)])
    s = sessions(df)
    assert list(zip(s["user_id"], s["item_id"], strict=True)) == [(1, 4), (1, 3), (1, 9), (2, 5)]
    assert s["position"].tolist() == [0, 1, 2, 0]


def test_features_of_a_longer_session_by_hand():
    ratings = [5, 1, 3, 4, 2]
    df = table([(7, i, r, 60 * i) for i, r in enumerate(ratings)])
    f = session_features(df)
    assert f["mean_last3"].tolist() == [5.0, 3.0, 3.0, pytest.approx(8 / 3), 3.0]
    np.testing.assert_allclose(f["log_position"], np.log1p(np.arange(1, 6)))
    np.testing.assert_allclose(f["rating_minus_user_mean"], np.array(ratings) - 3.0)
    assert f["rating"].dtype == np.float64
    for n in range(1, 6):
        np.testing.assert_allclose(
            episode_features(ratings[:n], 3.0), f.iloc[n - 1][list(FEATURES)].to_numpy(dtype=float)
        )
    assert episode_features([2, 4, 4, 1], 2.5).tolist() == [
        1.0,
        3.0,
        pytest.approx(math.log(5)),
        -1.5,
    ]
    with pytest.raises(ValueError, match="^episode_features needs at least one rating$"):
        episode_features([], 3.0)


def test_the_probability_is_the_logistic_of_the_linear_score():
    model = LeaveModel((-0.5, 0.25, 0.1, 0.3), 0.2)
    x = np.array([4.0, 3.0, math.log(3), 0.5])
    logit = 0.2 - 2.0 + 0.75 + 0.1 * math.log(3) + 0.15
    p = model.probability(x)
    assert isinstance(p, float) and p == pytest.approx(1 / (1 + math.exp(-logit)))
    rows = model.probability(np.stack([x, np.zeros(4)]))
    assert isinstance(rows, np.ndarray) and rows.shape == (2,)
    np.testing.assert_allclose(rows, [p, 1 / (1 + math.exp(-0.2))])


def test_the_json_form_and_its_refusals(tmp_path):
    model = LeaveModel((0.5, -1.0, 0.0, 2.0), -1.5, FEATURES, 900.0, {"data": "x"})
    assert model.to_dict() == {
        "format": "persona-gym-leave-model/1",
        "features": list(FEATURES),
        "coefficients": [0.5, -1.0, 0.0, 2.0],
        "intercept": -1.5,
        "gap_seconds": 900.0,
        "metadata": {"data": "x"},
    }
    assert LeaveModel((0.0,) * 4, 0.0).to_dict()["metadata"] == {}
    path = model.save(tmp_path / "m.json")
    assert json.loads(path.read_text()) == model.to_dict()
    assert LeaveModel.load(path) == model and LeaveModel.load(str(path)) == model
    assert load_leave_model(path) == model and load_leave_model() == LeaveModel.load(
        SHIPPED_LEAVE_MODEL
    )
    bare = model.to_dict()
    del bare["metadata"]
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    assert LeaveModel.load(tmp_path / "bare.json").metadata == {}
    for change, reason in (
        (dict(format="other/1"), "format is 'other/1', expected 'persona-gym-leave-model/1'"),
        (dict(coefficients=[1.0]), "1 coefficients for 4 features"),
        (dict(features=["a", "b", "c", "d"]), "features must be"),
        (dict(gap_seconds=0.0), "LeaveModel.gap must be > 0, got 0.0"),
    ):
        (tmp_path / "bad.json").write_text(json.dumps({**model.to_dict(), **change}))
        with pytest.raises(ValueError) as err:
            LeaveModel.load(tmp_path / "bad.json")
        assert str(err.value).startswith(f"{tmp_path / 'bad.json'}: not a valid leave model (")
        assert reason in str(err.value)
        assert str(err.value).endswith("); refit it with `python benchmarks/leave_model.py`")
    (tmp_path / "short.json").write_text(json.dumps({"format": "persona-gym-leave-model/1"}))
    with pytest.raises(ValueError, match="not a valid leave model"):
        LeaveModel.load(tmp_path / "short.json")
    with pytest.raises(ValueError) as err:
        LeaveModel((0.0,) * 4, math.inf)
    assert str(err.value).startswith(
        "LeaveModel: coefficients, intercept and gap must be finite numbers"
    )
    with pytest.raises(ValueError, match="^LeaveModel.gap must be > 0, got -1$"):
        LeaveModel((0.0,) * 4, 0.0, gap=-1)


def synthetic(n_users=30, seed=0) -> pd.DataFrame:
    """Sessions that end after a low rating more often."""
    rng = np.random.default_rng(seed)
    rows, item = [], 0
    for user in range(n_users):
        t = 0
        for _ in range(20):
            rating = int(rng.integers(1, 6))
            rows.append((user, item, rating, t))
            item += 1
            t += 7200 if rng.random() < 1 / (1 + math.exp(1.2 * rating - 2)) else 60
    return table(rows)


def test_a_fit_records_what_it_was_fitted_on(caplog):
    from sklearn.linear_model import LogisticRegression

    data = synthetic()
    with caplog.at_level(logging.INFO, logger="persona_gym.leave"):
        model = fit_leave_model(data, gap=1800, C=0.5, seed=3, metadata={"data": "synthetic"})
    features = session_features(data, 1800)
    reference = LogisticRegression(C=0.5, random_state=3, max_iter=1000).fit(
        features[list(FEATURES)].to_numpy(), features["leave"].to_numpy()
    )
    np.testing.assert_allclose(model.coefficients, reference.coef_[0], rtol=1e-6)
    assert model.intercept == pytest.approx(reference.intercept_[0], rel=1e-6)
    assert model.gap == 1800.0 and model.features == FEATURES
    assert model.metadata == {
        "n_ratings": 600,
        "n_sessions": int(features["session"].nunique()),
        "n_users": 30,
        "leave_rate": pytest.approx(float(features["leave"].mean())),
        "data": "synthetic",
    }
    assert model.coefficients != fit_leave_model(data, gap=1800, C=0.01, seed=3).coefficients
    message = caplog.records[0].getMessage()
    assert message.startswith(
        f"leave model on 600 ratings ({model.metadata['n_sessions']} sessions): coefficients ("
    )
    assert message.endswith(f"intercept {model.intercept:.3f}")
    default = fit_leave_model(data)
    assert default.gap == 3600.0 and default.metadata["n_ratings"] == 600


def test_a_fit_needs_ends_and_continuations():
    ends = table([(u, u, 3, 0) for u in range(5)])  # every rating ends its user's only session
    with pytest.raises(ValueError) as err:
        fit_leave_model(ends)
    assert str(err.value) == (
        "fit_leave_model needs both session ends and continuations; got 5 leaves in 5 ratings"
    )


def test_calibration_by_hand():
    model = LeaveModel((-1.0, 0.0, 0.0, 0.0), 2.0)  # P(leave) = sigmoid(2 - rating)
    held = table([(1, 0, 1, 0), (1, 1, 5, 60), (1, 2, 3, 7260), (2, 0, 5, 0), (2, 1, 1, 60)])
    # sessions: user 1 [1, 5] [3]; user 2 [5, 1] -> leave after 5, 3, 1
    p = {r: 1 / (1 + math.exp(r - 2)) for r in (1, 3, 5)}
    predicted = np.array([p[1], p[5], p[3], p[5], p[1]])
    observed = np.array([0, 1, 1, 0, 1.0])
    report = calibration(model, held, n_bins=2, strategy="uniform")
    assert report["n"] == 5 and report["strategy"] == "uniform"
    assert report["leave_rate"] == pytest.approx(0.6) and report["mean_predicted"] == pytest.approx(
        predicted.mean()
    )
    assert report["brier"] == pytest.approx(np.mean((predicted - observed) ** 2))
    assert report["base_rate_brier"] == pytest.approx(np.mean((0.6 - observed) ** 2))
    # uniform bins [0, 0.5) and [0.5, 1]: ratings 3 and 5 below, rating 1 (p = 0.73) above
    low, high = report["bins"]
    assert (low["lo"], low["hi"], high["lo"], high["hi"]) == (0.0, 0.5, 0.5, 1.0)
    assert low["count"] == 3 and low["observed"] == pytest.approx(2 / 3)
    assert low["mean_predicted"] == pytest.approx((2 * p[5] + p[3]) / 3)
    assert (
        high["count"] == 2
        and high["observed"] == 0.5
        and high["mean_predicted"] == pytest.approx(p[1])
    )
    # four uniform bins: [0.5, 0.75) is empty and left out
    four = calibration(model, held, n_bins=4, strategy="uniform")
    assert [(b["lo"], b["count"]) for b in four["bins"]] == [(0.0, 2), (0.25, 1), (0.5, 2)]
    # quantile bins (the default) put equal counts in each: edges at the predictions' quantiles
    quantile = calibration(model, held, n_bins=2)
    assert quantile["strategy"] == "quantile"
    edges = np.quantile(predicted, [0.0, 0.5, 1.0])
    assert [(b["lo"], b["hi"]) for b in quantile["bins"]] == [
        (edges[0], edges[1]),
        (edges[1], edges[2]),
    ]
    assert sum(b["count"] for b in quantile["bins"]) == 5
    assert len(calibration(model, held)["bins"]) <= 10  # ten bins by default, empty ones left out
    with pytest.raises(ValueError, match="^n_bins must be >= 1, got 0$"):
        calibration(model, held, n_bins=0)
    with pytest.raises(ValueError, match="^strategy must be 'quantile' or 'uniform', got 'equal'$"):
        calibration(model, held, strategy="equal")
    one = calibration(model, held, n_bins=1, strategy="uniform")
    assert one["bins"] == [
        {
            "lo": 0.0,
            "hi": 1.0,
            "mean_predicted": pytest.approx(predicted.mean()),
            "observed": pytest.approx(0.6),
            "count": 5,
        }
    ]
    cut = calibration(LeaveModel((-1.0, 0.0, 0.0, 0.0), 2.0, gap=30.0), held, n_bins=1)
    assert (
        cut["leave_rate"] == 1.0
    )  # the model's own gap cuts the sessions: 30 s, every rating ends one


def test_boundaries_of_the_gap_the_columns_and_the_float():
    df = table([(1, 1, 3, 0), (1, 2, 3, 1), (1, 3, 4, 2)])
    assert sessions(df, gap=0.5)["session"].tolist() == [0, 1, 2]  # any positive gap is valid
    assert LeaveModel((0.0,) * 4, 0.0, gap=0.5).gap == 0.5
    assert list(sessions(df).columns) == [
        "user_id",
        "item_id",
        "rating",
        "timestamp",
        "session",
        "position",
        "leave",
    ]
    assert type(LeaveModel((0.1, 0.0, 0.0, 0.0), 0.0).probability(np.array([1, 2, 3, 4]))) is float


def test_fit_defaults_and_its_own_gap():
    data = synthetic()
    assert fit_leave_model(data) == fit_leave_model(data, gap=3600, C=1.0, seed=0)
    wide = fit_leave_model(data, gap=7300)  # gaps are 60 s or 7200 s: one session per user
    assert wide.gap == 7300.0 and wide.metadata["n_sessions"] == 30
    assert wide.metadata["leave_rate"] == pytest.approx(30 / 600)


def test_calibration_has_ten_bins_by_default():
    model = LeaveModel((0.0, 0.0, -1.0, 0.0), 1.0)  # P(leave) falls with the position: 40 values
    held = table([(1, i, 3, 60 * i) for i in range(40)])
    report = calibration(model, held)
    assert len(report["bins"]) == 10 and [b["count"] for b in report["bins"]] == [4] * 10
    assert report["bins"][0]["observed"] == 0.25  # the last rating (the lowest P) ends the session
