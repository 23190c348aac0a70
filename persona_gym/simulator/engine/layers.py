"""Layered execution: a Llama-layout causal LM run in pieces (embed, a range of layers, head).

Running layer by layer lets only the blocks' last positions reach the LM head (and only its
five rating rows), lets the layers below the first LoRA layer run once for a batch that mixes
personas, and lets training cache the frozen lower layers' output. :class:`ItemTokens` replaces
placeholder positions by projected item embeddings before the first LoRA layer.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from persona_gym.simulator.engine.attention import attend
from persona_gym.simulator.engine.packing import PackedBatch

log = logging.getLogger(__name__)

__all__ = ["RECOMPILE_LIMIT", "ItemTokens", "LayeredLM"]

RECOMPILE_LIMIT = 64  # compiled graphs per function: one per adapter and shape class


class ItemTokens(torch.nn.Module):
    embeddings: torch.Tensor  # (n_items, E), a buffer

    """Soft item tokens: each movie as one vector projected from its text embedding.

    Args:
        embeddings: ``(n_items, E)`` item text embeddings (the artifacts' ``item_embeddings``);
            standardised per dimension so the projection starts on a unit scale.
        hidden_size: the LM's hidden size.
        layer: index of the decoder layer whose input gets the item vectors (the first LoRA layer).
    """

    def __init__(self, embeddings, hidden_size: int, layer: int):
        super().__init__()
        emb = torch.as_tensor(embeddings, dtype=torch.float32)
        emb = (emb - emb.mean(0)) / emb.std(0).clamp_min(1e-6)
        self.register_buffer("embeddings", emb, persistent=False)
        self.layer = layer
        self.proj = torch.nn.Linear(emb.shape[1], hidden_size)
        torch.nn.init.zeros_(self.proj.weight)  # starts as a constant vector: the bias

    def inject(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """``hidden`` with the positions of item ids (``< 0``) replaced by their item vectors."""
        rows, cols = (ids < 0).nonzero(as_tuple=True)
        if not len(rows):
            return hidden
        items = -ids[rows, cols] - 1
        vectors = self.proj(self.embeddings[items.to(self.embeddings.device)])
        vectors = vectors.to(hidden.device, hidden.dtype)
        return hidden.index_put((rows, cols), vectors)


class LayeredLM:
    """Runs a Llama-layout causal LM in pieces: embed, a range of layers, rating head.

    ``items``: the :class:`ItemTokens` of the active adapter when blocks hold item ids
    (set by the caller per adapter); ``placeholder_id`` is the token the lower layers see there.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        rating_ids: Sequence[int],
        compile: bool = False,
        placeholder_id: int = 0,
    ):
        """``compile=True`` runs each decoder layer through ``torch.compile`` (dynamic shapes):
        faster once compiled, after a warm-up, with the same results (benchmarks/README.md)."""
        # a peft wrapper or the bare model; its submodules are looked up by name
        get_base = getattr(model, "get_base_model", None)
        inner: Any = get_base() if get_base is not None else model
        try:
            self.embed = inner.model.embed_tokens
            self.layers = inner.model.layers
            self.rotary = inner.model.rotary_emb
            self.norm = inner.model.norm
            self.lm_head = inner.lm_head
        except AttributeError as err:
            raise TypeError(
                f"{type(inner).__name__} does not have the Llama layout persona-gym scores with "
                "(model.embed_tokens, .layers, .rotary_emb, .norm, lm_head)"
            ) from err
        self.rating_ids = torch.as_tensor(list(rating_ids), dtype=torch.long)
        if compile:
            log.info(
                "compile=True: the rating model's layers are compiled on first use, once per "
                "adapter and shape class; the first steps wait for it"
            )
            # dynamo guards on peft's active adapter name: each adapter gets its own graph
            # (compiled once); past the default limit of 8 the rest would run eagerly
            torch._dynamo.config.recompile_limit = max(
                torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT
            )
        self._layer_call = (
            torch.compile(_layer_forward, dynamic=True) if compile else _layer_forward
        )
        self.attend = torch.compile(attend, dynamic=True) if compile else attend
        self.placeholder_id = placeholder_id
        self.items: ItemTokens | None = None

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def device(self) -> torch.device:
        """Where the model's weights are (batches are built there)."""
        return self.embed.weight.device

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Input embeddings of token ids; item ids (``< 0``) get the placeholder token's."""
        return self.embed(torch.where(ids < 0, self.placeholder_id, ids))

    def embed_tokens(self, batch: PackedBatch) -> torch.Tensor:
        return self.embed_ids(batch.input_ids)

    def before_layer(self, index: int, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Inject the item vectors when layer ``index`` is the item layer; else ``hidden``."""
        if self.items is not None and index == self.items.layer:
            return self.items.inject(hidden, ids)
        return hidden

    def run_layers(
        self, hidden: torch.Tensor, batch: PackedBatch, start: int, end: int
    ) -> torch.Tensor:
        """Decoder layers ``start..end-1`` on hidden states ``(B, T, H)``."""
        if start >= end:
            return hidden
        position_embeddings = self.rotary(hidden, position_ids=batch.position_ids)
        mask = batch.attention_mask
        for index in range(start, end):
            hidden = self.before_layer(index, hidden, batch.input_ids)
            hidden = self._layer_call(
                self.layers[index], hidden, mask, batch.position_ids, position_embeddings
            )
        return hidden

    def rating_logits(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Logits over the five rating tokens at each block's last token: ``(N, 5)``."""
        return self.head(hidden[batch.rows, batch.cols])

    def head(self, last: torch.Tensor) -> torch.Tensor:
        """Final norm and the LM head's five rating rows on last-token states ``(N, H)``."""
        ids = self.rating_ids.to(last.device)
        logits = self.norm(last) @ self.lm_head.weight[ids].T
        bias = getattr(self.lm_head, "bias", None)
        if bias is not None:
            logits = logits + bias[ids]
        return logits.float()

    def forward(
        self, batch: PackedBatch, start: int = 0, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Rating logits; ``hidden`` is the output of layer ``start - 1`` when ``start > 0``."""
        if hidden is None:
            hidden = self.embed_tokens(batch)
            start = 0
        hidden = self.run_layers(hidden, batch, start, self.n_layers)
        return self.rating_logits(hidden, batch)


def _layer_forward(layer, hidden, mask, position_ids, position_embeddings):
    return layer(
        hidden,
        attention_mask=mask,
        position_ids=position_ids,
        position_embeddings=position_embeddings,
    )
