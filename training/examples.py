"""Training data of the adapters: RAFT examples from the logged histories, their split into
adapters (θpersona, θsingle, θuser), the frozen lower layers' activations computed once, and
same-user chunks and batches."""

from __future__ import annotations

import logging
import zlib
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from persona_gym.assets import load_causal_lm, resolve_dtype
from persona_gym.simulator.collaborative import CollaborativeModel
from persona_gym.simulator.engine import LayeredLM, pack
from persona_gym.simulator.memory import logged_history, short_term_window
from persona_gym.simulator.prompts import RatingRequest
from persona_gym.simulator.retrieval import MemoryIndex

if TYPE_CHECKING:
    from training.train import TrainConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Example:
    """One training/validation prompt with its label."""

    user_id: int
    request: RatingRequest
    rating: int
    validation: bool


def build_examples(
    profiles: dict[int, str],
    memories,
    index: MemoryIndex,
    config: TrainConfig,
    collaborative: CollaborativeModel | None = None,
    tastes: dict[int, np.ndarray] | None = None,
) -> list[Example]:
    """RAFT examples from each user's time-ordered training interactions (Ml table).

    With collaborative cues in the prompt, ``collaborative`` gives them (out-of-fold for
    these logged interactions, see :mod:`persona_gym.simulator.collaborative`), under ``tastes[user]``
    (the user's factors moved toward their persona's, ``PromptConfig.persona_taste``) if given.
    """
    cued = config.prompt.cf_cue or config.prompt.surprise_cue
    if cued and collaborative is None:
        raise ValueError("the prompt has collaborative cues but no collaborative model was given")
    examples = []
    prompt = config.prompt
    for user_id in sorted(profiles):
        history = logged_history(memories, user_id)
        n_val = min(config.val_per_user, max(0, len(history) - 1))
        first_train = 0
        if config.max_examples_per_user:
            first_train = max(0, len(history) - n_val - config.max_examples_per_user)
        for position in range(first_train, len(history)):
            item = history[position]
            retrieved = index.top_k(user_id, item.item_index, prompt.n_memories)
            window = short_term_window(history, prompt.window_size, before=position)
            prediction, surprise = (
                collaborative.cues(user_id, item.item_index, window, (tastes or {}).get(user_id))
                if cued and collaborative is not None  # cued implies a model (checked above)
                else (None, None)
            )
            request = RatingRequest(
                user_id=user_id,
                profile=profiles[user_id],
                candidate=item.item_index,
                window=window,
                memories=tuple(m.text for m in retrieved),
                memory_items=tuple((m.item_index, m.rating) for m in retrieved),
                cf_prediction=prediction,
                surprise=surprise,
            )
            examples.append(
                Example(user_id, request, int(round(item.rating)), position >= len(history) - n_val)
            )
    return examples


class LowerCache:
    """Frozen lower-layer activations: one prefix per user, one block per example."""

    def __init__(self, prefix_ids, prefix_hidden, block_ids, block_hidden):
        self.prefix_ids: dict[int, list[int]] = prefix_ids
        self.prefix_hidden: dict[int, torch.Tensor] = prefix_hidden
        self.block_ids: list[list[int]] = block_ids
        self.block_hidden: list[torch.Tensor] = block_hidden

    @classmethod
    @torch.inference_mode()
    def compute(
        cls,
        examples,
        builder,
        layered: LayeredLM,
        split_layer: int,
        pad_id: int,
        blocks_per_sequence: int,
        progress: bool,
    ) -> LowerCache:
        prefix_ids: dict[int, list[int]] = {}
        prefix_hidden: dict[int, torch.Tensor] = {}
        block_ids: list[list[int]] = []
        block_hidden: list[torch.Tensor | None] = [None] * len(examples)
        by_user = defaultdict(list)
        for n, example in enumerate(examples):
            prefix, block = builder.segments(example.request)
            prefix_ids[example.user_id] = prefix
            block_ids.append(block)
            by_user[example.user_id].append(n)
        chunks = [
            (u, ns[i : i + blocks_per_sequence])
            for u, ns in by_user.items()
            for i in range(0, len(ns), blocks_per_sequence)
        ]
        for start in tqdm(range(0, len(chunks), 4), desc="frozen layers", disable=not progress):
            part = chunks[start : start + 4]
            packed = pack(
                [(prefix_ids[u], [block_ids[n] for n in ns]) for u, ns in part],
                pad_id,
                layered.device,
            )
            hidden = (
                layered.run_layers(layered.embed_tokens(packed), packed, 0, split_layer)
                .float()
                .cpu()
            )
            for row, (user, ns) in enumerate(part):
                p = len(prefix_ids[user])
                prefix_hidden.setdefault(user, hidden[row, :p].clone())
                offset = p
                for n in ns:
                    m = len(block_ids[n])
                    block_hidden[n] = hidden[row, offset : offset + m].clone()
                    offset += m
        return cls(prefix_ids, prefix_hidden, block_ids, block_hidden)

    def assemble(self, chunks: list[tuple[int, list[int]]], pad_id: int, device: torch.device):
        """Packed batch and its lower-layer hidden states for ``[(user, [example, ...]), ...]``,
        on ``device`` (the cache itself stays in CPU memory)."""
        packed = pack(
            [(self.prefix_ids[u], [self.block_ids[n] for n in ns]) for u, ns in chunks],
            pad_id,
            device,
        )
        width = packed.input_ids.shape[1]
        dim = next(iter(self.prefix_hidden.values())).shape[-1]
        hidden = torch.zeros(
            len(chunks), width, dim, dtype=next(iter(self.prefix_hidden.values())).dtype
        )
        for row, (user, ns) in enumerate(chunks):
            parts = [self.prefix_hidden[user]] + [self.block_hidden[n] for n in ns]
            joined = torch.cat(parts)
            hidden[row, : len(joined)] = joined
        return packed, hidden.to(device)

    def placeholder_mean(self, indices: list[int]) -> torch.Tensor:
        """Mean frozen-layer state at the item tokens of examples ``indices``."""
        states = [self.block_hidden[n][torch.tensor(self.block_ids[n]) < 0] for n in indices]
        return torch.cat(states).float().mean(0)

    def state(self) -> dict:
        return {
            "prefix_ids": self.prefix_ids,
            "prefix_hidden": self.prefix_hidden,
            "block_ids": self.block_ids,
            "block_hidden": self.block_hidden,
        }


