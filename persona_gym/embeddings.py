"""Sentence embeddings of profiles, items and memories, with a disk cache.

:class:`Embedder` wraps sentence-transformers (default: the bundled all-MiniLM-L6-v2). Vectors
are float32 and L2-normalised, so a dot product is a cosine similarity. Every vector is cached
on disk under a key hashed from (model id, text): re-encoding a text costs a file read, not a
forward pass. The model itself is loaded only when some text is not cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from persona_gym.assets import DEFAULT_EMBEDDER, cache_dir, resolve_embedder
from persona_gym.io import atomic_write
from persona_gym.quiet import quiet_loading

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_EMBEDDER", "Embedder", "embed_items", "item_texts"]


class Embedder:
    """Batch sentence encoder with a content-addressed disk cache.

    Args:
        name_or_path: an alias (``"all-minilm-l6-v2"``), a local model folder or a hub id.
        device: torch device for encoding.
        batch_size: texts per forward pass.
        cache_dir: where vectors are cached; default ``<persona-gym cache>/embeddings``.
            Each :meth:`encode` call that computes new vectors adds one ``.npz`` shard there.
    """

    def __init__(
        self,
        name_or_path: str = DEFAULT_EMBEDDER,
        device: str = "cpu",
        batch_size: int = 128,
        cache_dir: str | os.PathLike | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model_id = name_or_path
        self.device = device
        self.batch_size = batch_size
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.cache_path = root / _slug(name_or_path)
        self._model: Any = None  # the SentenceTransformer, loaded on first use
        self._cache: dict[str, np.ndarray] | None = None
        self._dim: int | None = None

    @property
    def dim(self) -> int:
        """Embedding dimension (loads the model if nothing is cached yet)."""
        if self._dim is None:
            cache = self._load_cache()
            if cache:
                self._dim = int(next(iter(cache.values())).shape[0])
            else:
                self._dim = int(self._get_model().get_sentence_embedding_dimension())
        return self._dim

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Encode texts to an ``(n, dim)`` float32 array of unit vectors, in input order."""
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        cache = self._load_cache()
        keys = [self._key(t) for t in texts]
        missing: dict[str, str] = {}
        for key, text in zip(keys, texts, strict=True):
            if key not in cache and key not in missing:
                missing[key] = text
        if missing:
            log.info("encoding %d new texts with %s", len(missing), self.model_id)
            vectors = (
                self._get_model()
                .encode(
                    list(missing.values()),
                    batch_size=self.batch_size,
                    convert_to_numpy=True,
                    normalize_embeddings=True,
                    show_progress_bar=False,
                )
                .astype(np.float32)
            )
            new_keys = list(missing)
            for key, vector in zip(new_keys, vectors, strict=True):
                cache[key] = vector
            self._write_shard(new_keys, vectors)
        out = np.stack([cache[key] for key in keys]).astype(np.float32, copy=False)
        self._dim = out.shape[1]
        return out

    def _key(self, text: str) -> str:
        return hashlib.sha256(f"{self.model_id}\0{text}".encode()).hexdigest()

    def _get_model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            with quiet_loading():
                self._model = SentenceTransformer(
                    resolve_embedder(self.model_id), device=self.device
                )
        return self._model

    def _load_cache(self) -> dict[str, np.ndarray]:
        if self._cache is None:
            self._cache = {}
            if self.cache_path.is_dir():
                for shard in sorted(self.cache_path.glob("*.npz")):
                    with np.load(shard) as data:
                        for key, vector in zip(data["keys"], data["vectors"], strict=True):
                            self._cache[str(key)] = vector
        return self._cache

    def _write_shard(self, keys: list[str], vectors: np.ndarray) -> None:
        name = hashlib.sha256("".join(keys).encode()).hexdigest()[:24] + ".npz"

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, keys=np.array(keys), vectors=vectors)

        atomic_write(self.cache_path / name, write)


def item_texts(catalog) -> list[str]:
    """The text embedded for each catalogue item: ``catalog.describe(i)``, in catalogue order."""
    return [catalog.describe(i) for i in range(len(catalog))]


def embed_items(catalog, embedder: Embedder) -> np.ndarray:
    """Unit vectors of every catalogue item's description, ``(len(catalog), dim)`` float32."""
    return embedder.encode(item_texts(catalog))


def default_cache_dir() -> Path:
    """Where :class:`Embedder` caches vectors by default: ``<persona-gym cache>/embeddings``."""
    return cache_dir() / "embeddings"


def _slug(name: str) -> str:
    tail = Path(name).name or "model"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in tail)
    return f"{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
