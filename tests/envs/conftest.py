"""Fixtures of the environment tests: env kwargs on the tiny tables with the table rater (fast,
no model), and on the tiny trained artifacts (the SLM rater) for what only the SLM shows."""

from __future__ import annotations

import pytest

import persona_gym  # noqa: F401  (registers the ids)


@pytest.fixture(scope="session")
def tiny_config(table_artifacts) -> dict:
    """``EnvConfig`` fields for the tiny tables: 4 users who rated all 6 items, so the
    logged-history mask is off; churn off unless a test turns it on."""
    return {
        "artifacts": str(table_artifacts),
        "dataset": "synthetic",
        "mask_rated": False,
        "leave_rule": "threshold",
        "leave_prob": 0.0,
        "obs_window": 3,
    }


@pytest.fixture
def tiny_kwargs(tiny_config, table_rater) -> dict:
    """``gym.make`` kwargs: the tiny config with the (call-counting) table rater."""
    return {**tiny_config, "rater": table_rater}


@pytest.fixture(scope="session")
def slm_kwargs(trained_tiny_artifacts) -> dict:
    """``gym.make`` kwargs for the tiny trained artifacts (tiny random SLM + trained LoRAs)."""
    return {
        "artifacts": str(trained_tiny_artifacts),
        "dataset": "synthetic",
        "mask_rated": False,
        "leave_rule": "threshold",
        "leave_prob": 0.0,
        "obs_window": 3,
        "dtype": "float32",
    }
