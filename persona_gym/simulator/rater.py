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

* :class:`persona_gym.simulator.served.ServedRatingModel` behind a ``UserSimulator``: the same
  adapters served by vLLM.

Whatever a rater is, what it returns reaches the agent only through :func:`check_distribution`
(finite rows of five non-negative probabilities summing to 1): corrupt weights that still pass
the manifest's hashes (re-sealed with ``artifacts rehash``) fail there, loudly, instead of
becoming NaN rewards. :func:`redact_url` is how a rater's address (a served model's URL) is
quoted in messages: never with its credentials.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from persona_gym.errors import PersonaGymError

if TYPE_CHECKING:
    from persona_gym.catalog import ItemCatalog
    from persona_gym.simulator.memory import Interaction

__all__ = [
    "DISTRIBUTION_ATOL",
    "N_RATINGS",
    "Rater",
    "RaterOutputError",
    "check_distribution",
    "redact_url",
]

_USERINFO = re.compile(r"[^\s/@?#]+@")
_QUERY_VALUE = re.compile(r"([?&][^=&#\s]*=)[^&#\s]*")
N_RATINGS = 5  # the ratings 1..5: the width of every distribution a rater returns
DISTRIBUTION_ATOL = 1e-4  # how far a row's sum may be from 1 (a float32 softmax is within 1e-6)


class RaterOutputError(PersonaGymError, ValueError):
    """A rater returned something that is not rating distributions (the message names the rater,
    the rows and what to run)."""


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


def check_distribution(
    probs: Any,
    source: str,
    row_name: Callable[[int], str] | None = None,
    n_rows: int | None = None,
) -> np.ndarray:
    """``probs`` as a float64 ``(n, 5)`` array if every row is a rating distribution (finite,
    non-negative, summing to 1 within :data:`DISTRIBUTION_ATOL`), else :class:`RaterOutputError`.

    ``source`` names the rater (its artifacts directory); ``row_name(i)`` names row ``i`` in the
    message (e.g. ``"user 3 (adapter persona-1)"``); ``n_rows`` is the number of rows asked for.
    """
    try:
        out = np.asarray(probs, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise RaterOutputError(
            f"{source}: the rater returned {type(probs).__name__} values that are not numbers "
            f"({err}); a rater returns an (n, {N_RATINGS}) array of probabilities"
        ) from err
    expected = (n_rows if n_rows is not None else (out.shape[0] if out.ndim else 0), N_RATINGS)
    if out.shape != expected:
        raise RaterOutputError(
            f"{source}: the rater returned an array of shape {out.shape} for {expected[0]} "
            f"(user, item) pairs; a rater returns shape {expected}"
        )
    finite = np.asarray(np.isfinite(out).all(axis=1), dtype=bool)
    sums = np.where(finite[:, None], out, 0.0).sum(axis=1)
    valid = np.asarray(
        finite & (out >= 0).all(axis=1) & (np.abs(sums - 1.0) <= DISTRIBUTION_ATOL), dtype=bool
    )
    if valid.all():
        return out
    bad = np.flatnonzero(~valid)
    first = int(bad[0])
    what = "not finite" if not finite[first] else f"sums to {out[first].sum():.6g}, not 1"
    if finite[first] and (out[first] < 0).any():
        what = "has negative probabilities"
    names = [row_name(i) if row_name is not None else f"row {i}" for i in bad[:3].tolist()]
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    raise RaterOutputError(
        f"{source}: the rating distribution of {', '.join(names)}{more} is {what} "
        f"({np.array2string(out[first], precision=4)}); the rating model's weights are corrupt "
        f"whatever the manifest says: run `persona-gym artifacts verify {source}`, then retrain "
        f"the adapter (`persona-gym train --artifacts {source}`) or restore the artifacts"
    )


def redact_url(url: str) -> str:
    """``url`` safe to quote in a message, a log or a ``repr``: its userinfo becomes ``***`` and
    each query value ``***`` (``http://u:p@host/v1?api_key=K`` -> ``http://***@host/v1?api_key=***``);
    the fragment is dropped. Text that does not parse as a URL gets the same treatment by
    pattern (``user:pass@host:8000?key=K`` -> ``***@host:8000?key=***``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = urlsplit("")
    if not parts.scheme or not parts.netloc:
        text = _USERINFO.sub("***@", url.partition("#")[0])
        return _QUERY_VALUE.sub(r"\1***", text)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"***@{host}" if "@" in parts.netloc else host
    query = "&".join(
        f"{pair.partition('=')[0]}=***" if "=" in pair else "***"
        for pair in parts.query.split("&")
        if pair
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
