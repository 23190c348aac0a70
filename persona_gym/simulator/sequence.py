"""The sequence user model: a user is their rating sequence, read by the SLM one token per event.

A user's state is a sequence of input embeddings, not text::

    <head> [item][rating] ... [item][rating] | [item][rating] x k | [candidate]
           `-- the prefix: the user's `history` --'  `--- the window ---'
               logged events before their last k        (the block)

* an **item token** is one vector: a learned projection of the movie's text embedding, its
  collaborative factors and bias and its genres, plus a learned direction times the collaborative model's
  prediction of this user's rating of it (centred on 3);
* a **rating token** is the LM's own embedding of the digit "1".."5" plus a learned direction
  times the residual (rating minus that prediction): how far the rating fell from expectation;
* the **candidate** is an item token plus its cue: how many of the user's interactions fall
  between the window and it (``RatingRequest.gap``: none in an episode) and the window's mean
  residual, each through a learned embedding.

The rating of the candidate is read from the LM's next-token logits of "1".."5" at the
candidate's token (plus a learned offset each, times a scale per gap bucket: how much of its
departure from the prior the SLM keeps that far after the window, fitted on held-out ratings
read at those gaps), plus the adapter's collaborative prior
(:mod:`persona_gym.simulator.rating_prior`, a Gaussian around the prediction, fitted alone and
without a window term: what the window does to a rating is the SLM's). The prefix is static per user and adapter (computed once, kept as keys/values); a step
pays for the window and the candidate: ``2 k + 1`` tokens, and each further candidate ranked in
the same state one token. The window is the user's last ``k`` interactions: at an episode's
start the last ``k`` logged ones, then the episode's recommendations with their ratings (the
events between the prefix and the window are not shown once the window has moved past them).

Every input is an embedding at the input layer, so a server that takes prompt embeddings (vLLM's
``enable_prompt_embeds``) computes the same logits from :meth:`SequenceRatingModel.embeddings`.
Training (``training/sequence_training.py``) reads each user's logged sequence in this same
layout: a prefix, then blocks of a window and a target event at any distance after it.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from persona_gym.artifacts.manifest import ArtifactsError
from persona_gym.simulator.memory import Interaction, logged_history
from persona_gym.simulator.rating_prior import RatingPrior

TOKENS_FILE = "sequence_tokens.pt"
HEAD_TEXT = "Movie ratings:"
CENTRE = 3.0  # predictions enter the item tokens as (prediction - CENTRE)

__all__ = [
    "CENTRE",
    "GAP_BUCKETS",
    "HEAD_TEXT",
    "TOKENS_FILE",
    "SequenceLM",
    "SequenceRatingModel",
    "SequenceTokens",
    "UserSequence",
    "gap_bucket",
    "item_features",
]


def item_features(item_embeddings, collaborative, genres: Sequence[Sequence[str]]) -> np.ndarray:
    """``(n_items, E)`` what an item token is projected from: the movie's text embedding, its
    collaborative factors and bias, and its genres (one indicator per genre of the catalogue,
    in sorted order) so that the similarity of two movies' genres is linear in their tokens."""
    names = sorted({g for item in genres for g in item})
    column = {g: j for j, g in enumerate(names)}
    indicators = np.zeros((len(genres), len(names)), dtype=np.float32)
    for row, item in enumerate(genres):
        indicators[row, [column[g] for g in item]] = 1.0
    return np.c_[item_embeddings, collaborative.item_features(), indicators]


GAP_BUCKETS = 8


def gap_bucket(gaps: torch.Tensor) -> torch.Tensor:
    """The bucket of each gap (interactions between a window and its candidate): 0 for none,
    ``b`` for ``2^(b-1) <= gap < 2^b``, the last one from 64 on."""
    gaps = torch.as_tensor(gaps, dtype=torch.float64).clamp_min(0)
    return torch.ceil(torch.log2(gaps + 1)).long().clamp_max(GAP_BUCKETS - 1)


