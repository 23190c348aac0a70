"""The rating model: a causal LM plus named persona LoRA adapters → P(rating = 1..5).

``score`` reads the rating distribution from ONE forward pass: the next-token logits of the
prompt's last token, restricted to the tokens "1".."5" and renormalised. Requests are grouped
by adapter (each adapter runs once per call). Each user's static prefix (system prompt and
profile) is run once per adapter and its keys/values cached (``engine.encode_prefixes``); a
rating then costs only its block's tokens (``engine.score_blocks``). Blocks of one user that start
alike (candidates rated in the same state: same window, different movies) share that start in
one row and compute it once (``engine.share_rows``). The cache is an LRU bounded by
``max_cache_bytes``.

``generate`` is the paper's generative mode (sample a few tokens at temperature 0.3 and parse the
rating, :func:`parse_rating`), kept for comparison: a response without a number in 1..5 counts
as unrelated (URR).
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from persona_gym.simulator.engine import (
    ItemTokens,
    LayeredLM,
    PrefixKV,
    encode_prefixes,
    score_blocks,
    share_rows,
)
from persona_gym.simulator.prompts import PromptBuilder, RatingRequest

log = logging.getLogger(__name__)

BASE = "base"
RATINGS = np.arange(1, 6, dtype=np.float64)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
ITEM_TOKENS_FILE = "item_tokens.pt"  # an adapter's item projection (item_tokens prompts)


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
    ):
        self.model = model.eval()
        self.builder = builder
        self.tokenizer = builder.tokenizer
        self.layered = layered or LayeredLM(model, builder.rating_token_ids, compile=compile,
                                            placeholder_id=builder.item_placeholder_id)
        self.item_tokens = item_tokens or {}
        if builder.config.item_tokens:
            missing = sorted(set(self.adapters) - set(self.item_tokens))
            if missing:
                raise ValueError(f"the prompt uses item tokens but adapters {missing} have no "
                                 f"{ITEM_TOKENS_FILE}: train them with `persona-gym train --item-tokens`")
        self.max_batch_tokens = max_batch_tokens
        self.max_cache_bytes = max_cache_bytes
        self._cache: OrderedDict[tuple[str, tuple[int, ...]], PrefixKV] = OrderedDict()
        self._cache_bytes = 0
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

    def _adapter_context(self, name: str):
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
        out = torch.empty((len(requests), 5), dtype=torch.float32)
        groups: dict[str, list[tuple[int, tuple[int, ...], list[int]]]] = defaultdict(list)
        for index, request in enumerate(requests):
            prefix, block = self.builder.segments(request)
            groups[request.adapter].append((index, tuple(prefix), block))
        for adapter, items in groups.items():
            if self.builder.config.item_tokens and adapter not in self.item_tokens:
                raise ValueError(f"adapter {adapter!r} has no item projection: item-token prompts "
                                 "need adapters trained with `persona-gym train --item-tokens`")
            self.layered.items = self.item_tokens.get(adapter)
            with self._adapter_context(adapter):
                kv = self._prefix_kv(adapter, {prefix for _, prefix, _ in items})
                by_prefix: dict[tuple[int, ...], list] = defaultdict(list)
                for index, prefix, block in items:
                    by_prefix[prefix].append((index, block))
                rows = [(prefix, row) for prefix, blocks in by_prefix.items()
                        for row in share_rows([b for _, b in blocks], [i for i, _ in blocks])]
                rows.sort(key=lambda r: r[1].width)  # similar widths share a batch
                for chunk in self._budget(rows, lambda r: r[1].width):
                    logits = score_blocks(self.layered, [kv[p] for p, _ in chunk],
                                          [row.segments() for _, row in chunk], self.pad_id, self.device)
                    out[[i for _, row in chunk for i in row.keys]] = logits.cpu()
                    self.tokens_processed += sum(row.width for _, row in chunk)
        return out

    def _prefix_kv(self, adapter: str, prefixes: set[tuple[int, ...]]) -> dict:
        """Cached keys/values of each prefix under ``adapter``; missing ones are computed."""
        missing = sorted((p for p in prefixes if (adapter, p) not in self._cache), key=len)
        for chunk in self._budget(missing, len):
            for prefix, kv in zip(chunk, encode_prefixes(self.layered, chunk, self.pad_id, self.device),
                                  strict=True):
                self._cache[(adapter, prefix)] = kv
                self._cache_bytes += kv.nbytes
                self.tokens_processed += len(prefix)
        found = {}
        for prefix in prefixes:
            self._cache.move_to_end((adapter, prefix))
            found[prefix] = self._cache[(adapter, prefix)]
        while self._cache_bytes > self.max_cache_bytes and len(self._cache) > len(prefixes):
            _, evicted = self._cache.popitem(last=False)  # least recently used
            self._cache_bytes -= evicted.nbytes
        return found

    def clear_cache(self) -> None:
        """Forget cached prefixes (needed only if adapter weights change in place)."""
        self._cache.clear()
        self._cache_bytes = 0

    def _budget(self, items: list, length) -> list[list]:
        """Split length-sorted ``items`` into batches of at most ``max_batch_tokens`` padded
        tokens, a quarter of them padding at most (a few long rows go to a batch of their own
        rather than pad every row of a large batch to their length)."""
        batches, batch, real = [], [], 0
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

    # -- derived predictions ----------------------------------------------------------------
    @staticmethod
    def expected(probs: np.ndarray) -> np.ndarray:
        """Expected rating of each distribution."""
        return np.asarray(probs) @ RATINGS

    @staticmethod
    def mode(probs: np.ndarray) -> np.ndarray:
        """Most likely rating of each distribution."""
        return np.asarray(probs).argmax(-1) + 1.0

    @staticmethod
    def sample(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One rating drawn from each distribution with ``rng`` (same rng state, same draws)."""
        probs = np.asarray(probs)
        cdf = probs.cumsum(-1)
        u = rng.random(len(probs)) * cdf[:, -1]
        return (u[:, None] >= cdf).sum(-1).clip(0, 4) + 1.0

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
            raise ValueError("paper-style generation needs text prompts; item_tokens prompts hold "
                             "soft tokens (use score)")
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
    return float(np.floor(value + 0.5)) if 1.0 <= value <= 5.0 else float("nan")


