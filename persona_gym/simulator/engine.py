"""Scoring engine: packed shared-prefix sequences through a decoder-only LM, layer by layer.

Many candidate blocks of one user are packed after that user's prefix in ONE sequence; a 4-D
attention mask lets each block attend to the prefix and to itself only, and each block's position
ids restart where the prefix ends, so every block sees exactly what it would see alone
(``prefix + block``) while the prefix is computed once. Sequences of several users are padded
into a batch.

The forward pass is run layer by layer (embeddings → decoder layers → final norm → the five
rating rows of the LM head) so that:

* only the block's last position goes through the LM head, and only its rating rows;
* the layers below the first LoRA layer, identical for every adapter, run once for a batch that
  mixes personas; only the layers that carry LoRA run per adapter group;
* training can cache the frozen lower layers' output once and train the upper layers on it.

Supported: decoder-only models with the Llama layout (``model.model.embed_tokens``, ``.layers``,
``.rotary_emb``, ``.norm``, ``model.lm_head``): Llama, SmolLM2, Qwen2, Mistral, Phi-3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class PackedBatch:
    """A padded batch of packed sequences and where to read each block's rating.

    ``rows[n], cols[n]`` is the last token of block ``n`` (blocks in input order).
    """

    input_ids: torch.Tensor  # (B, T) long
    position_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, 1, T, T) bool, True = may attend
    rows: torch.Tensor  # (N,) long
    cols: torch.Tensor  # (N,) long

    n_tokens: int  # real (non-pad) tokens
    n_pad: int  # padding tokens

    def to(self, device: torch.device | str) -> PackedBatch:
        """The same batch on another device."""
        tensors = (self.input_ids, self.position_ids, self.attention_mask, self.rows, self.cols)
        return PackedBatch(*(t.to(device) for t in tensors), self.n_tokens, self.n_pad)


def pack(sequences: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int) -> PackedBatch:
    """Pack ``[(prefix_ids, [block_ids, ...]), ...]`` into one padded batch.

    Each sequence is ``prefix + block_1 + block_2 + ...``; block tokens attend causally within
    their block and to the whole prefix; padding attends only to itself.
    """
    lengths = [len(p) + sum(len(b) for b in blocks) for p, blocks in sequences]
    batch, width = len(sequences), max(lengths)
    input_ids = torch.full((batch, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((batch, width), dtype=torch.long)
    segment = torch.full((batch, width), -1, dtype=torch.long)  # 0 prefix, b+1 block b, -1 pad
    rows, cols = [], []
    for r, (prefix, blocks) in enumerate(sequences):
        n = len(prefix)
        input_ids[r, :n] = torch.as_tensor(list(prefix), dtype=torch.long)
        position_ids[r, :n] = torch.arange(n)
        segment[r, :n] = 0
        start = n
        for b, block in enumerate(blocks):
            m = len(block)
            if m == 0:
                raise ValueError("empty block: every candidate needs at least one token")
            input_ids[r, start : start + m] = torch.as_tensor(list(block), dtype=torch.long)
            position_ids[r, start : start + m] = torch.arange(n, n + m)
            segment[r, start : start + m] = b + 1
            rows.append(r)
            cols.append(start + m - 1)
            start += m
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    mask = causal & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    mask |= torch.eye(width, dtype=torch.bool)  # pad rows attend to themselves (no NaN)
    n_pad = int((segment < 0).sum())
    return PackedBatch(
        input_ids, position_ids, mask[:, None], torch.tensor(rows), torch.tensor(cols),
        n_tokens=batch * width - n_pad, n_pad=n_pad,
    )


class LayeredLM:
    """Runs a Llama-layout causal LM in pieces: embed, a range of layers, rating head."""

    def __init__(self, model: torch.nn.Module, rating_ids: Sequence[int], compile: bool = False):
        """``compile=True`` runs each decoder layer through ``torch.compile`` (dynamic shapes):
        about 3x faster on CPU once compiled (~1 min the first time), same results."""
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
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
        self._layer_call = torch.compile(_layer_forward, dynamic=True) if compile else _layer_forward

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def embed_tokens(self, batch: PackedBatch) -> torch.Tensor:
        return self.embed(batch.input_ids)

    def run_layers(self, hidden: torch.Tensor, batch: PackedBatch, start: int, end: int) -> torch.Tensor:
        """Decoder layers ``start..end-1`` on hidden states ``(B, T, H)``."""
        if start >= end:
            return hidden
        position_embeddings = self.rotary(hidden, position_ids=batch.position_ids)
        mask = batch.attention_mask
        for layer in self.layers[start:end]:
            hidden = self._layer_call(layer, hidden, mask, batch.position_ids, position_embeddings)
        return hidden

    def rating_logits(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """Logits over the five rating tokens at each block's last token: ``(N, 5)``."""
        last = self.norm(hidden[batch.rows, batch.cols])
        weight = self.lm_head.weight[self.rating_ids.to(last.device)]
        logits = last @ weight.T
        bias = getattr(self.lm_head, "bias", None)
        if bias is not None:
            logits = logits + bias[self.rating_ids.to(last.device)]
        return logits.float()

    def forward(self, batch: PackedBatch, start: int = 0, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """Rating logits; ``hidden`` is the output of layer ``start - 1`` when ``start > 0``."""
        if hidden is None:
            hidden = self.embed_tokens(batch)
            start = 0
        hidden = self.run_layers(hidden, batch, start, self.n_layers)
        return self.rating_logits(hidden, batch)


def _layer_forward(layer, hidden, mask, position_ids, position_embeddings):
    return layer(hidden, attention_mask=mask, position_ids=position_ids,
                 position_embeddings=position_embeddings)
