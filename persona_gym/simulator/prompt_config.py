"""What goes into a rating prompt: :class:`PromptConfig`, recorded in each manifest.

The prompt config is part of an artifacts directory's schema (``manifest.json["prompt"]``):
training writes it, the artifacts read it back, and the simulator builds its prompts with it
(:mod:`persona_gym.simulator.prompts`, whose module docstring describes the layout).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LAYOUTS", "LEGACY_PROMPT", "PAPER_PROMPT", "PromptConfig"]

LAYOUTS = ("block", "sequence")

# the paper's text prompt differs from the defaults (the shipped recipe) in these fields
PAPER_PROMPT: dict[str, object] = {
    "item_tokens": False,
    "cf_cue": False,
    "surprise_cue": False,
    "cf_items": False,
    "cf_prior": False,
    "persona_taste": 0.0,
}
# what a manifest written before a field existed meant by leaving it out
LEGACY_PROMPT: dict[str, object] = {**PAPER_PROMPT, "crowd_cue": False, "layout": "block"}


@dataclass(frozen=True)
class PromptConfig:
    """What goes into a prompt. The defaults are the shipped simulator's recipe (item tokens and
    the collaborative signal); :meth:`paper` is the paper's text prompt.

    Attributes:
        window_size: short-term window length ``k`` (0 disables the window).
        n_memories: retrieved ``Ml`` memories per prompt (0 disables retrieval).
        use_profile: include ``Ms`` as the system prompt.
        max_tokens: budget for prefix + block; see the module docstring for the cut order.
        crowd_cue: start the answer with the candidate's average rating (module docstring);
            artifacts trained before this option existed load with ``False``.
        item_tokens: each movie is one soft token (the compact mode; module docstring). Needs
            adapters trained with it (``persona-gym train``: the shipped recipe has them).
        cf_cue: the answer shows the collaborative model's prediction for the candidate
            (``Predicted:3.6``, :mod:`persona_gym.simulator.collaborative`).
        surprise_cue: the window shows how far the user's recent ratings fell from the
            collaborative predictions (``Surprise:+0.4``): the episode's mood.
        cf_items: item tokens carry the item's collaborative factors and bias next to its text
            embedding (with ``item_tokens``).
        cf_prior: the rating logits get a learned Gaussian prior around the collaborative
            prediction (with ``cf_cue``; ``persona_gym.simulator.rating_prior``).
        persona_taste: share ``s`` of a user's collaborative taste that their persona adapter
            owns (0..1, with ``cf_cue``): under persona ``k``'s adapter the prediction uses the
            user's MF factors moved a share ``s`` toward the persona's mean factors along the
            axes that separate the personas (:mod:`persona_gym.simulator.collaborative`); 0 = each user's
            own factors.
        layout: ``"block"``, the text prompt of :mod:`persona_gym.simulator.prompts`, or
            ``"sequence"``, the user as their rating sequence of soft tokens
            (:mod:`persona_gym.simulator.sequence`: ``2 window_size + 1`` tokens per rating on a
            static per-user prefix); artifacts trained before it existed load as ``"block"``.
        history: logged events in the sequence layout's static prefix.
    """

    window_size: int = 3
    n_memories: int = 1
    use_profile: bool = True
    max_tokens: int = 384
    crowd_cue: bool = True
    item_tokens: bool = True
    cf_cue: bool = True
    surprise_cue: bool = True
    cf_items: bool = True
    cf_prior: bool = True
    persona_taste: float = 0.75
    layout: str = "block"
    history: int = 32

    @classmethod
    def paper(cls, **fields: object) -> PromptConfig:
        """The paper's text prompt (profile, retrieved memory, window, crowd cue; no item
        tokens, no collaborative signal), with ``fields`` changed."""
        return cls(**{**PAPER_PROMPT, **fields})  # type: ignore[arg-type]

    @classmethod
    def of_manifest(cls, recorded: dict) -> PromptConfig:
        """The prompt a manifest records; a field it lacks (written before the field existed)
        takes the value that meant: :data:`LEGACY_PROMPT`."""
        return cls(**{**LEGACY_PROMPT, **recorded})

    def __post_init__(self) -> None:
        for name in ("window_size", "n_memories", "max_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"PromptConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.max_tokens < 64:
            raise ValueError(f"PromptConfig.max_tokens must be >= 64, got {self.max_tokens}")
        if self.cf_items and not self.item_tokens:
            raise ValueError(
                "PromptConfig.cf_items needs item_tokens=True (it shapes the item tokens)"
            )
        if self.cf_prior and not self.cf_cue:
            raise ValueError(
                "PromptConfig.cf_prior needs cf_cue=True (the prior is centred on that prediction)"
            )
        if self.layout not in LAYOUTS:
            raise ValueError(f"PromptConfig.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.history < 1:
            raise ValueError(f"PromptConfig.history must be >= 1, got {self.history}")
        if not 0.0 <= self.persona_taste <= 1.0:
            raise ValueError(
                f"PromptConfig.persona_taste must be in [0, 1], got {self.persona_taste}"
            )
        if self.persona_taste and not self.cf_cue:
            raise ValueError(
                "PromptConfig.persona_taste needs cf_cue=True (it moves that prediction)"
            )

    @property
    def uses_collaborative(self) -> bool:
        """Whether prompts need the artifacts' collaborative model."""
        return self.cf_cue or self.surprise_cue or self.cf_items
