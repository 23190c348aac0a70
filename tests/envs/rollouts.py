"""Seeded rollouts whose rewards and infos are recorded once and compared later (regression).

A rollout uses only the public Gymnasium API (``reset``, ``step``, the documented info keys),
so it stays valid however the environment is organised inside. Actions come from their own
seeded generator: a uniform allowed item, except every fourth step repeats the previous item
(a masked action), so the masked path and the churn rule are exercised too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

DATA = Path(__file__).parent / "data"
INFO_KEYS = (
    "user_id",
    "persona",
    "item_index",
    "item_id",
    "expected_rating",
    "sampled_rating",
    "masked_action",
    "left",
)


def rollout(env: gym.Env, seeds: tuple[int, ...], steps: int) -> list[dict[str, Any]]:
    """One record per episode: its reset info and, per step, reward, infos and the end flags."""
    episodes = []
    for seed in seeds:
        actions = np.random.default_rng(1000 + seed)
        _, info = env.reset(seed=seed)
        record: dict[str, Any] = {"seed": seed, "user_id": int(info["user_id"]), "steps": []}
        previous = None
        for t in range(steps):
            allowed = np.flatnonzero(info["action_mask"])
            if previous is not None and t % 4 == 3:
                action = previous
            else:
                action = int(actions.choice(allowed))
            _, reward, terminated, truncated, info = env.step(action)
            row = {
                "action": action,
                "reward": float(reward),
                "terminated": bool(terminated),
                "truncated": bool(truncated),
                "rating_probs": [float(p) for p in info["rating_probs"]],
            }
            row.update({k: _plain(info[k]) for k in INFO_KEYS})
            record["steps"].append(row)
            previous = action
            if terminated or truncated:
                break
        episodes.append(record)
    return episodes


def _plain(value: Any) -> Any:
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    return float(value)


def simulator_sha256(artifacts_dir: Path) -> str:
    """Hash of what shapes a shipped simulator's ratings: its adapters, persona assignment and
    split, and the manifest's prompt, base model and tables hash (not the whole manifest, whose
    bookkeeping fields may change while the simulator stays the same)."""
    manifest = json.loads((artifacts_dir / "manifest.json").read_text())
    digest = hashlib.sha256(
        json.dumps(
            [
                manifest["prompt"],
                manifest["base_model"].get("sha256"),
                manifest.get("tables_sha256"),
                manifest["adapters"],
            ],
            sort_keys=True,
        ).encode()
    )
    files = [
        artifacts_dir / "personas.json",
        artifacts_dir / "split.json",
        *sorted(p for p in (artifacts_dir / "adapters").rglob("*") if p.is_file()),
    ]
    for path in files:
        digest.update(
            path.relative_to(artifacts_dir).as_posix().encode() + b"\0" + path.read_bytes()
        )
    return digest.hexdigest()


def save(path: Path, episodes: list[dict[str, Any]], **meta: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**meta, "episodes": episodes}, indent=1) + "\n")


def assert_same(actual: list[dict[str, Any]], expected: list[dict[str, Any]]) -> None:
    """Equal episodes: exact ids, actions, flags and sampled ratings; floats to 1e-5."""
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected, strict=True):
        assert (got["seed"], got["user_id"]) == (want["seed"], want["user_id"])
        assert len(got["steps"]) == len(want["steps"]), f"episode of seed {got['seed']} length"
        for t, (a, b) in enumerate(zip(got["steps"], want["steps"], strict=True)):
            where = f"seed {got['seed']} step {t}"
            for key in (
                "action",
                "terminated",
                "truncated",
                "user_id",
                "persona",
                "item_index",
                "item_id",
                "masked_action",
                "left",
            ):
                assert a[key] == b[key], f"{where}: {key} {a[key]!r} != {b[key]!r}"
            np.testing.assert_allclose(
                [a["reward"], a["expected_rating"], a["sampled_rating"], *a["rating_probs"]],
                [b["reward"], b["expected_rating"], b["sampled_rating"], *b["rating_probs"]],
                rtol=1e-5,
                atol=1e-5,
                err_msg=where,
            )
