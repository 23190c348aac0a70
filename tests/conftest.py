"""Shared fixtures: the real SmolLM2 tokenizer, tiny random models of the SmolLM2 architecture,
a small item catalogue, tiny artifacts (with trained adapters, or tables only) and the table
rater over them (the fast user model of the environment and agent tests)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--record-rollouts", action="store_true",
                     help="re-record the seeded rollouts of tests/envs/test_regression.py "
                          "(after an intended change of behaviour or a new shipped simulator)")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The default SLM converted into the cache (once per machine, ~25 s)."""
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
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=2048, rms_norm_eps=1e-5,
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

    items = pd.DataFrame({
        "item_id": [1, 2, 3, 4, 5, 6],
        "title": ["Toy Story", "GoldenEye", "Heat", "Casino", "Babe", "Se7en"],
        "year": pd.array([1995, 1995, 1995, 1995, 1995, 1995], dtype="Int64"),
        "genres": [("Animation", "Comedy"), ("Action",), ("Crime", "Thriller"), ("Drama",),
                   ("Children's",), ("Thriller",)],
    })
    stats = pd.DataFrame({"item_id": [1, 2, 3, 4, 5], "mean_rating": [3.9, 3.2, 3.8, 3.7, 3.5],
                          "n_ratings": [452, 131, 90, 60, 30]})
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
            rows.append({"user_id": user, "item_id": int(catalog.item_ids[item]), "item_index": int(item),
                         "rating": rating, "timestamp": 1000 + t,
                         "text": f"I rated {catalog.title_year(item)} {rating}/5."})
    pd.DataFrame(rows).to_parquet(root / "memories.parquet", index=False)
    with open(root / "profiles.jsonl", "w") as handle:
        for user, text in profiles.items():
            handle.write(json.dumps({"user_id": user, "text": text}) + "\n")
    (root / "personas.json").write_text(json.dumps({"k": 2, "assignment": {str(u): u % 2 for u in range(n_users)}}))
    (root / "split.json").write_text(json.dumps({"dataset": "synthetic", "user_ids": list(range(n_users))}))
    return root


@pytest.fixture(scope="session")
def trained_tiny_artifacts(tmp_path_factory, catalog, tiny_base):
    """Tiny artifacts with trained persona adapters (2 personas) and a single-max adapter,
    on the tiny random base model. Read-only: copy it before changing anything."""
    from persona_gym.simulator.prompts import PromptConfig
    from training.train import TrainConfig, train

    root = write_tiny_artifacts(tmp_path_factory.mktemp("trained") / "art", catalog)
    config = TrainConfig(
        base_model=tiny_base, variants=("persona", "single-max"), rank=4, alpha=8, lora_layers=2,
        epochs=1, batch_examples=4, blocks_per_sequence=2, max_examples_per_user=0,
        val_per_user=1, eval_every=2, checkpoint_every=100,
        prompt=PromptConfig(window_size=2, n_memories=1, max_tokens=256),
    )
    train(root, config, progress=False)
    return root


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
