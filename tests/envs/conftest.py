"""Fixtures of the environment tests: env kwargs on the tiny trained artifacts."""

from __future__ import annotations

import pytest

import persona_gym  # noqa: F401  (registers the ids)


@pytest.fixture(scope="session")
def tiny_kwargs(trained_tiny_artifacts) -> dict:
    """``gym.make`` kwargs for the tiny artifacts: 4 users who rated all 6 items, so the
    logged-history mask is off; churn off unless a test turns it on."""
    return {"artifacts": str(trained_tiny_artifacts), "dataset": "synthetic", "mask_rated": False,
            "leave_prob": 0.0, "obs_window": 3}
