"""The prefix key/value cache of the scoring engine: prefixes computed once, blocks after them.

:func:`encode_prefixes` runs each user's static prefix through every layer and keeps its keys
and values (:class:`PrefixKV`); :func:`score_blocks` then computes only the new tokens of packed
rows (:func:`~.packing.pack`), attending to those cached keys/values, and returns the rating
logits at each block's last token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from persona_gym.simulator.engine.layers import LayeredLM
from persona_gym.simulator.engine.packing import pack

__all__ = ["PrefixKV", "encode_prefixes", "score_blocks"]


class PrefixKV:
    """Keys and values of one prefix in every layer: ``keys`` is ``(layers, kv_heads, P, head_dim)``."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values = keys, values

    @property
    def length(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()


def pad_rows(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids ``(B, T)`` and lengths ``(B,)``."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for r, seq in enumerate(sequences):
        ids[r, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return ids, lengths


@torch.inference_mode()
def encode_prefixes(
    layered: LayeredLM, prefixes: Sequence[Sequence[int]], pad_id: int, device: torch.device | str
) -> list[PrefixKV]:
    """Run prefixes through every layer and keep their keys/values (the prefix KV cache)."""
    ids, lengths = pad_rows(prefixes, pad_id)
    ids, lengths = ids.to(device), lengths.to(device)
    width = ids.shape[1]
    positions = torch.arange(width, device=device).expand(len(prefixes), width)
    valid = torch.arange(width, device=device)[None, :] < lengths[:, None]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    mask = (causal[None] & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)
    hidden = layered.embed_ids(ids)
    position_embeddings = layered.rotary(hidden, position_ids=positions)
    key_list, value_list = [], []
    attn = layered.layers[0].self_attn
    heads = attn.k_proj.out_features // attn.head_dim
    no_past = hidden.new_zeros((len(prefixes), heads, 0, attn.head_dim))  # same types as blocks'
    for layer in layered.layers:
        hidden, k, v = layered.attend(
            layer, hidden, position_embeddings, no_past, no_past, mask[:, None]
        )
        key_list.append(k)
        value_list.append(v)
    keys, values = torch.stack(key_list), torch.stack(value_list)  # (layers, B, heads, P, d)
    return [
        PrefixKV(keys[:, r, :, :n].clone(), values[:, r, :, :n].clone())
        for r, n in enumerate(lengths.tolist())
    ]


@torch.inference_mode()
def score_blocks(
    layered: LayeredLM,
    prefixes: Sequence[PrefixKV],
    rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    pad_id: int,
    device: torch.device | str,
) -> torch.Tensor:
    """Rating logits ``(N, 5)`` of every block of ``rows`` (row order, then block order).

    Row ``r`` is ``(shared, [block, ...])`` after its cached prefix ``prefixes[r]``: the shared
    tokens attend to the prefix and causally to themselves, each block to the prefix, the shared
    tokens and itself (:func:`pack`), exactly as in the uncached ``prefix + shared + block``
    sequence; only the new tokens are computed, the shared ones once for all blocks of the row.
    """
    packed = pack(rows, pad_id, device)
    ids = packed.input_ids
    batch, width = ids.shape
    prefix_len = torch.tensor([p.length for p in prefixes], device=device)
    past = int(prefix_len.max())
    positions = prefix_len[:, None] + packed.position_ids
    past_valid = torch.arange(past, device=device)[None, :] < prefix_len[:, None]  # (B, P)
    mask = torch.cat(
        [past_valid[:, None, :].expand(batch, width, past), packed.attention_mask[:, 0]], dim=2
    )[:, None]
    hidden = layered.embed_ids(ids)
    position_embeddings = layered.rotary(hidden, position_ids=positions)
    past_k = stack_padded([p.keys for p in prefixes]).to(device)  # (layers, B, heads, P, d)
    past_v = stack_padded([p.values for p in prefixes]).to(device)
    for index, layer in enumerate(layered.layers):
        hidden = layered.before_layer(index, hidden, ids)
        hidden, _, _ = layered.attend(
            layer, hidden, position_embeddings, past_k[index], past_v[index], mask
        )
    return layered.head(hidden[packed.rows, packed.cols])


def stack_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack ``(layers, heads, n_i, d)`` tensors into ``(layers, B, heads, max n_i, d)``, zero-padded
    at the end (one copy per prefix for all layers: fewer, larger copies than per layer)."""
    if all(t.shape[2] == tensors[0].shape[2] for t in tensors):
        return torch.stack(list(tensors), dim=1)
    layers, heads, _, dim = tensors[0].shape
    out = tensors[0].new_zeros((layers, len(tensors), heads, max(t.shape[2] for t in tensors), dim))
    for r, t in enumerate(tensors):
        out[:, r, :, : t.shape[2]] = t
    return out
