"""Fixtures of the agent tests: the environments' episode logic on the tiny trained artifacts."""

from __future__ import annotations

import pandas as pd
import pytest

import persona_gym  # noqa: F401  (registers the ids)
from tests.envs.conftest import tiny_kwargs  # noqa: F401  (re-exported fixture)


@pytest.fixture(scope="session")
def core(tiny_kwargs):  # noqa: F811
    from persona_gym.envs import load_env_config
    from persona_gym.envs.core import RecCore

    return RecCore(load_env_config("ml100k", **tiny_kwargs))


@pytest.fixture(scope="session")
def ratings(trained_tiny_artifacts) -> pd.DataFrame:
    """The tiny users' logged ratings (what the data-driven baselines fit on)."""
    return pd.read_parquet(trained_tiny_artifacts / "memories.parquet")[["user_id", "item_id", "rating"]]
