"""The seam between the environments and the user model: :class:`Rater`.

The environments, the vector environment and the agents see the simulated users only through
this protocol: who the users are (ids, logged histories, profiles, personas), what they can be
shown (the catalogue and its item embeddings), how long a short-term window the model reads,
and one batched call that turns ``(user, item, window)`` triples into rating distributions.

Implementations:

* :class:`persona_gym.simulator.simulator.UserSimulator`: the local SLM with one LoRA adapter
  per persona (the shipped simulators);
* :class:`persona_gym.simulator.table.TableRater`: a collaborative-filtering table over an
  artifacts directory's logged ratings, with no model (fast tests, a baseline user model).

A served model (one request per batch) plugs in the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from persona_gym.catalog import ItemCatalog
    from persona_gym.memory import Interaction

__all__ = ["Rater"]


@runtime_checkable
class Rater(Protocol):
    """Simulated users that rate items (see the module docstring).

    ``rate`` must be deterministic: the environment draws every random number itself, from
    the distributions it returns.
    """

    @property
    def source(self) -> str:
        """What the users come from (an artifacts directory), for messages."""
        ...

    @property
    def catalog(self) -> ItemCatalog:
        """The items, indexed 0..n-1 (the environment's actions)."""
        ...

    @property
    def item_embeddings(self) -> np.ndarray:
        """``(n_items, d)`` float32 unit vectors in catalogue order (the observations' space)."""
        ...

    @property
    def user_ids(self) -> list[int]:
        """The simulated users, sorted."""
        ...

    @property
    def training_user_ids(self) -> list[int]:
        """The simulated users the rating model was fitted on, sorted (the others are new to it)."""
        ...

    @property
    def window_size(self) -> int:
        """How many of the latest interactions the model reads (the short-term window)."""
        ...

    def profile(self, user_id: int) -> str:
        """The user's profile text ``Ms``."""
        ...

    def persona(self, user_id: int) -> int:
        """The user's persona (-1 when the rater has none)."""
        ...

    def history(self, user_id: int) -> tuple[Interaction, ...]:
        """The user's logged interactions in time order (where every episode starts)."""
        ...

    def rate(
        self,
        user_ids: Sequence[int],
        items: Sequence[int],
        windows: Sequence[Sequence[Interaction]] | None = None,
    ) -> np.ndarray:
        """``(n, 5)`` probabilities of the ratings 1..5, one row per ``(user, item, window)``;
        ``windows=None`` means an empty window for every row."""
        ...
