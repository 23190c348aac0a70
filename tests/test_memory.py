"""The short-term memory window: one definition for training prompts and the environment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from persona_gym.catalog import ItemCatalog
from persona_gym.simulator.memory import Interaction, format_window, short_term_window


def _history(n: int) -> list[Interaction]:
    return [Interaction(item_index=i, rating=float(1 + i % 5), timestamp=100 + i) for i in range(n)]


def _catalog() -> ItemCatalog:
    items = pd.DataFrame(
        {
            "item_id": [10, 11, 12],
            "title": ["Heat", "Casino", "Nameless"],
            "year": pd.array([1995, 1995, None], dtype="Int64"),
            "genres": [("Crime",), ("Drama",), ()],
        }
    )
    stats = pd.DataFrame({"item_id": [10, 11], "mean_rating": [3.9, 3.7], "n_ratings": [10, 5]})
    return ItemCatalog.from_frames(items, stats)


def test_window_is_last_k_strictly_before_position() -> None:
    history = _history(10)
    assert short_term_window(history, 3) == tuple(history[7:10])
    assert short_term_window(history, 3, before=5) == tuple(history[2:5])
    # the interaction at `before` itself is never in its own window
    assert history[5] not in short_term_window(history, 3, before=5)
    assert short_term_window(history, 3, before=2) == tuple(history[:2])
    assert short_term_window(history, 3, before=0) == ()
    assert short_term_window(history, 0) == ()
    assert short_term_window([], 5) == ()


def test_window_keeps_time_order_and_rejects_bad_arguments() -> None:
    history = _history(6)
    window = short_term_window(history, 4)
    assert [x.timestamp for x in window] == sorted(x.timestamp for x in window)
    with pytest.raises(ValueError, match="k must be"):
        short_term_window(history, -1)
    with pytest.raises(ValueError, match="before must be"):
        short_term_window(history, 2, before=7)


def test_window_same_for_logs_and_an_episode() -> None:
    """A window built from logs equals the one an episode builds by appending as it goes."""
    logs = _history(8)
    episode: list[Interaction] = []
    for position, step in enumerate(logs):
        assert short_term_window(episode, 3) == short_term_window(logs, 3, before=position)
        episode.append(step)


def test_format_window_is_compact() -> None:
    catalog = _catalog()
    window = (Interaction(0, 4.0, 1), Interaction(1, 5.0, 2), Interaction(2, 3.5, 3))
    assert format_window(window, catalog) == (
        "Recently rated: Heat (1995) 4; Casino (1995) 5; Nameless 3.5"
    )
    assert format_window((), catalog) == "Recently rated: nothing yet"
    assert np.isclose(catalog.mean_rating[2], (3.9 * 10 + 3.7 * 5) / 15)
