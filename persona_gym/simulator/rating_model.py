"""The rating model: a causal LM plus named persona LoRA adapters → P(rating = 1..5).

``score`` reads the rating distribution from ONE forward pass: the next-token logits of the
prompt's last token, restricted to the tokens "1".."5" and renormalised. Requests are grouped
by adapter (each adapter runs once per call). Each user's static prefix (system prompt and
profile) is run once per adapter and its keys/values cached (``engine.encode_prefixes``, kept
in a :class:`~.prefix_cache.PrefixCache` bounded by ``max_cache_bytes``); a rating then costs
only its block's tokens (``engine.score_blocks``). Blocks of one user that start alike
(candidates rated in the same state: same window, different movies) share that start in one
row and compute it once (``engine.share_rows``); rows are batched under a token budget
(:meth:`RatingModel._budget`).

``generate`` is the paper's generative mode (sample a few tokens at temperature 0.3 and parse the
rating, :func:`parse_rating`), kept for comparison: a response without a number in 1..5 counts
as unrelated (URR).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from persona_gym.ratings import MAX_RATING, MIN_RATING, N_LEVELS
from persona_gym.simulator.adapter_names import BASE
from persona_gym.simulator.adapters import ITEM_TOKENS_FILE
from persona_gym.simulator.engine import (
    ItemTokens,
    LayeredLM,
    encode_prefixes,
    score_blocks,
    share_rows,
)
from persona_gym.simulator.prefix_cache import PrefixCache
from persona_gym.simulator.prompts import PromptBuilder, RatingRequest
from persona_gym.simulator.rating_prior import PRIOR_FILE, RatingPrior

log = logging.getLogger(__name__)

__all__ = ["GenerationResult", "RatingModel", "parse_rating"]

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
T = TypeVar("T")


@dataclass(frozen=True)
class GenerationResult:
    """Paper-style generated ratings: ``ratings`` is NaN where the response was unrelated."""

    ratings: np.ndarray
    texts: list[str]

    @property
    def unrelated_rate(self) -> float:
        return float(np.isnan(self.ratings).mean()) if len(self.ratings) else 0.0


class RatingModel:
    """A base causal LM with named LoRA adapters that rates movies for simulated users.

    Args:
        model: a ``transformers`` causal LM, or a ``peft.PeftModel`` holding the adapters.
        builder: the prompt builder (tokenizer, catalogue, prompt config).
        max_batch_tokens: padded tokens per forward pass (bounds memory).
        max_cache_bytes: memory bound of the prefix key/value cache (least recently used evicted).
        compile: run the decoder layers through ``torch.compile`` (faster after a warm-up).
        layered: an existing ``LayeredLM`` of ``model`` to share (its compiled kernels too).
        item_tokens: each adapter's :class:`ItemTokens` (:func:`load_item_tokens`), needed when
            the prompt config has ``item_tokens``.
        priors: each adapter's collaborative :class:`~persona_gym.simulator.rating_prior.RatingPrior`
            (:func:`~persona_gym.simulator.rating_prior.load_rating_priors`), needed when the prompt
            config has ``cf_prior``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        builder: PromptBuilder,
        max_batch_tokens: int = 8192,
        max_cache_bytes: int = 2 << 30,
        compile: bool = False,
        layered: LayeredLM | None = None,
        item_tokens: dict[str, ItemTokens] | None = None,
        priors: dict[str, RatingPrior] | None = None,
    ):
        self.model: Any = model.eval()  # a transformers / peft model (attributes by name)
        self.builder = builder
        self.tokenizer: Any = builder.tokenizer
        self.layered = layered or LayeredLM(
            model,
            builder.rating_token_ids,
            compile=compile,
            placeholder_id=builder.item_placeholder_id,
        )
        self.item_tokens = item_tokens or {}
        self.priors = priors or {}
        for needed, per_adapter, what, file, them in (
            (
                builder.config.item_tokens,
                self.item_tokens,
                "item tokens",
                ITEM_TOKENS_FILE,
                "them",
            ),
            (
                builder.config.cf_prior,
                self.priors,
                "a collaborative prior",
                PRIOR_FILE,
                "it",
            ),
        ):
            missing = sorted(set(self.adapters) - set(per_adapter)) if needed else []
            if missing:
                raise ValueError(
                    f"the prompt uses {what} but adapters {missing} have no {file}: "
                    f"train them with `persona-gym train` (the shipped recipe has {them})"
                )
        self.max_batch_tokens = max_batch_tokens
        self.cache = PrefixCache(max_cache_bytes)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        self.tokens_processed = 0  # running count of real tokens through the model (benchmarks)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def adapters(self) -> list[str]:
        """Names of the loaded adapters (``"base"`` is always available)."""
        return sorted(getattr(self.model, "peft_config", {}).keys())

    def _adapter_context(self, name: str) -> AbstractContextManager[Any]:
        if name == BASE:
            if hasattr(self.model, "disable_adapter"):
                return self.model.disable_adapter()
            return nullcontext()
        if name not in self.adapters:
            raise KeyError(f"adapter {name!r} is not loaded; loaded: {self.adapters + [BASE]}")
        self.model.set_adapter(name)
        return nullcontext()

    # -- exact scoring ----------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, requests: Sequence[RatingRequest]) -> np.ndarray:
        """``(len(requests), 5)`` probabilities of the ratings 1..5, in request order."""
        return self.score_logits(requests).softmax(-1).double().numpy()

    def score_logits(self, requests: Sequence[RatingRequest]) -> torch.Tensor:
        """``(len(requests), 5)`` rating logits (float32, CPU), in request order."""
        out = torch.empty((len(requests), N_LEVELS), dtype=torch.float32)
        groups: dict[str, list[tuple[int, tuple[int, ...], list[int]]]] = defaultdict(list)
        for index, request in enumerate(requests):
            prefix_ids, block_ids = self.builder.segments(request)
            groups[request.adapter].append((index, tuple(prefix_ids), block_ids))
        for adapter, items in groups.items():
            if self.builder.config.item_tokens and adapter not in self.item_tokens:
                raise ValueError(
                    f"adapter {adapter!r} has no item projection: item-token prompts "
                    "need adapters trained with `persona-gym train` (the shipped recipe has them)"
                )
            self.layered.items = self.item_tokens.get(adapter)
            with self._adapter_context(adapter):
                kv = self.cache.get_or_encode(
                    adapter, {prefix for _, prefix, _ in items}, self._encode
                )
                by_prefix: dict[tuple[int, ...], list] = defaultdict(list)
                for index, prefix, block in items:
                    by_prefix[prefix].append((index, block))
                rows = [
                    (prefix, row)
                    for prefix, blocks in by_prefix.items()
                    for row in share_rows([b for _, b in blocks], [i for i, _ in blocks])
                ]
                rows.sort(key=lambda r: r[1].width)  # similar widths share a batch
                for chunk in self._budget(rows, lambda r: r[1].width):
                    logits = score_blocks(
                        self.layered,
                        [kv[p] for p, _ in chunk],
                        [row.segments() for _, row in chunk],
                        self.pad_id,
                        self.device,
                    )
                    out[[i for _, row in chunk for i in row.keys]] = logits.cpu()
                    self.tokens_processed += sum(row.width for _, row in chunk)
            if self.builder.config.cf_prior:
                if adapter not in self.priors:
                    raise ValueError(
                        f"adapter {adapter!r} has no collaborative prior: prompts with "
                        "cf_prior need adapters trained with `persona-gym train` (the shipped recipe has it)"
                    )
                positions = [i for i, _, _ in items]
                predictions = torch.tensor([requests[i].cf_prediction for i in positions])
                surprises = torch.tensor([requests[i].surprise or 0.0 for i in positions])
                out[positions] = self.priors[adapter](out[positions], predictions, surprises)
        return out

    def _encode(self, prefixes: list[tuple[int, ...]]) -> list:
        """Keys/values of prefixes under the active adapter, in token-budgeted batches."""
        out = []
        for chunk in self._budget(prefixes, len):
            out += encode_prefixes(self.layered, chunk, self.pad_id, self.device)
            self.tokens_processed += sum(len(p) for p in chunk)
        return out

    def _budget(self, items: list[T], length: Callable[[T], int]) -> list[list[T]]:
        """Split length-sorted ``items`` into batches of at most ``max_batch_tokens`` padded
        tokens, a quarter of them padding at most (a few long rows go to a batch of their own
        rather than pad every row of a large batch to their length)."""
        batches: list[list[T]] = []
        batch: list[T] = []
        real = 0
        for item in items:
            n = length(item)
            padded = n * (len(batch) + 1)
            if batch and (padded > self.max_batch_tokens or padded > 1.25 * (real + n)):
                batches.append(batch)
                batch, real = [], 0
            batch.append(item)
            real += n
        if batch:
            batches.append(batch)
        return batches

    # -- paper-style generation -------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        requests: Sequence[RatingRequest],
        seed: int = 0,
        temperature: float = 0.3,
        top_p: float = 0.9,
        max_new_tokens: int = 4,
    ) -> GenerationResult:
        """Sample a short answer per request and parse its rating (the paper's way)."""
        if self.builder.config.item_tokens:
            raise ValueError(
                "paper-style generation needs text prompts; item_tokens prompts hold "
                "soft tokens (use score)"
            )
        ratings, texts = np.full(len(requests), np.nan), []
        generator_seed = seed
        for index, request in enumerate(requests):
            ids = torch.tensor([self.builder.full_ids(request)], device=self.device)
            torch.manual_seed(generator_seed + index)
            with self._adapter_context(request.adapter):
                output = self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    do_sample=True,
                    temperature=temperature,
                    top_p=top_p,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=self.pad_id,
                )
            self.tokens_processed += ids.shape[1] + max_new_tokens
            text = self.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
            texts.append(text)
            ratings[index] = parse_rating(text)
        return GenerationResult(ratings, texts)


def parse_rating(text: str) -> float:
    """The rating in a generated answer: its first number, rounded half up, if within 1..5;
    NaN (an unrelated response) otherwise.

    Rounding matters with ``crowd_cue`` prompts: the model answers in the cue's format
    (``" 3.6"``), and taking the first digit would read 3.
    """
    match = _NUMBER.search(text)
    if not match:
        return float("nan")
    value = float(match.group())
    return float(np.floor(value + 0.5)) if MIN_RATING <= value <= MAX_RATING else float("nan")
