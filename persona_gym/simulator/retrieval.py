"""Retrieval of a user's enriched memories (``Ml``) for a candidate item.

As in the paper, m(e(item_i), e(item_k)) is the cosine similarity between the candidate item's
embedding and the embedding of the item a memory is about (item-to-item; both are embeddings of
``ItemCatalog.describe``). The memory text itself is what goes into the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from persona_gym.distill.memories import MEMORY_COLUMNS

__all__ = ["MemoryIndex", "RetrievedMemory"]


@dataclass(frozen=True)
class RetrievedMemory:
    """One memory returned by :meth:`MemoryIndex.top_k`."""

    row: int  # position in the memories table the index was built from
    item_index: int  # catalogue index of the item the memory is about
    rating: float
    timestamp: int
    text: str  # the Ml text
    score: float  # cosine similarity between the candidate and this memory's item


class MemoryIndex:
    """Per-user item-to-item cosine index over the memories table.

    Args:
        memories: the ``memories`` table of the distiller (``user_id``, ``item_index``,
            ``rating``, ``timestamp``, ``text``; one row per training interaction).
        item_embeddings: ``(n_items, d)`` unit vectors in catalogue order (``embed_items``).
    """

    def __init__(self, memories: pd.DataFrame, item_embeddings: np.ndarray) -> None:
        missing = [c for c in MEMORY_COLUMNS if c != "item_id" and c not in memories.columns]
        if missing:
            raise ValueError(f"memories table lacks columns {missing}")
        emb = np.asarray(item_embeddings, dtype=np.float32)
        item_index = memories["item_index"].to_numpy(dtype=np.int64)
        if len(item_index) and (item_index.min() < 0 or item_index.max() >= len(emb)):
            raise ValueError(
                f"memories refer to item indices outside the {len(emb)} item embeddings"
            )
        self.item_embeddings = emb
        self._item_index = item_index
        self._rating = memories["rating"].to_numpy(dtype=np.float64)
        self._timestamp = memories["timestamp"].to_numpy(dtype=np.int64)
        self._text = memories["text"].astype(str).to_numpy()
        users = memories["user_id"].to_numpy(dtype=np.int64)
        self._rows: dict[int, np.ndarray] = {}
        for user in np.unique(users):
            self._rows[int(user)] = np.flatnonzero(users == user)
        # per-user key matrices, gathered once
        self._keys = {u: emb[item_index[rows]] for u, rows in self._rows.items()}

    @property
    def user_ids(self) -> list[int]:
        """Users that have memories, sorted."""
        return sorted(self._rows)

    def top_k(
        self,
        user_id: int,
        candidate_index: int,
        k: int,
        exclude_item: bool = True,
    ) -> list[RetrievedMemory]:
        """The user's ``k`` memories most similar to the candidate item, best first.

        Args:
            user_id: whose memories to search (unknown users have none: ``[]``).
            candidate_index: catalogue index of the item about to be rated (the query).
            k: how many at most.
            exclude_item: drop memories about the candidate item itself (needed in training:
                the memory of the rated interaction states its label).

        Ties in similarity go to the more recent memory, then to the earlier table row.
        """
        if k < 0:
            raise ValueError(f"k must be >= 0, got {k}")
        rows = self._rows.get(int(user_id))
        if rows is None or k == 0:
            return []
        scores = self._keys[int(user_id)] @ self.item_embeddings[int(candidate_index)]
        keep = np.ones(len(rows), dtype=bool)
        if exclude_item:
            keep &= self._item_index[rows] != int(candidate_index)
        cand = np.flatnonzero(keep)
        if not len(cand):
            return []
        # lexsort: last key is primary -> score desc, timestamp desc, row asc
        order = np.lexsort((rows[cand], -self._timestamp[rows[cand]], -scores[cand]))[:k]
        return [
            RetrievedMemory(
                row=int(rows[i]),
                item_index=int(self._item_index[rows[i]]),
                rating=float(self._rating[rows[i]]),
                timestamp=int(self._timestamp[rows[i]]),
                text=str(self._text[rows[i]]),
                score=float(scores[i]),
            )
            for i in cand[order]
        ]
