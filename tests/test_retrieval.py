"""Item-to-item retrieval of a user's memories and the embedding cache."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from persona_gym.simulator.retrieval import MemoryIndex


def _unit(rows: list[list[float]]) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# items 0..4; item 1 is item 0's near twin, 2 is at 45 degrees, 3 orthogonal, 4 = copy of 2
ITEMS = _unit([[1, 0, 0], [0.99, 0.14, 0], [1, 1, 0], [0, 0, 1], [1, 1, 0]])


def _memories() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [7, 7, 7, 7, 7, 8],
            "item_id": [100, 101, 102, 103, 104, 101],
            "item_index": [0, 1, 2, 3, 4, 1],
            "rating": [5.0, 4.0, 3.0, 1.0, 2.0, 2.0],
            "timestamp": [1, 2, 3, 4, 5, 1],
            "text": ["m0", "m1", "m2", "m3", "m4", "other user"],
        }
    )


def test_top_k_orders_by_cosine_and_excludes_the_candidate() -> None:
    index = MemoryIndex(_memories(), ITEMS)
    got = index.top_k(7, candidate_index=0, k=3)
    # item 0's own memory is excluded; item 1 first, then the tie 2/4 broken by recency (4 newer)
    assert [m.item_index for m in got] == [1, 4, 2]
    assert [m.text for m in got] == ["m1", "m4", "m2"]
    assert got[0].score > got[1].score == pytest.approx(got[2].score)
    assert all(m.item_index != 0 for m in index.top_k(7, 0, k=10))
    assert len(index.top_k(7, 0, k=10)) == 4


def test_include_own_memory_when_asked() -> None:
    index = MemoryIndex(_memories(), ITEMS)
    got = index.top_k(7, candidate_index=0, k=1, exclude_item=False)
    assert got[0].item_index == 0 and got[0].score == pytest.approx(1.0)


def test_empty_results() -> None:
    index = MemoryIndex(_memories(), ITEMS)
    assert index.top_k(999, candidate_index=0, k=3) == []  # unknown user
    assert index.top_k(7, candidate_index=0, k=0) == []
    # another user's memories never leak in
    assert all(m.text != "other user" for m in index.top_k(7, 1, k=10, exclude_item=False))


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="outside"):
        MemoryIndex(_memories(), ITEMS[:2])
    with pytest.raises(ValueError, match="lacks columns"):
        MemoryIndex(_memories().drop(columns=["text"]), ITEMS)


def test_embedder_unit_vectors_and_disk_cache(tmp_path) -> None:
    from persona_gym.embeddings import Embedder

    texts = [
        "Heat (1995); Crime, Thriller",
        "Toy Story (1995); Animation",
        "Heat (1995); Crime, Thriller",
    ]
    first = Embedder(cache_dir=tmp_path)
    a = first.encode(texts)
    assert a.dtype == np.float32 and a.shape == (3, first.dim) == (3, 384)
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.array_equal(a[0], a[2])
    again = Embedder(cache_dir=tmp_path)
    b = again.encode(texts[::-1])
    assert again._model is None  # served from the disk cache, model never loaded
    assert np.array_equal(b, a[::-1])
    assert again.dim == 384
