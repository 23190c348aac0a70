"""A least-recently-used cache of prefix keys/values, bounded in bytes.

Each user's static prompt prefix is encoded once per adapter (:func:`~.engine.encode_prefixes`)
and kept here under ``(adapter, prefix token ids)``; the oldest entries are evicted once the
cache holds more than ``max_bytes``, never the ones asked for in the current call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence

from persona_gym.simulator.engine import PrefixKV

__all__ = ["PrefixCache"]

Key = tuple[str, tuple[int, ...]]


class PrefixCache:
    """``(adapter, prefix) -> PrefixKV`` with LRU eviction past ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Key, PrefixKV] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_encode(
        self,
        adapter: str,
        prefixes: set[tuple[int, ...]],
        encode: Callable[[list[tuple[int, ...]]], Sequence[PrefixKV]],
    ) -> dict[tuple[int, ...], PrefixKV]:
        """The cached keys/values of each prefix under ``adapter``; ``encode(missing)``
        computes the missing ones (in the order given: shortest first)."""
        missing = sorted((p for p in prefixes if (adapter, p) not in self._entries), key=len)
        if missing:
            for prefix, kv in zip(missing, encode(missing), strict=True):
                self._entries[(adapter, prefix)] = kv
                self.nbytes += kv.nbytes
        found = {}
        for prefix in prefixes:
            self._entries.move_to_end((adapter, prefix))
            found[prefix] = self._entries[(adapter, prefix)]
        while self.nbytes > self.max_bytes and len(self._entries) > len(prefixes):
            _, evicted = self._entries.popitem(last=False)  # least recently used
            self.nbytes -= evicted.nbytes
        return found
