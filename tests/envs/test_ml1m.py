"""PersonaML1M-v0 end to end on ML-1M-format files written here (no real ML-1M needed).

The session's ``protocol_artifacts`` (``tests/conftest.py``) come from an ML-1M-format folder
(``ratings.dat`` / ``users.dat`` / ``movies.dat``, ``::``-separated, latin-1) through the real
pipeline (``persona-gym distill``, ``persona-gym personas``, a tiny ``train`` on the tiny random
base model); ``gym.make("PersonaML1M-v0", artifacts=DIR)`` is stepped, single and vectorised.
:func:`write_ml1m_folder` writes such files from real ML-100k users (for other tests).
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest

import persona_gym  # noqa: F401  (registers the ids)

N_USERS = 3  # write_ml1m_folder's default


def write_ml1m_folder(folder: Path, n_users: int = N_USERS) -> dict[str, int]:
    """ML-1M-format files holding ``n_users`` ML-100k users with 100-200 ratings each."""
    from persona_gym.data import load_ml100k_bundled

    ds = load_ml100k_bundled()
    counts = ds.ratings.groupby("user_id").size()
    users = sorted(counts.index[(counts >= 100) & (counts <= 200)])[:n_users]
    ratings = ds.ratings[ds.ratings["user_id"].isin(users)]
    items = ds.items[ds.items["item_id"].isin(ratings["item_id"].unique())]
    folder.mkdir(parents=True)

    def write(name: str, lines: list[str]) -> None:
        (folder / name).write_bytes(("\n".join(lines) + "\n").encode("latin-1", errors="replace"))

    write("users.dat", [f"{u}::{'MF'[i % 2]}::25::{i % 21}::0000{i}" for i, u in enumerate(users)])
    write(
        "movies.dat",
        [
            f"{row.item_id}::{row.title}"
            + ("" if pd.isna(row.year) else f" ({int(row.year)})")
            + f"::{'|'.join(row.genres) or '(no genres listed)'}"
            for row in items.itertuples()
        ],
    )
    write(
        "ratings.dat",
        [f"{r.user_id}::{r.item_id}::{r.rating}::{r.timestamp}" for r in ratings.itertuples()],
    )
    return {"users": len(users), "items": len(items), "ratings": len(ratings)}


@pytest.mark.integration  # distill/personas embed with the bundled MiniLM
def test_ml1m_env_end_to_end(protocol_artifacts, tiny_base):
    """``PersonaML1M-v0`` on the protocol artifacts (an ML-1M-format folder through the real
    ``distill``, ``personas`` and a tiny ``train``), stepped single and vectorised."""
    import json

    from persona_gym.data import load_dataset, load_ml1m

    folder = json.loads((protocol_artifacts / "split.json").read_text())["dataset"]
    dataset = load_ml1m(folder)
    assert dataset.summary()["n_users"] == 6  # the files parse as ML-1M

    env = gym.make(
        "persona_gym:PersonaML1M-v0",
        artifacts=str(protocol_artifacts),
        base_model=tiny_base,
        render_mode="ansi",
    )
    assert env.action_space.n == len(load_dataset(folder).items)
    obs, info = env.reset(seed=0)
    assert info["user_id"] in env.unwrapped.user_ids and len(env.unwrapped.user_ids) == 4
    rng = np.random.default_rng(0)
    total, steps = 0.0, 0
    while True:
        allowed = np.flatnonzero(env.unwrapped.action_masks())
        obs, reward, terminated, truncated, info = env.step(int(rng.choice(allowed)))
        assert env.observation_space.contains(obs)
        assert reward == pytest.approx(info["expected_rating"])
        assert info["expected_rating"] == pytest.approx(info["rating_probs"] @ np.arange(1, 6))
        total, steps = total + reward, steps + 1
        if terminated or truncated:
            break
    assert steps <= env.spec.max_episode_steps and "Recently rated:" in env.render()

    vec = gym.make_vec(
        "PersonaML1M-v0", num_envs=2, artifacts=str(protocol_artifacts), base_model=tiny_base
    )
    vec.reset(seed=0)
    masks = vec.unwrapped.action_masks()
    _, rewards, _, _, infos = vec.step(np.array([np.flatnonzero(m)[0] for m in masks]))
    np.testing.assert_allclose(rewards, infos["rating_probs"] @ np.arange(1, 6), rtol=1e-6)
