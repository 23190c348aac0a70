"""The user's short-term memory: the last ``k`` interactions before a point in time.

One definition serves the training prompts (built from the logs) and the environment (filled
during an episode with what was recommended and how the user rated it), so the model is asked
about the same kind of window it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from persona_gym.catalog import ItemCatalog

__all__ = ["Interaction", "format_window", "logged_history", "short_term_window"]


@dataclass(frozen=True)
class Interaction:
    """One rating of one item by the user."""

    item_index: int  # catalogue index (ItemCatalog), not the dataset item id
    rating: float  # 1..5
    timestamp: int  # seconds since the epoch (logs) or the episode step (environment)


def short_term_window(
    history: Sequence[Interaction], k: int, before: int | None = None
) -> tuple[Interaction, ...]:
    """The last ``k`` interactions strictly before position ``before`` of a time-ordered history.

    ``history`` is the user's interactions sorted by time (oldest first); ``before`` is a
    position in it (``None`` = after the last one, i.e. the whole history). The result keeps
    time order, oldest first, and holds ``min(k, before)`` interactions. ``k == 0`` gives ``()``.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    end = len(history) if before is None else before
    if not 0 <= end <= len(history):
        raise ValueError(f"before must be in [0, {len(history)}], got {before}")
    return tuple(history[max(0, end - k) : end])


def format_window(window: Sequence[Interaction], catalog: ItemCatalog) -> str:
    """Compact text of a window: ``"Recently rated: Heat (1995) 4; Casino (1995) 5"``.

    Ratings print as integers when whole. An empty window gives ``"Recently rated: nothing yet"``.
    """
    if not window:
        return "Recently rated: nothing yet"
    parts = [f"{catalog.title_year(x.item_index)} {_rating_text(x.rating)}" for x in window]
    return "Recently rated: " + "; ".join(parts)


def _rating_text(rating: float) -> str:
    value = float(rating)
    return str(int(value)) if value.is_integer() else f"{value:.1f}"


def logged_history(memories, user_id: int) -> tuple[Interaction, ...]:
    """A user's time-ordered training interactions from a memories table (``Ml`` rows)."""
    rows = memories[memories["user_id"] == user_id].sort_values(["timestamp", "item_index"])
    return tuple(
        Interaction(int(i), float(r), int(t))
        for i, r, t in zip(rows["item_index"], rows["rating"], rows["timestamp"], strict=True)
    )
