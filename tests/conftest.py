"""Shared fixtures: the real SmolLM2 tokenizer, tiny random models of the SmolLM2 architecture,
and a small item catalogue."""

from __future__ import annotations

import numpy as np
import pytest


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