class SequenceTokens(torch.nn.Module):
    """The soft input tokens of one adapter: items and ratings as input embeddings.

    Args:
        features: ``(n_items, E)`` item features (text embedding, collaborative factors and bias);
            standardised per dimension so the projection starts on a unit scale.
        digits: ``(5, H)`` the LM's input embeddings of "1".."5" (frozen).
        placeholder: ``(H,)`` the LM's embedding of a neutral token: the item tokens' start.
    """

    features: torch.Tensor
    digits: torch.Tensor

    def __init__(self, features, digits: torch.Tensor, placeholder: torch.Tensor):
        super().__init__()
        feats = torch.as_tensor(np.asarray(features), dtype=torch.float32)
        feats = (feats - feats.mean(0)) / feats.std(0).clamp_min(1e-6)
        self.register_buffer("features", feats, persistent=False)
        self.register_buffer("digits", digits.detach().float().clone())
        hidden = digits.shape[1]
        self.item = torch.nn.Linear(feats.shape[1], hidden)
        torch.nn.init.zeros_(self.item.weight)
        with torch.no_grad():
            self.item.bias.copy_(placeholder.detach().float())
        self.prediction = torch.nn.Parameter(torch.zeros(hidden))
        self.residual = torch.nn.Parameter(torch.zeros(hidden))
        # how far the candidate falls after the window, by powers of two (:func:`gap_bucket`)
        self.gap = torch.nn.Embedding(GAP_BUCKETS, hidden)
        torch.nn.init.zeros_(self.gap.weight)
        # added to the LM's five rating logits before the prior (:meth:`read`)
        self.offset = torch.nn.Parameter(torch.zeros(5))
        # the window's mean residual, read on the candidate's token (:meth:`cue`)
        self.surprise = torch.nn.Parameter(torch.zeros(hidden))
        # per gap bucket, the share of the SLM's part kept (:meth:`read`)
        self.scale = torch.nn.Parameter(torch.ones(GAP_BUCKETS))

    def items(self, indices: torch.Tensor, predictions: torch.Tensor) -> torch.Tensor:
        """``(..., H)`` item tokens of catalogue ``indices`` with this user's ``predictions``."""
        feats = self.features[indices.to(self.features.device)]
        centred = (predictions.to(feats.device, torch.float32) - CENTRE)[..., None]
        return self.item(feats) + centred * self.prediction

    def cue(self, gaps: torch.Tensor, surprises: torch.Tensor) -> torch.Tensor:
        """``(..., H)`` what a candidate's token adds to its item token: how many interactions
        after the window it falls (``gaps``) and how far the window's ratings fell from the
        collaborative expectation (``surprises``, :meth:`UserSequence.surprise`)."""
        buckets = gap_bucket(gaps).to(self.gap.weight.device)
        moved = torch.as_tensor(surprises, dtype=torch.float32).to(self.surprise.device)
        return self.gap(buckets) + moved[..., None] * self.surprise

    def read(self, logits: torch.Tensor, gaps: torch.Tensor) -> torch.Tensor:
        """The SLM's ``(n, 5)`` part of the rating logits from the LM's logits of "1".."5" of
        candidates ``gaps`` after their windows: a learned offset per rating (trained from the
        untrained LM's mean with the opposite sign, so training starts from the collaborative
        prior alone), times the scale of the gap's bucket (learned, then refitted on held-out
        ratings: far from its window the SLM's departure from the prior carries less)."""
        scale = self.scale[gap_bucket(gaps).to(self.scale.device)]
        return (logits + self.offset.to(logits.device)) * scale[..., None].to(logits.device)

    def rating_logits(
        self,
        prior: RatingPrior,
        digits: torch.Tensor,
        predictions: torch.Tensor,
        gaps: torch.Tensor,
    ) -> torch.Tensor:
        """``(n, 5)`` rating logits from the LM's ``(n, 5)`` logits of "1".."5", the
        candidates' ``(n,)`` collaborative predictions and gaps: the SLM's part (:meth:`read`)
        plus ``prior`` around the predictions. The prior was fitted alone and kept fixed while
        the SLM trained: without the SLM's part it is the report's prior-alone row."""
        centre = predictions.to(torch.float32)
        return prior(self.read(digits, gaps), centre, torch.zeros_like(centre))

    def ratings(self, ratings: torch.Tensor, residuals: torch.Tensor) -> torch.Tensor:
        """``(..., H)`` rating tokens of 1..5 ``ratings`` with their ``residuals``."""
        digits = self.digits[(ratings.to(self.digits.device).long() - 1).clamp(0, 4)]
        return digits + residuals.to(digits.device, torch.float32)[..., None] * self.residual

    def save(self, folder: str | Path) -> None:
        torch.save(
            {k: v.detach().cpu() for k, v in self.state_dict().items()}, Path(folder) / TOKENS_FILE
        )

    @classmethod
    def initial(cls, features, lm: SequenceLM, tokenizer) -> SequenceTokens:
        """Untrained tokens for ``lm``: its digit embeddings, items starting at " movie"."""
        embed: Any = lm.body.embed_tokens
        placeholder = tokenizer(" movie", add_special_tokens=False)["input_ids"][-1]
        with torch.no_grad():
            return cls(features, embed(lm.rating_ids), embed(torch.as_tensor([placeholder]))[0])

    @classmethod
    def load(cls, folder: str | Path, features) -> SequenceTokens:
        """The tokens saved next to an adapter's weights; fail with the fix when missing."""
        path = Path(folder) / TOKENS_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: this adapter was not trained as a sequence user model; "
                "retrain it with `persona-gym train --preset sequence`"
            )
        state = torch.load(path, weights_only=True)
        # tokens trained before the gap scale keep their SLM part whole at every gap
        state.setdefault("scale", torch.ones(GAP_BUCKETS))
        hidden = state["digits"].shape[1]
        tokens = cls(features, state["digits"], torch.zeros(hidden))
        missing = sorted(set(tokens.state_dict()) - set(state))
        if missing:
            raise ArtifactsError(
                f"{path} lacks {missing}: written by an older sequence trainer; retrain the "
                "adapters with `persona-gym train --preset sequence --force`"
            )
        tokens.load_state_dict(state)
        return tokens