def save_item_tokens(items: ItemTokens, folder: str | Path) -> None:
    """Write an adapter's item projection next to its LoRA weights."""
    state = {"layer": items.layer, "weight": items.proj.weight.detach().cpu().clone(),
             "bias": items.proj.bias.detach().cpu().clone()}
    torch.save(state, Path(folder) / ITEM_TOKENS_FILE)


def load_item_tokens(adapters: dict[str, str | Path], embeddings: np.ndarray,
                     device: torch.device | str = "cpu") -> dict[str, ItemTokens]:
    """Each ``{name: folder}`` adapter's :class:`ItemTokens` over the artifacts' item embeddings,
    on ``device``."""
    out = {}
    for name, folder in adapters.items():
        path = Path(folder) / ITEM_TOKENS_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: adapter {name!r} was trained without "
                                    "item tokens; retrain with `persona-gym train --item-tokens`")
        state = torch.load(path, weights_only=True)
        if state["weight"].shape[1] != embeddings.shape[1]:
            raise ValueError(f"{path}: projects {state['weight'].shape[1]}-d item embeddings but the "
                             f"artifacts' are {embeddings.shape[1]}-d")
        items = ItemTokens(embeddings, state["weight"].shape[0], state["layer"])
        items.proj.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
        out[name] = items.to(device).eval()
    return out


def attach_adapters(model: torch.nn.Module, adapters: dict[str, str | Path]) -> torch.nn.Module:
    """Wrap ``model`` in a ``PeftModel`` holding each ``{name: folder}`` adapter (eval mode)."""
    if not adapters:
        return model
    from peft import PeftModel

    peft_model = None
    for name, folder in adapters.items():
        if name == BASE:
            raise ValueError(f"'{BASE}' is reserved for the model without adapter; rename it")
        folder = Path(folder)
        if not (folder / "adapter_config.json").exists():
            raise FileNotFoundError(
                f"adapter {name!r}: {folder} has no adapter_config.json; train it with "
                "`persona-gym train` or point the manifest at the right folder"
            )
        if peft_model is None:
            peft_model = PeftModel.from_pretrained(model, folder, adapter_name=name)
        else:
            peft_model.load_adapter(folder, adapter_name=name)
    return peft_model.eval()
