"""Shared fixtures: the real SmolLM2 tokenizer, tiny random models of the SmolLM2 architecture,
a small item catalogue, tiny artifacts (with trained adapters, or tables only) and the table
rater over them (the fast user model of the environment and agent tests)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from persona_gym.assets import CACHE_ENV
from persona_gym.data.download import DATA_DIR_ENV

# Every directory the code or its libraries write outside a test's own folders, by the variable
# that moves it: persona-gym's cache (converted model, shipped simulator copy, embeddings, file
# hashes) and data folder; platformdirs' XDG folders (anything else using them); Hugging Face
# (huggingface_hub reads HF_HOME on import, which happens after this fixture: no test module
# imports it at collection); torch.compile's kernels (/tmp/torchinductor_$USER) and Triton's;
# torch hub; matplotlib's font cache; Stable-Baselines3's logger folders (/tmp/SB3-<time> for a
# run without TensorBoard).
USER_DIR_VARS = {
    CACHE_ENV: "persona-gym-cache",
    DATA_DIR_ENV: "persona-gym-data",
    "XDG_CACHE_HOME": "xdg-cache",
    "XDG_DATA_HOME": "xdg-data",
    "XDG_CONFIG_HOME": "xdg-config",
    "XDG_STATE_HOME": "xdg-state",
    "HF_HOME": "huggingface",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "TRITON_CACHE_DIR": "triton",
    "TORCH_HOME": "torch",
    "MPLCONFIGDIR": "matplotlib",
    "SB3_LOGDIR": "sb3",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--record-rollouts",
        action="store_true",
        help="re-record the seeded rollouts of tests/envs/test_regression.py "
        "(after an intended change of behaviour or a new shipped simulator)",
    )


@pytest.fixture(scope="session", autouse=True)
def user_dirs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point every cache and data directory of :data:`USER_DIR_VARS` into one temporary folder
    for the whole session (subprocesses inherit it): no test reads or writes the user's real
    cache or data; what a session builds there (the converted SLM, the shipped simulator's
    copy) is built once and shared by its tests."""
    root = tmp_path_factory.mktemp("user-dirs")
    patch = pytest.MonkeyPatch()
    for variable, name in USER_DIR_VARS.items():
        patch.setenv(variable, str(root / name))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if (
        workers > 1
    ):  # `make test` runs pytest-xdist workers: the cores are shared, not oversubscribed
        import torch

        threads = max((os.cpu_count() or 1) // workers, 1)
        torch.set_num_threads(threads)
        patch.setenv("OMP_NUM_THREADS", str(threads))  # the subprocesses tests start
    yield root
    patch.undo()


@pytest.fixture(scope="session")
def smollm2_path(user_dirs: Path) -> str:
    """The default SLM converted into the session's cache: the one conversion (~14 s) of each
    test process (one per xdist worker), which every test that needs the real model or tokenizer reuses."""
    from persona_gym.assets import resolve_model

    return resolve_model()


@pytest.fixture(scope="session")
def tokenizer(smollm2_path):
    """The real SmolLM2 tokenizer (chat template included)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path)


def make_tiny_llama(vocab_size: int, seed: int = 0, layers: int = 4):
    """A randomly initialised LlamaForCausalLM with SmolLM2's layout, shrunk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def tiny_llama(tokenizer):
    return make_tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def catalog():
    """Six movies with training averages."""
    import pandas as pd

    from persona_gym.catalog import ItemCatalog

    items = pd.DataFrame(
        {
            "item_id": [1, 2, 3, 4, 5, 6],
            "title": ["Toy Story", "GoldenEye", "Heat", "Casino", "Babe", "Se7en"],
            "year": pd.array([1995, 1995, 1995, 1995, 1995, 1995], dtype="Int64"),
            "genres": [
                ("Animation", "Comedy"),
                ("Action",),
                ("Crime", "Thriller"),
                ("Drama",),
                ("Children's",),
                ("Thriller",),
            ],
        }
    )
    stats = pd.DataFrame(
        {
            "item_id": [1, 2, 3, 4, 5],
            "mean_rating": [3.9, 3.2, 3.8, 3.7, 3.5],
            "n_ratings": [452, 131, 90, 60, 30],
        }
    )
    return ItemCatalog.from_frames(items, stats)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, tokenizer):
    """A tiny random model of SmolLM2's layout saved as a local model folder."""
    folder = tmp_path_factory.mktemp("tiny-smollm2")
    make_tiny_llama(len(tokenizer), layers=4).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture
def artifacts(tmp_path, catalog):
    return write_tiny_artifacts(tmp_path / "art", catalog)


