"""The rating prompt, built one way for training, evaluation and the environment.

A prompt is two token segments:

* the **prefix**: the system turn, the user's profile ``Ms`` followed by the rating task (static
  per user, so it can be computed once and shared by every candidate the user rates);
* the **block**: one user turn holding the short-term window, the retrieved ``Ml`` memories and
  the candidate movie, then the assistant cue and, with ``crowd_cue``, the start of the answer:
  ``"Viewers' average: 3.8. My rating:"``. The rating is read from the next-token logits of
  the block's last token, restricted to the tokens "1".."5".

Why the answer starts with the crowd's average: a small LM attends to what is next to the
answer. With the average only inside the user turn, adapters trained on SmolLM2-135M learned
each user's level and ignored the movie; with it right before the answer, even the untuned
model's prediction follows the movie (the probe: benchmarks/README.md).

With a chat template the segments are exactly the template's rendering of
``[system, user]`` split at the user turn; without one, a plain ``system / user / RATING:`` layout is used.

With ``item_tokens`` (the compact mode) every movie in the block (window, memories, candidate)
is ONE soft token instead of its ~15-token title: the block holds id ``-(i + 1)`` for catalogue
item ``i`` and the engine replaces it by a learned projection of the item's text embedding
(``engine.ItemTokens``, trained with each adapter). The layout puts what depends on the
candidate last, so that candidates scored in the same state share everything before it: the
user turn holds only the window, and the answer starts with the candidate's part::

    <user turn> Recently rated:<item>4;<item>5;<item>3 <assistant turn> Memory:<item>5 Movie:<item> Average:3.8 Rating:

With SmolLM2 that is 20 state tokens and 14 candidate tokens (~34 in all, against ~136 for the
text block), and ranking 20 candidates in one state costs ~15 tokens each: 14 and a share of
the state (``RatingModel.score`` computes the common start of their blocks once).

Token budget (``max_tokens`` for prefix + block): when a prompt is too long, memories are dropped
first (least similar first), then the oldest window entries, then the profile is cut from its end.
The candidate is never cut.

Data text is never trusted (:func:`clean_field`): in titles, genres, profiles and memories,
control characters (newlines, tabs, ...) become spaces, so a field cannot add prompt lines, and
the tokenizer's special tokens are broken up (``<|im_end|>`` becomes the text ``< |im_end|>``),
so a field cannot open or close a chat turn. Each field is cut to its :data:`FIELD_LIMITS`
length. Ordinary text passes unchanged: prompts are byte-identical to those the shipped adapters
were trained on.
"""

from __future__ import annotations

import dataclasses
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from persona_gym.catalog import ItemCatalog
from persona_gym.ratings import RATING_TOKENS
from persona_gym.simulator.memory import Interaction, format_window
from persona_gym.simulator.prompt_config import PromptConfig

ITEM_MARK = "\ue000"  # stands for an item token in block text (a private-use character)
TASK = "Rate this movie from 1 (hated it) to 5 (loved it). Answer with one digit."
# Longest text (characters) of each data field a prompt shows; a longer one is cut and ends with
# "…". They never bind on MovieLens data (longest title 81 characters, distilled profiles under
# 1,000 and memories under 400) and keep a broken or hostile field from flooding the token
# budget, where the candidate's line is never cut.
FIELD_LIMITS = {"title": 200, "genre": 40, "profile": 2000, "memory": 1000}
_BLANKED = {"Cc", "Zl", "Zp"}  # control characters, line and paragraph separators


def special_token_strings(tokenizer) -> tuple[str, ...]:
    """The texts a tokenizer turns into special tokens (``<|im_start|>``, ``<|endoftext|>`` ...)."""
    found = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False):
            found.add(str(token.content))
    return tuple(sorted((t for t in found if len(t) > 1), key=len, reverse=True))


def clean_field(text: str, limit: int, special_tokens: Sequence[str] = ()) -> str:
    """Data text made safe to put in a prompt; the identity for ordinary text.

    Control characters and line separators become spaces; each of ``special_tokens`` found in
    the text gets a space after its first character, so it stays text (``<|im_end|>`` →
    ``< |im_end|>``); the private-use character that stands for item tokens becomes a space; the
    result is cut to ``limit`` characters (the last one ``"…"``).
    """
    if not (text.isprintable() and "<" not in text):
        text = "".join(
            " " if ch == ITEM_MARK or unicodedata.category(ch) in _BLANKED else ch for ch in text
        )
        changed = True
        while changed:  # a replacement can complete another token ("<|im_<|x|>end|>")
            changed = False
            for token in special_tokens:
                if token in text:
                    text = text.replace(token, f"{token[0]} {token[1:]}")
                    changed = True
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