def frozen_pass(
    examples,
    builder,
    layered: LayeredLM,
    config: TrainConfig,
    split_layer: int,
    pad_id: int,
    device: str,
    compile: bool,
    progress: bool,
) -> LowerCache:
    """The frozen lower layers' activations of every example, in ``config.lower_dtype`` (a
    second, low-precision copy of the base model when that is not float32)."""
    dtype = resolve_dtype(config.lower_dtype, device)
    lower = layered
    if dtype != "float32":
        model, _ = load_causal_lm(config.base_model, device=device, dtype=dtype)
        lower = LayeredLM(
            model,
            builder.rating_token_ids,
            compile=compile,
            placeholder_id=builder.item_placeholder_id,
        )
    log.info("frozen layers 0..%d in %s for %d examples", split_layer - 1, dtype, len(examples))
    return LowerCache.compute(
        examples, builder, lower, split_layer, pad_id, config.blocks_per_sequence, progress
    )


def adapter_datasets(
    examples: list[Example],
    user_persona: dict[int, int],
    config: TrainConfig,
) -> dict[str, tuple[list[int], list[int]]]:
    """``{adapter name: (train example indices, validation example indices)}`` per variant."""
    train_by_user: defaultdict[int, list[int]] = defaultdict(list)
    val_by_user: defaultdict[int, list[int]] = defaultdict(list)
    for n, example in enumerate(examples):
        (val_by_user if example.validation else train_by_user)[example.user_id].append(n)
    personas = sorted(set(user_persona.values()))
    sets: dict[str, tuple[list[int], list[int]]] = {}
    persona_sizes = {}
    for p in personas:
        users = [u for u in sorted(train_by_user) if user_persona.get(u) == p]
        train = [n for u in users for n in train_by_user[u]]
        val = [n for u in users for n in val_by_user[u]]
        persona_sizes[p] = len(train)
        if "persona" in config.variants:
            sets[f"persona-{p}"] = (train, val)
    all_val = [n for u in sorted(val_by_user) for n in val_by_user[u]]
    total = sum(len(v) for v in train_by_user.values())
    # θsingle: every user sub-sampled in proportion to their data, to a persona's size
    for variant, size in (
        ("single-max", max(persona_sizes.values(), default=0)),
        ("single-min", min(persona_sizes.values(), default=0)),
    ):
        if variant not in config.variants:
            continue
        rng = np.random.default_rng([config.seed, zlib.crc32(variant.encode())])
        users = sorted(train_by_user)
        quotas = (
            np.array([size * len(train_by_user[u]) / total for u in users])
            if total
            else np.zeros(0)
        )
        keep = np.floor(quotas).astype(int)
        # largest remainders get the leftover examples, so the total matches `size` exactly
        for i in np.argsort(-(quotas - keep), kind="stable")[: size - keep.sum()]:
            keep[i] += 1
        train = []
        for user, n_keep in zip(users, keep, strict=True):
            chosen = rng.choice(train_by_user[user], size=int(n_keep), replace=False)
            train.extend(int(n) for n in sorted(chosen))
        sets[variant] = (train, all_val)
    if "user" in config.variants:
        for user in sorted(train_by_user):
            sets[f"user-{user}"] = (train_by_user[user], val_by_user[user])
    return sets
