"""The rating model: a causal LM plus named persona LoRA adapters → P(rating = 1..5).

``score`` reads the rating distribution from ONE forward pass: the next-token logits of the
prompt's last token, restricted to the tokens "1".."5" and renormalised. Requests are grouped
by adapter (each adapter runs once per call) and by user (the user's prefix is packed once with
all of that user's candidates, see ``engine.pack``).

``generate`` is the paper's generative mode (sample a few tokens at temperature 0.3 and parse a
digit), kept for comparison: a response without a digit 1-5 counts as unrelated (URR).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from persona_gym.simulator.engine import LayeredLM, pack
from persona_gym.simulator.prompts import PromptBuilder, RatingRequest

log = logging.getLogger(__name__)

BASE = "base"
RATINGS = np.arange(1, 6, dtype=np.float64)
_DIGIT = re.compile(r"[1-5]")


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
        max_sequence_tokens: a packed sequence (one prefix + its blocks) is split beyond this.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        builder: PromptBuilder,
        max_batch_tokens: int = 8192,
        max_sequence_tokens: int = 1024,
    ):
        self.model = model.eval()
        self.builder = builder
        self.tokenizer = builder.tokenizer
        self.layered = LayeredLM(model, builder.rating_token_ids)
        self.max_batch_tokens = max_batch_tokens
        self.max_sequence_tokens = max_sequence_tokens
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

    @classmethod
    def load(
        cls,
        base_model: str,
        adapters: dict[str, str | Path],
        builder_factory,
        device: str = "cpu",
        dtype: str = "float32",
        **kwargs,
    ) -> RatingModel:
        """Load a base model by name/path and attach ``{name: adapter_folder}``.

        ``builder_factory(tokenizer) -> PromptBuilder`` builds the prompts for that tokenizer.
        """
        from persona_gym.assets import load_causal_lm

        model, tokenizer = load_causal_lm(base_model, device=device, dtype=dtype)
        model = attach_adapters(model, adapters)
        return cls(model.to(device), builder_factory(tokenizer), **kwargs)

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
        groups: dict[str, dict[tuple[int, ...], list[tuple[int, list[int]]]]] = defaultdict(dict)
        for index, request in enumerate(requests):
            prefix, block = self.builder.segments(request)
            groups[request.adapter].setdefault(tuple(prefix), []).append((index, block))
        for adapter, by_prefix in groups.items():
            sequences = self._sequences(by_prefix)
            with self._adapter_context(adapter):
                for batch in self._batches(sequences):
                    packed = pack([(p, [b for _, b in blocks]) for p, blocks in batch], self.pad_id)
                    logits = self.layered.forward(packed.to(self.device)).cpu()
                    self.tokens_processed += packed.n_tokens
                    order = [i for _, blocks in batch for i, _ in blocks]
                    out[order] = logits
        return out

    def _sequences(self, by_prefix) -> list[tuple[list[int], list[tuple[int, list[int]]]]]:
        """One packed sequence per prefix, split where it would exceed ``max_sequence_tokens``."""
        sequences = []
        for prefix, blocks in by_prefix.items():
            current, length = [], len(prefix)
            for index, block in blocks:
                if current and length + len(block) > self.max_sequence_tokens:
                    sequences.append((list(prefix), current))
                    current, length = [], len(prefix)
                current.append((index, block))
                length += len(block)
            sequences.append((list(prefix), current))
        return sequences

    def _batches(self, sequences):
        """Sequences sorted by length, grouped so padded tokens stay under ``max_batch_tokens``."""
        def length(seq):
            return len(seq[0]) + sum(len(b) for _, b in seq[1])

        ordered = sorted(sequences, key=length)
        batch: list = []
        for seq in ordered:
            width = length(seq)  # sorted ascending: the newest is the widest
            if batch and width * (len(batch) + 1) > self.max_batch_tokens:
                yield batch
                batch = []
            batch.append(seq)
        if batch:
            yield batch

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
        """Sample a short answer per request and parse its first digit 1-5 (the paper's way)."""
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
            match = _DIGIT.search(text)
            if match:
                ratings[index] = float(match.group())
        return GenerationResult(ratings, texts)


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
