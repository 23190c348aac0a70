"""The SLM simulated users of an artifacts directory: profiles, memories, adapters, one call.

``UserSimulator`` is the SLM :class:`~persona_gym.simulator.rater.Rater`: ``rate`` turns
``(user, candidate, short-term window)`` triples into rating distributions. It retrieves each
candidate's top-k ``Ml`` memories, picks the user's adapter (their persona's, by default) and
scores everything in one :class:`RatingScorer` call: the local
:class:`~persona_gym.simulator.rating_model.RatingModel` (:meth:`UserSimulator.load`) or the
vLLM-served :class:`~persona_gym.simulator.served.ServedRatingModel`
(:func:`~persona_gym.simulator.served.load_served`), which see the same requests.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from persona_gym.artifacts import Artifacts, check_base_model, load_artifacts
from persona_gym.catalog import ItemCatalog
from persona_gym.simulator.adapter_names import BASE, adapter_of, variant_adapters
from persona_gym.simulator.adapters import attach_adapters, load_item_tokens
from persona_gym.simulator.memory import Interaction, logged_history, short_term_window
from persona_gym.simulator.prompts import PromptBuilder, PromptConfig, RatingRequest
from persona_gym.simulator.rating_model import RatingModel
from persona_gym.simulator.rating_prior import load_rating_priors
from persona_gym.simulator.retrieval import MemoryIndex


class RatingScorer(Protocol):
    """What scores a simulator's requests: a prompt builder, the adapters it holds, ``score``."""

    builder: PromptBuilder

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters (``"base"`` is always available)."""
        ...

    def score(self, requests: Sequence[RatingRequest]) -> np.ndarray:
        """``(len(requests), 5)`` probabilities of the ratings 1..5, in request order."""
        ...


class UserSimulator:
    """Simulated users backed by a rating model.

    Args:
        artifacts: the loaded artifacts directory.
        rating_model: the scorer with the artifacts' adapters (a local ``RatingModel`` or a
            served ``ServedRatingModel``).
        variant: which adapter rates a user: ``"persona"`` (the user's persona adapter),
            ``"base"`` (no adapter), or the name of one adapter for everyone (``"single-max"``).
    """

    def __init__(self, artifacts: Artifacts, rating_model: RatingScorer, variant: str = "persona"):
        self.artifacts = artifacts
        self.model = rating_model
        self.variant = variant
        self.index = MemoryIndex(artifacts.memories, artifacts.item_embeddings)
        self.prompt = rating_model.builder.config
        known = set(rating_model.adapters) | {BASE}
        if variant not in ("persona", "user") and variant not in known:
            raise ValueError(f"variant {variant!r}: no such adapter; available: {sorted(known)}")

    @classmethod
    def load(
        cls,
        artifacts_dir: str | Path,
        variant: str = "persona",
        base_model: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        prompt: PromptConfig | None = None,
        compile: bool = False,
    ) -> UserSimulator:
        """Load artifacts and the base model with the adapters the variant needs."""
        artifacts = load_artifacts(artifacts_dir)
        artifacts.require_variant(variant)  # every user has an adapter: fail here, not at a step
        adapters: dict[str, str | Path] = variant_adapters(variant, artifacts.adapter_dirs)
        model, tokenizer = load_model(artifacts, adapters, base_model, device, dtype)
        builder = PromptBuilder(tokenizer, artifacts.catalog, prompt or artifacts.prompt_config)
        if builder.config.layout == "sequence":
            from persona_gym.simulator.sequence import SequenceRatingModel

            return cls(
                artifacts,
                SequenceRatingModel.load(model, tokenizer, builder, artifacts, adapters),
                variant,
            )
        items = (
            load_item_tokens(adapters, artifacts.item_token_features(builder.config), device)
            if builder.config.item_tokens
            else None
        )
        priors = load_rating_priors(adapters) if builder.config.cf_prior else None
        rating_model = RatingModel(
            model, builder, compile=compile, item_tokens=items, priors=priors
        )
        return cls(artifacts, rating_model, variant)

    # -- the Rater protocol -------------------------------------------------------------------
    @property
    def source(self) -> str:
        return str(self.artifacts.root)

    @property
    def user_ids(self) -> list[int]:
        return self.artifacts.user_ids

    @property
    def training_user_ids(self) -> list[int]:
        return self.artifacts.training_user_ids

    @property
    def catalog(self) -> ItemCatalog:
        return self.artifacts.catalog

    @property
    def item_embeddings(self) -> np.ndarray:
        return self.artifacts.item_embeddings

    @property
    def window_size(self) -> int:
        return self.prompt.window_size

    def profile(self, user_id: int) -> str:
        return self.artifacts.profiles[int(user_id)]

    def persona(self, user_id: int) -> int:
        return int(self.artifacts.user_persona.get(int(user_id), -1))

    def adapter_of(self, user_id: int) -> str:
        """The adapter that rates ``user_id`` under this simulator's variant."""
        return adapter_of(self.variant, user_id, self.artifacts.user_persona)

    def history(self, user_id: int) -> tuple[Interaction, ...]:
        """The user's time-ordered training interactions (the logged history)."""
        return logged_history(self.artifacts.memories, user_id)

    def request(
        self, user_id: int, candidate: int, window: Sequence[Interaction] = (), gap: int = 0
    ) -> RatingRequest:
        """The rating request for one candidate, with retrieved memories and the user's adapter
        (``gap``: :attr:`RatingRequest.gap`)."""
        if user_id not in self.artifacts.profiles:
            raise KeyError(f"user {user_id} is not a simulated user of {self.artifacts.root}")
        if not 0 <= candidate < len(self.catalog):
            raise IndexError(
                f"candidate {candidate} is outside the catalogue (0..{len(self.catalog) - 1})"
            )
        memories = self.index.top_k(user_id, candidate, self.prompt.n_memories)
        window = short_term_window(tuple(window), self.prompt.window_size)
        adapter = self.adapter_of(user_id)
        prediction = surprise = None
        if self.prompt.cf_cue or self.prompt.surprise_cue:
            prediction, surprise = self.artifacts.require_collaborative().cues(
                user_id, candidate, window, self.artifacts.taste(user_id, adapter)
            )
        return RatingRequest(
            user_id=user_id,
            profile=self.artifacts.profiles[user_id],
            candidate=int(candidate),
            window=window,
            memories=tuple(m.text for m in memories),
            adapter=adapter,
            memory_items=tuple((m.item_index, m.rating) for m in memories),
            cf_prediction=prediction,
            surprise=surprise,
            gap=int(gap),
        )

    def rate(
        self,
        user_ids: Sequence[int],
        candidates: Sequence[int],
        windows: Sequence[Sequence[Interaction]] | None = None,
        gaps: Sequence[int] | None = None,
    ) -> np.ndarray:
        """``(n, 5)`` rating distributions, one per ``(user, candidate, window)``, in one call;
        ``gaps``: the user's interactions between each window and its candidate (default 0:
        the candidate follows the window, as in an episode)."""
        windows = windows if windows is not None else [()] * len(user_ids)
        gaps = gaps if gaps is not None else [0] * len(user_ids)
        requests = [
            self.request(int(u), int(c), w, int(g))
            for u, c, w, g in zip(user_ids, candidates, windows, gaps, strict=True)
        ]
        return self.model.score(requests)


def load_model(
    artifacts: Artifacts,
    adapters: Mapping[str, str | Path],
    base_model: str | None = None,
    device: str = "cpu",
    dtype: str = "auto",
):
    """The artifacts' base model (checked against the manifest) with ``adapters`` attached,
    and its tokenizer. ``base_model`` None = the one the adapters were trained on."""
    from persona_gym.assets import DEFAULT_SLM, load_causal_lm, resolve_model

    name = base_model or artifacts.manifest.get("training", {}).get("base_model", DEFAULT_SLM)
    check_base_model(artifacts.manifest, resolve_model(name))
    model, tokenizer = load_causal_lm(name, device=device, dtype=dtype)
    return attach_adapters(model, adapters).to(device), tokenizer
