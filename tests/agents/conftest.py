"""Fixtures of the agent tests: the environments' episode logic on the tiny tables, rated by
the table rater (no model)."""

from __future__ import annotations

import pandas as pd
import pytest

import persona_gym  # noqa: F401  (registers the ids)
from tests.envs.conftest import tiny_config, tiny_kwargs  # noqa: F401  (re-exported fixtures)


@pytest.fixture
def core(tiny_config, table_rater):  # noqa: F811
    from persona_gym.envs import load_env_config
    from persona_gym.envs.core import RecCore

    return RecCore(load_env_config("ml100k", **tiny_config), table_rater)


@pytest.fixture(scope="session")
def ratings(table_artifacts) -> pd.DataFrame:
    """The tiny users' logged ratings (what the data-driven baselines fit on)."""
    return pd.read_parquet(table_artifacts / "memories.parquet")[["user_id", "item_id", "rating"]]
