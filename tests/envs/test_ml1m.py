"""PersonaML1M-v0 end to end on ML-1M-format files written here (no real ML-1M needed).

Three ML-100k users (from the bundled copy) are written as ``ratings.dat`` / ``users.dat`` /
``movies.dat`` (``::``-separated, latin-1), then the real pipeline runs on that folder:
``persona-gym distill`` and ``persona-gym personas`` (CLI, MiniLM embeddings) and a tiny
``training.train.train`` on the tiny random base model; finally ``gym.make("PersonaML1M-v0",
artifacts=DIR)`` is stepped, single and vectorised.
"""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pandas as pd
import pytest

import persona_gym  # noqa: F401  (registers the ids)

N_USERS = 3


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
    write("movies.dat", [
        f"{row.item_id}::{row.title}" + ("" if pd.isna(row.year) else f" ({int(row.year)})")
        + f"::{'|'.join(row.genres) or '(no genres listed)'}"
        for row in items.itertuples()
    ])
    write("ratings.dat", [f"{r.user_id}::{r.item_id}::{r.rating}::{r.timestamp}"
                          for r in ratings.itertuples()])
    return {"users": len(users), "items": len(items), "ratings": len(ratings)}


@pytest.mark.integration  # distill/personas embed with the bundled MiniLM
def test_ml1m_env_end_to_end(tmp_path, tiny_base):
    from persona_gym.cli import main
    from persona_gym.data import load_ml1m
    from persona_gym.simulator.prompts import PromptConfig
    from training.train import TrainConfig, train

    data = tmp_path / "ml-1m"
    sizes = write_ml1m_folder(data)
    assert load_ml1m(data).summary()["n_users"] == N_USERS  # the files parse as ML-1M

    out = tmp_path / "artifacts"
    assert main(["distill", "--dataset", str(data), "--out", str(out), "--n-users", str(N_USERS),
                 "--no-progress"]) == 0
    assert main(["personas", "--artifacts", str(out), "--k", "2"]) == 0
    config = TrainConfig(
        base_model=tiny_base, variants=("persona",), rank=4, alpha=8, lora_layers=2, epochs=1,
        batch_examples=4, blocks_per_sequence=2, max_examples_per_user=4, val_per_user=1,
        eval_every=2, checkpoint_every=100,
        prompt=PromptConfig(window_size=2, n_memories=1, max_tokens=256),
    )
    train(out, config, progress=False)

    env = gym.make("persona_gym:PersonaML1M-v0", artifacts=str(out), base_model=tiny_base,
                   render_mode="ansi")
    assert env.action_space.n == sizes["items"]
    obs, info = env.reset(seed=0)
    assert info["user_id"] in env.unwrapped.user_ids and len(env.unwrapped.user_ids) == N_USERS
    rng = np.random.default_rng(0)
    total, steps = 0.0, 0
    while True:
        allowed = np.flatnonzero(env.unwrapped.action_masks())
        obs, reward, terminated, truncated, info = env.step(int(rng.choice(allowed)))
        assert env.observation_space.contains(obs) and 1.0 <= info["expected_rating"] <= 5.0
        total, steps = total + reward, steps + 1
        if terminated or truncated:
            break
    assert steps <= env.spec.max_episode_steps and np.isfinite(total)
    assert "Recently rated:" in env.render()

    vec = gym.make_vec("PersonaML1M-v0", num_envs=2, artifacts=str(out), base_model=tiny_base)
    vec.reset(seed=0)
    masks = vec.unwrapped.action_masks()
    _, rewards, *_ = vec.step(np.array([np.flatnonzero(m)[0] for m in masks]))
    assert rewards.shape == (2,) and np.all((rewards >= 1.0) & (rewards <= 5.0))