def write_tiny_artifacts(root, catalog, n_users: int = 4):
    """A minimal artifacts directory as `distill` + `personas` write it: 4 users, 2 personas."""
    rng = np.random.default_rng(0)
    (root / "embeddings").mkdir(parents=True)
    catalog.to_frame().to_parquet(root / "items.parquet", index=False)
    emb = rng.normal(size=(len(catalog), 8)).astype(np.float32)
    np.save(root / "embeddings" / "items.npy", emb / np.linalg.norm(emb, axis=1, keepdims=True))
    rows, profiles = [], {}
    for user in range(n_users):
        profiles[user] = f"User {user}: rates {'high' if user % 2 else 'low'}, likes thrillers."
        for t, item in enumerate(rng.permutation(len(catalog))):
            rating = int(rng.integers(1, 6))
            rows.append(
                {
                    "user_id": user,
                    "item_id": int(catalog.item_ids[item]),
                    "item_index": int(item),
                    "rating": rating,
                    "timestamp": 1000 + t,
                    "text": f"I rated {catalog.title_year(item)} {rating}/5.",
                }
            )
    pd.DataFrame(rows).to_parquet(root / "memories.parquet", index=False)
    with open(root / "profiles.jsonl", "w") as handle:
        for user, text in profiles.items():
            handle.write(json.dumps({"user_id": user, "text": text}) + "\n")
    (root / "personas.json").write_text(
        json.dumps({"k": 2, "assignment": {str(u): u % 2 for u in range(n_users)}})
    )
    (root / "split.json").write_text(
        json.dumps({"dataset": "synthetic", "user_ids": list(range(n_users))})
    )
    return root


@pytest.fixture(scope="session")
def trained_tiny_artifacts(tmp_path_factory, catalog, tiny_base):
    """Tiny artifacts with trained persona adapters (2 personas) and a single-max adapter,
    on the tiny random base model (:func:`trained_tiny_config`). Read-only: copy it before
    changing anything."""
    from training.train import train

    root = write_tiny_artifacts(tmp_path_factory.mktemp("trained") / "art", catalog)
    train(root, trained_tiny_config(tiny_base), progress=False)
    return root


def trained_tiny_config(base_model: str, **overrides):
    """The settings :func:`trained_tiny_artifacts` was trained with (every rating of the tiny
    users but the last one of each for validation): a run with ``overrides`` of ``variants``
    only continues that run, and trains its adapters bit for bit again."""
    return tiny_train_config(
        base_model,
        **{"variants": ("persona", "single-max"), "max_examples_per_user": 0, **overrides},
    )


def tiny_train_config(base_model: str, **overrides):
    """The tiny adapters' training settings (rank 4 on the top 2 of 4 layers, short prompts)."""
    from persona_gym.simulator.prompts import PromptConfig
    from training.train import TrainConfig

    values = dict(
        base_model=base_model,
        variants=("persona",),
        rank=4,
        alpha=8,
        lora_layers=2,
        epochs=1,
        batch_examples=4,
        blocks_per_sequence=2,
        max_examples_per_user=4,
        val_per_user=1,
        eval_every=2,
        checkpoint_every=100,
        prompt=PromptConfig.paper(window_size=2, n_memories=1, max_tokens=256),
    )
    return TrainConfig(**{**values, **overrides})


@pytest.fixture(scope="session")
def protocol_artifacts(tmp_path_factory, tiny_base) -> Path:
    """Artifacts with a real protocol split, built by the real pipeline: the synthetic
    ML-1M-format folder of :func:`tests.test_cli.write_ml1m` (6 users, 150 movies) distilled for
    4 users by ``persona-gym distill`` (``split.json`` records the folder and the split),
    ``persona-gym personas --k 2``, persona adapters on the tiny base model. What reads the
    logged test data through ``split.json`` runs on it. Read-only: copy it before changing it."""
    from persona_gym.cli import main
    from tests.test_cli import write_ml1m
    from training.train import train

    root = tmp_path_factory.mktemp("protocol")
    data = write_ml1m(root / "ml-1m")
    out = root / "art"
    assert (
        main(
            [
                "distill",
                "--dataset",
                str(data),
                "--out",
                str(out),
                "--n-users",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    assert main(["personas", "--artifacts", str(out), "--k", "2"]) == 0
    train(out, tiny_train_config(tiny_base), progress=False)
    return out


@pytest.fixture(scope="session")
def table_artifacts(tmp_path_factory, catalog):
    """Tiny artifacts tables (4 users who rated all 6 items, 2 personas), no adapters."""
    return write_tiny_artifacts(tmp_path_factory.mktemp("tables") / "art", catalog)


class CountingRater:
    """A rater that counts the ``rate`` calls and rows it passes to another one."""

    def __init__(self, rater):
        self.inner, self.calls, self.rows = rater, 0, 0

    def __getattr__(self, name):  # the Rater's properties
        if name.startswith("__") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def rate(self, user_ids, items, windows=None):
        self.calls += 1
        self.rows += len(user_ids)
        return self.inner.rate(user_ids, items, windows)


@pytest.fixture
def table_rater(table_artifacts) -> CountingRater:
    """The table rater of :func:`table_artifacts` (window of 2, as the tiny adapters were
    trained with), counting its calls; a fresh one per test."""
    from persona_gym.simulator.table import TableRater

    return CountingRater(TableRater.from_artifacts(table_artifacts, window_size=2))
