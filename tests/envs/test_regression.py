"""Behaviour regression: seeded rollouts give the rewards and infos recorded before a change.

Re-record after an intended change of behaviour (or a new shipped simulator) with
``pytest tests/envs/test_regression.py --record-rollouts`` and commit the data files.
"""

from __future__ import annotations

import json

import gymnasium as gym
import pytest

import persona_gym
from tests.envs.rollouts import DATA, assert_same, rollout, save, simulator_sha256

TINY = DATA / "rollouts_tiny.json"
ML100K = DATA / "rollouts_ml100k.json"


def _compare_or_record(request, path, episodes, **meta) -> None:
    if request.config.getoption("--record-rollouts"):
        save(path, episodes, **meta)
        pytest.skip(f"recorded {path}")
    assert_same(episodes, json.loads(path.read_text())["episodes"])


def test_tiny_simulator_rollout_is_unchanged(request, slm_kwargs):
    """The env on the tiny trained artifacts (random base model, trained LoRAs), churn on."""
    env = gym.make("PersonaML100K-v0", **{**slm_kwargs, "leave_prob": 0.5})
    episodes = rollout(env, seeds=(0, 1, 2), steps=8)
    _compare_or_record(request, TINY, episodes)


def test_tiny_vector_rollout_matches_the_single_env_recording(slm_kwargs):
    """The vector env's sub-environment ``i`` seeded ``s + i`` replays the single-env record
    (ratings to 1e-4: a batch of users sums in another order than one user alone)."""
    import numpy as np

    recorded = json.loads(TINY.read_text())["episodes"]
    kwargs = {**slm_kwargs, "leave_prob": 0.5}
    vec = gym.make_vec(
        "PersonaML100K-v0",
        num_envs=len(recorded),
        vectorization_mode="vector_entry_point",
        **kwargs,
    )
    _, infos = vec.reset(seed=recorded[0]["seed"])
    assert [int(u) for u in infos["user_id"]] == [e["user_id"] for e in recorded]
    length = max(len(e["steps"]) for e in recorded)
    for t in range(length):
        actions = np.array([e["steps"][min(t, len(e["steps"]) - 1)]["action"] for e in recorded])
        _, rewards, _, _, infos = vec.step(actions)
        for i, episode in enumerate(recorded):
            if t < len(episode["steps"]):
                want = episode["steps"][t]
                assert rewards[i] == pytest.approx(want["reward"], abs=1e-4)
                assert int(infos["item_index"][i]) == want["item_index"]
                assert float(infos["sampled_rating"][i]) == pytest.approx(
                    want["sampled_rating"], nan_ok=True
                )


@pytest.mark.integration
@pytest.mark.xdist_group("shipped")  # with tests/envs/test_integration.py: one materialisation
def test_shipped_simulator_rollout_is_unchanged(request):
    """``PersonaML100K-v0`` on the shipped simulator (fp32), compared only for the simulator
    the numbers were recorded on (:func:`simulator_sha256`): a new one needs a new recording."""
    from pathlib import Path

    shipped = Path(persona_gym.__file__).parent / "default_artifacts" / "ml100k"
    digest = simulator_sha256(shipped)
    if not request.config.getoption("--record-rollouts"):
        recorded = json.loads(ML100K.read_text())["simulator_sha256"]
        if recorded != digest:
            pytest.skip(
                f"the shipped ml100k simulator (sha256 {digest[:12]}) is not the one the "
                f"rollouts were recorded on ({recorded[:12]}); re-record with "
                "`pytest tests/envs/test_regression.py -k shipped --record-rollouts`"
            )
    env = gym.make("PersonaML100K-v0", dtype="float32")
    episodes = rollout(env, seeds=(0, 1), steps=10)
    _compare_or_record(request, ML100K, episodes, simulator_sha256=digest)