@dataclass(frozen=True)
class RatingRequest:
    """One rating to predict: which user, which candidate, with what memories and adapter.

    ``memories`` are the retrieved ``Ml`` texts, most similar first; ``memory_items`` the same
    memories as ``(item index, rating)`` (what an ``item_tokens`` prompt shows).
    ``adapter`` names a loaded LoRA adapter, or ``"base"`` for the plain model.
    """

    user_id: int
    profile: str
    candidate: int  # catalogue index
    window: tuple[Interaction, ...] = ()
    memories: tuple[str, ...] = ()
    adapter: str = "base"
    memory_items: tuple[tuple[int, float], ...] = ()  # (item index, rating) of each memory
    cf_prediction: float | None = None  # the collaborative model's rating of the candidate
    surprise: float | None = None  # mean of (rating - collaborative prediction) over the window
    # the user's interactions between the window and the candidate (0: the candidate follows the
    # window, as in an episode); only the sequence user model reads it
    gap: int = 0


@dataclass
class PromptBuilder:
    """Turns requests into token segments with a tokenizer's chat template."""

    tokenizer: Any  # a transformers tokenizer
    catalog: ItemCatalog
    config: PromptConfig = field(default_factory=PromptConfig)

    def __post_init__(self) -> None:
        self.rating_token_ids = rating_token_ids(self.tokenizer)
        # what the frozen lower layers see where an item token goes
        self.item_placeholder_id = self._encode(" movie")[-1]
        self._chat = bool(getattr(self.tokenizer, "chat_template", None))
        self._prefix_cache: dict[str, list[int]] = {}
        self._special = special_token_strings(self.tokenizer)
        self.text_catalog = self._clean_catalog(self.catalog)

    def _clean_catalog(self, catalog: ItemCatalog) -> ItemCatalog:
        """The catalogue with its titles and genres passed through :func:`clean_field` (the
        same object when nothing changes)."""
        titles = tuple(clean_field(t, FIELD_LIMITS["title"], self._special) for t in catalog.titles)
        genres = tuple(
            tuple(clean_field(g, FIELD_LIMITS["genre"], self._special) for g in gs)
            for gs in catalog.genres
        )
        if titles == catalog.titles and genres == catalog.genres:
            return catalog
        return dataclasses.replace(catalog, titles=titles, genres=genres)

    def clean_profile(self, profile: str) -> str:
        """The profile as a prompt shows it (:func:`clean_field`)."""
        return clean_field(profile, FIELD_LIMITS["profile"], self._special)

    # -- text ---------------------------------------------------------------------------------
    def block_text(
        self, request: RatingRequest, window: Sequence[Interaction], memories: Sequence
    ) -> str:
        """The user-turn text for a candidate (with ``item_tokens``: the window only, an
        ``ITEM_MARK`` per movie; memories and candidate go to :meth:`answer_start`)."""
        surprise = self._surprise(request, window)
        if not self.config.item_tokens:
            catalog = self.text_catalog
            lines = [format_window(window, catalog) + surprise] if self.config.window_size else []
            lines += [
                f"Memory: {clean_field(memory, FIELD_LIMITS['memory'], self._special)}"
                for memory in memories
            ]
            lines.append(f"Movie: {catalog.describe(request.candidate)}")
            return "\n".join(lines)
        # no spaces around item tokens: SmolLM2-style tokenizers spend a token on each
        if not self.config.window_size:
            return "Rate the next movie."
        return (
            "Recently rated:"
            + (";".join(f"{ITEM_MARK}{x.rating:g}" for x in window) or " nothing yet")
            + surprise
        )

    def _surprise(self, request: RatingRequest, window: Sequence[Interaction]) -> str:
        if not self.config.surprise_cue or not window:
            return ""
        if request.surprise is None:
            raise ValueError("the prompt has surprise_cue but the request carries no surprise")
        return f" Surprise:{request.surprise:+.1f}"

    def _prediction(self, request: RatingRequest) -> str:
        if not self.config.cf_cue:
            return ""
        if request.cf_prediction is None:
            raise ValueError("the prompt has cf_cue but the request carries no cf_prediction")
        return f"Predicted:{request.cf_prediction:.1f}"

    @staticmethod
    def block_items(
        request: RatingRequest, window: Sequence[Interaction], memories: Sequence
    ) -> list[int]:
        """Catalogue indices of the movies an ``item_tokens`` block shows, in text order."""
        return [x.item_index for x in window] + [int(i) for i, _ in memories] + [request.candidate]

    def system_text(self, profile: str) -> str:
        """The system turn: the profile (when used, cleaned) and the rating task."""
        profile = self.clean_profile(profile)
        return f"{profile}\n{TASK}" if self.config.use_profile and profile else TASK

    def answer_start(self, request: RatingRequest, memories: Sequence = ()) -> str:
        """Text after the assistant cue: the crowd's average when ``crowd_cue`` and the
        collaborative prediction when ``cf_cue``, else nothing; with ``item_tokens`` the
        candidate's part of the block (memories, movie, average, prediction)."""
        candidate = request.candidate
        known = bool(self.catalog.n_ratings[candidate])
        predicted = self._prediction(request)
        if self.config.item_tokens:
            parts = [f"Memory:{ITEM_MARK}{rating:g}" for _, rating in memories] + [
                f"Movie:{ITEM_MARK}"
            ]
            if self.config.crowd_cue:
                parts.append(
                    f"Average:{self.catalog.mean_rating[candidate]:.1f}"
                    if known
                    else "Average:none"
                )
            return " ".join(parts + ([predicted] if predicted else []) + ["Rating:"])
        if not self.config.crowd_cue and not predicted:
            return ""
        parts = []
        if self.config.crowd_cue:
            average = f"{self.catalog.mean_rating[candidate]:.1f}" if known else "none"
            parts.append(f"Viewers' average: {average}.")
        if predicted:
            parts.append(predicted.replace(":", ": ") + ".")
        return " ".join(parts + ["My rating:"])

    def _render(self, system: str, user: str | None, answer: str = "") -> str:
        if not self._chat:
            text = f"{system}\n"
            return text if user is None else f"{text}{user}\n{answer or 'RATING:'}"
        messages = [{"role": "system", "content": system}]
        if user is None:
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        messages.append({"role": "user", "content": user})
        cue = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return cue + answer

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode_items(self, text: str, items: Sequence[int]) -> list[int]:
        """Token ids of ``text`` with each ``ITEM_MARK`` replaced by item id ``-(item + 1)``."""
        pieces = text.split(ITEM_MARK)
        if len(pieces) != len(items) + 1:
            raise ValueError(f"block text has {len(pieces) - 1} item marks for {len(items)} items")
        ids = self._encode(pieces[0])
        for item, piece in zip(items, pieces[1:], strict=True):
            ids += [-(item + 1)] + self._encode(piece)
        return ids

    # -- tokens -------------------------------------------------------------------------------
    def prefix_ids(self, profile: str) -> list[int]:
        """Token ids of the static per-user prefix (cached by profile text)."""
        system = self.system_text(profile)
        ids = self._prefix_cache.get(system)
        if ids is None:
            ids = self._encode(self._render(system, None))
            self._prefix_cache[system] = ids
        return ids

    def block_ids(self, request: RatingRequest) -> list[int]:
        """Token ids of the candidate block, budget applied (see module docstring)."""
        prefix = self.prefix_ids(request.profile)
        system = self.system_text(request.profile)
        system_text = self._render(system, None)
        window = list(request.window[-self.config.window_size :]) if self.config.window_size else []
        memories = list(
            (request.memory_items if self.config.item_tokens else request.memories)[
                : self.config.n_memories
            ]
        )
        while True:
            full = self._render(
                system,
                self.block_text(request, window, memories),
                self.answer_start(request, memories),
            )
            text = full[len(system_text) :]
            if self.config.item_tokens:
                block = self._encode_items(text, self.block_items(request, window, memories))
            else:
                block = self._encode(text)
            if len(prefix) + len(block) <= self.config.max_tokens:
                return block
            if memories:
                memories.pop()
            elif window:
                window.pop(0)
            else:
                return block  # the profile is cut in segments()

    def segments(self, request: RatingRequest) -> tuple[list[int], list[int]]:
        """``(prefix_ids, block_ids)`` for a request, together within ``max_tokens``."""
        prefix = self.prefix_ids(request.profile)
        block = self.block_ids(request)
        budget = self.config.max_tokens - len(block)
        if len(prefix) > budget:
            prefix = self._cut_profile(self.clean_profile(request.profile), budget)
        return prefix, block

    def _cut_profile(self, profile: str, budget: int) -> list[int]:
        """Prefix ids within ``budget`` tokens, the profile cut from its end."""
        profile_ids = self._encode(profile)
        keep = len(profile_ids)
        while True:
            system = self.system_text(self.tokenizer.decode(profile_ids[:keep]))
            ids = self._encode(self._render(system, None))
            excess = len(ids) - budget
            if excess <= 0 or keep == 0:
                return ids
            keep = max(0, keep - excess)

    def full_ids(self, request: RatingRequest) -> list[int]:
        """Prefix and block as one sequence (the plain, uncached path)."""
        prefix, block = self.segments(request)
        return prefix + block


def rating_token_ids(tokenizer) -> list[int]:
    """Ids of the single tokens "1".."5"; fail clearly when a rating is not one token."""
    ids = []
    for token in RATING_TOKENS:
        encoded = tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(encoded) != 1:
            raise ValueError(
                f"the tokenizer encodes the rating {token!r} as {len(encoded)} tokens {encoded}; "
                "persona-gym reads ratings from one forward pass and needs each of '1'..'5' to be "
                "a single token - use a model whose tokenizer splits digits (Llama, Qwen2, SmolLM2, Phi-3)"
            )
        ids.append(encoded[0])
    return ids