class SequenceLM:
    """The LM run on input embeddings: the decoder stack (with its LoRA layers when a peft
    model is given), the head text's embeddings and the five rating rows of the LM head."""

    def __init__(self, model: torch.nn.Module, tokenizer):
        from persona_gym.simulator.prompts import rating_token_ids

        self.model = model
        get_base = getattr(model, "get_base_model", None)
        inner: Any = get_base() if get_base is not None else model
        self.body: Any = inner.model  # the decoder stack (LoRA layers inside when attached)
        # transformers 5.20 renamed the decoder's ``past_key_values`` (argument and output) to
        # ``cache``; vLLM's environment pins an earlier release
        parameters = inspect.signature(self.body.forward).parameters
        self._cache = "cache" if "cache" in parameters else "past_key_values"
        self.lm_head: Any = inner.lm_head
        self.rating_ids = torch.as_tensor(rating_token_ids(tokenizer))
        head_ids = torch.as_tensor(tokenizer(HEAD_TEXT, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            self.head = self.body.embed_tokens(head_ids)  # (T_head, H)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``(..., 5)`` logits of "1".."5" from final hidden states ``(..., H)``."""
        return (hidden @ self.lm_head.weight[self.rating_ids].T).float()

    def decode(
        self,
        embeds: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """The decoder stack on ``(B, T, H)`` input embeddings after the cached keys/values
        ``past`` (one ``(K, V)`` pair per layer; ``None``: from the start): the last hidden
        states and the extended cache."""
        from transformers import DynamicCache

        cache = DynamicCache(past) if past is not None else None
        out = self.body(
            inputs_embeds=embeds, position_ids=positions, use_cache=True, **{self._cache: cache}
        )
        return out.last_hidden_state, getattr(out, self._cache)


@dataclass(frozen=True)
class UserSequence:
    """A stretch of one user's rating sequence: item indices, ratings and the collaborative
    predictions of those items for this user (``(n,)`` arrays, oldest first)."""

    items: np.ndarray
    ratings: np.ndarray
    predictions: np.ndarray

    def __len__(self) -> int:
        return len(self.items)

    @classmethod
    def of(cls, interactions: Sequence[Interaction], predictions) -> UserSequence:
        return cls(
            np.array([x.item_index for x in interactions], dtype=np.int64),
            np.array([x.rating for x in interactions], dtype=np.float32),
            np.asarray(predictions, dtype=np.float32).reshape(-1),
        )

    def surprise(self) -> float:
        """The mean residual (rating - collaborative prediction) of these events; 0 if none."""
        return float(np.mean(self.ratings - self.predictions)) if len(self) else 0.0

    def embed(self, tokens: SequenceTokens) -> torch.Tensor:
        """``(2 n, H)`` input embeddings: each event's item token then its rating token."""
        items = tokens.items(torch.from_numpy(self.items), torch.from_numpy(self.predictions))
        ratings = torch.from_numpy(np.rint(self.ratings).astype(np.int64))
        residual = torch.from_numpy(self.ratings - self.predictions)
        rated = tokens.ratings(ratings, residual)
        return torch.stack([items, rated], dim=1).reshape(-1, items.shape[-1])


PREFIX_CACHE = 512  # prefixes kept as keys/values (one per user and adapter)
ROWS_PER_FORWARD = 256  # rows batched in one forward: each holds a copy of its cached prefix


class SequenceRatingModel:
    """Scores rating requests with the sequence layout (module docstring): the local engine.

    Each persona adapter is merged into its own copy of the base model's weights at load (no
    LoRA layers and no adapter switching per call: the same numbers within float rounding).

    Args:
        model: the base LM wrapped in a ``PeftModel`` holding the persona adapters.
        tokenizer: its tokenizer (the head text and the rating digits).
        builder: the prompt builder (its ``config`` holds ``history`` and ``window_size``).
        artifacts: the users' logged histories and the collaborative model.
        tokens / priors: each adapter's :class:`SequenceTokens` and rating prior.
    """

    def __init__(self, model, tokenizer, builder, artifacts, tokens: dict, priors: dict):
        self.builder = builder
        self.artifacts = artifacts
        self.tokens = tokens
        self.priors = priors
        self.history_size = builder.config.history
        self.window_size = builder.config.window_size
        self.lms = {name: SequenceLM(merged(model, name), tokenizer) for name in tokens}
        self.lm = next(iter(self.lms.values()))  # the head text and LM head: the base model's
        self.head = self.lm.head
        self._prefixes: dict[tuple, tuple[tuple[torch.Tensor, torch.Tensor], ...]] = {}
        self._histories: dict[int, tuple[Interaction, ...]] = {}
        self.tokens_processed = 0  # real tokens through the model (benchmarks)

    @classmethod
    def load(cls, model, tokenizer, builder, artifacts, adapters) -> SequenceRatingModel:
        """The engine over ``model`` with each adapter's tokens and prior read from its folder."""
        from persona_gym.simulator.rating_prior import load_rating_priors

        features = item_features(
            artifacts.item_embeddings, artifacts.require_collaborative(), artifacts.catalog.genres
        )
        tokens = {name: SequenceTokens.load(folder, features) for name, folder in adapters.items()}
        return cls(model, tokenizer, builder, artifacts, tokens, load_rating_priors(adapters))

    @property
    def adapters(self) -> list[str]:
        return sorted(self.lms)

    def history(self, user_id: int) -> tuple[Interaction, ...]:
        """The user's time-ordered logged interactions (read once)."""
        found = self._histories.get(user_id)
        if found is None:
            found = self._histories[user_id] = logged_history(self.artifacts.memories, user_id)
        return found

    def predictions(self, user_id: int, adapter: str, items: Sequence[int]) -> np.ndarray:
        """The collaborative predictions of ``items`` for the user under ``adapter``'s taste."""
        taste = self.artifacts.taste(user_id, adapter)
        return self.artifacts.require_collaborative().predict([user_id] * len(items), items, taste)

    def user_sequence(
        self, user_id: int, adapter: str, events: Sequence[Interaction]
    ) -> UserSequence:
        return UserSequence.of(
            events, self.predictions(user_id, adapter, [x.item_index for x in events])
        )

    def prefix_events(self, user_id: int) -> tuple[Interaction, ...]:
        """The user's static prefix: the ``history`` logged events before the last
        ``window_size`` ones (those are the first windows of an episode)."""
        history = self.history(user_id)
        end = max(0, len(history) - self.window_size)
        return tuple(history[max(0, end - self.history_size) : end])

    def prefix_embeddings(self, user_id: int, adapter: str) -> torch.Tensor:
        """``(T_prefix, H)`` input embeddings of the user's static prefix under ``adapter``."""
        prefix = self.user_sequence(user_id, adapter, self.prefix_events(user_id))
        return torch.cat([self.head, prefix.embed(self.tokens[adapter])])

    def block_embeddings(self, request) -> tuple[torch.Tensor, float]:
        """``(2 len(window) + 1, H)`` input embeddings of a request's window and candidate, and
        the candidate's collaborative prediction (the prior's centre)."""
        user, adapter, window = request.user_id, request.adapter, tuple(request.window)
        items = [x.item_index for x in window] + [request.candidate]
        predicted = self.predictions(user, adapter, items)
        tokens = self.tokens[adapter]
        events = UserSequence.of(window, predicted[:-1])
        candidate = tokens.items(
            torch.as_tensor(items[-1:]), torch.as_tensor(predicted[-1:])
        ) + tokens.cue(torch.as_tensor([request.gap]), torch.as_tensor([events.surprise()]))
        block = torch.cat([events.embed(tokens), candidate])
        return block, float(predicted[-1])

    def embeddings(self, request) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prefix, block)`` input embeddings of a request: what a server taking prompt
        embeddings is sent (their concatenation), and what the local engine computes."""
        block, _ = self.block_embeddings(request)
        return self.prefix_embeddings(request.user_id, request.adapter), block

    def _prefix_kvs(self, adapter: str, keys: list[tuple]) -> dict[tuple, tuple]:
        """The keys/values of the ``(user, adapter)`` prefixes ``keys``, computed in batches of
        equal length and cached."""
        found = {}
        by_length: dict[int, list[tuple[tuple, torch.Tensor]]] = {}
        for key in keys:
            embeds = self.prefix_embeddings(*key)
            by_length.setdefault(len(embeds), []).append((key, embeds))
        for group in by_length.values():
            embeds = torch.stack([e for _, e in group])
            _, cache = self.lms[adapter].decode(embeds)
            self.tokens_processed += embeds.shape[0] * embeds.shape[1]
            for row, (key, _) in enumerate(group):
                if len(self._prefixes) >= PREFIX_CACHE:
                    self._prefixes.pop(next(iter(self._prefixes)))
                found[key] = self._prefixes[key] = tuple(
                    (layer.keys[row : row + 1], layer.values[row : row + 1])
                    for layer in cache.layers
                )
        return found

    @torch.inference_mode()
    def score(self, requests: Sequence) -> np.ndarray:
        """``(len(requests), 5)`` probabilities of the ratings 1..5, in request order."""
        return self.score_logits(requests).softmax(-1).double().numpy()

    def score_logits(self, requests: Sequence) -> torch.Tensor:
        """``(len(requests), 5)`` rating logits, prior included, in request order.

        The prefixes are cached across calls (one per user and adapter). A state (user,
        adapter, window) rated for one candidate costs one forward of its window and candidate
        on the prefix; a state ranked for several candidates is computed once, then each
        candidate costs one token on it. Rows of equal length are batched.
        """
        states: dict[tuple, list[int]] = {}
        blocks: list[torch.Tensor] = []
        predictions = torch.empty(len(requests))
        for i, request in enumerate(requests):
            if request.adapter not in self.tokens:
                raise KeyError(
                    f"adapter {request.adapter!r} is not loaded; loaded: {sorted(self.tokens)}"
                )
            block, predictions[i] = self.block_embeddings(request)
            blocks.append(block)
            states.setdefault((request.user_id, request.adapter, tuple(request.window)), []).append(
                i
            )
        # the prefixes this call reads: cached ones kept here (the cache may evict during it)
        kvs: dict[tuple, tuple] = {}
        missing: dict[str, list[tuple]] = {}
        for key in {state[:2] for state in states}:
            if key in self._prefixes:
                kvs[key] = self._prefixes[key]
            else:
                missing.setdefault(key[1], []).append(key)
        for adapter, keys in missing.items():
            kvs.update(self._prefix_kvs(adapter, keys))
        hidden = torch.empty((len(requests), self.head.shape[1]))
        # states with one candidate: window and candidate in one forward on the prefix
        singles: dict[tuple, list[int]] = {}
        shared: dict[tuple, list[tuple]] = {}
        for state, index in states.items():
            length = _length(kvs[state[:2]])
            if len(index) == 1:
                singles.setdefault((state[1], length), []).append(index[0])
            else:
                shared.setdefault((state[1], length, len(blocks[index[0]]) - 1), []).append(state)
        for (adapter, length), every in singles.items():
            for first in range(0, len(every), ROWS_PER_FORWARD):  # each row copies its prefix
                index = every[first : first + ROWS_PER_FORWARD]
                longest = max(len(blocks[i]) for i in index)
                embeds = torch.zeros(len(index), longest, self.head.shape[1])
                for row, i in enumerate(index):
                    embeds[row, : len(blocks[i])] = blocks[i]  # right padding: never attended to
                key_of = [(requests[i].user_id, adapter) for i in index]
                out = self._run(adapter, embeds, [kvs[k] for k in key_of], length)[0]
                ends = torch.as_tensor([len(blocks[i]) - 1 for i in index])
                hidden[torch.as_tensor(index)] = out[torch.arange(len(index)), ends]
        # states ranked for several candidates: the state once, then one token per candidate
        for (adapter, length, n_window), group in shared.items():
            state_kvs = [kvs[state[:2]] for state in group]
            if n_window:
                window = torch.stack([blocks[states[state][0]][:-1] for state in group])
                cache = self._run(adapter, window, state_kvs, length)[1]
                state_kvs = [
                    tuple(
                        (layer.keys[r : r + 1], layer.values[r : r + 1]) for layer in cache.layers
                    )
                    for r in range(len(group))
                ]
            rows = [(r, i) for r, state in enumerate(group) for i in states[state]]
            for first in range(0, len(rows), ROWS_PER_FORWARD):  # each row copies its state
                part = rows[first : first + ROWS_PER_FORWARD]
                candidates = torch.stack([blocks[i][-1] for _, i in part])[:, None]  # (N, 1, H)
                out = self._run(
                    adapter, candidates, [state_kvs[r] for r, _ in part], length + n_window
                )[0]
                hidden[torch.as_tensor([i for _, i in part])] = out[:, -1]
        logits = torch.empty((len(requests), 5), dtype=torch.float32)
        adapters = [r.adapter for r in requests]
        gaps = torch.as_tensor([r.gap for r in requests])
        for adapter in set(adapters):
            mine = torch.as_tensor([i for i, a in enumerate(adapters) if a == adapter])
            logits[mine] = self.combine(
                adapter, self.lm.logits(hidden[mine]), predictions[mine], gaps[mine]
            )
        return logits

    def combine(
        self, adapter: str, digits: torch.Tensor, predictions: torch.Tensor, gaps: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`SequenceTokens.rating_logits` under ``adapter``'s tokens and prior."""
        return self.tokens[adapter].rating_logits(self.priors[adapter], digits, predictions, gaps)

    def _run(self, adapter: str, embeds: torch.Tensor, kvs: list[tuple], length: int):
        """``adapter``'s decoder on ``(B, T, H)`` input embeddings after the ``B`` cached
        sequences ``kvs`` (each ``length`` tokens): last hidden states and the extended cache."""
        layers = [
            (torch.cat([kv[j][0] for kv in kvs]), torch.cat([kv[j][1] for kv in kvs]))
            for j in range(len(kvs[0]))
        ]
        positions = torch.arange(length, length + embeds.shape[1])[None].expand(len(kvs), -1)
        hidden, cache = self.lms[adapter].decode(embeds, layers, positions)
        self.tokens_processed += embeds.shape[0] * embeds.shape[1]
        return hidden, cache


def merged(model, adapter: str) -> torch.nn.Module:
    """A copy of the base model with ``adapter``'s LoRA weights merged in (``model``: a peft
    model holding it; left unchanged)."""
    import copy

    with torch.no_grad():
        return copy.deepcopy(model).merge_and_unload(adapter_names=[adapter]).eval()


def _length(kv: tuple) -> int:
    """Tokens held by one sequence's keys/values (``((k, v), ...)`` per layer, ``k`` of shape
    ``(1, heads, T, d)``)."""
    return int(kv[0][0].shape[2])
