"""Attention over cached keys/values: one Llama-layout decoder layer for new tokens.

:func:`attend` runs a decoder layer on new tokens that attend to ``past`` keys/values (a cached
prefix; possibly zero positions) and to themselves under a given mask, and returns the new
tokens' keys/values. Both the prefix encoder and the block scorer of :mod:`.kv_cache` go
through it (compiled once per :class:`~.layers.LayeredLM` when asked).
"""

from __future__ import annotations

import torch

__all__ = ["attend", "sdpa"]


def attend(layer, hidden, position_embeddings, past_k, past_v, mask):
    """One Llama-layout decoder layer over new tokens attending to ``past`` keys/values too
    (``past`` may hold zero positions).

    Returns the layer output and the new tokens' keys/values (after rotary embedding).
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    batch, length, _ = hidden.shape  # hidden: (B, T, H)
    x = layer.input_layernorm(hidden)
    shape = (batch, length, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)  # (B, heads, T, d)
    k = attn.k_proj(x).view(shape).transpose(1, 2)  # (B, kv_heads, T, d)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys = torch.cat([past_k, k], dim=2)  # (B, kv_heads, P + T, d)
    values = torch.cat([past_v, v], dim=2)
    out = sdpa(q, keys, values, mask, attn.scaling, repeat_kv=q.is_cuda)  # mask: (B, 1, T, P + T)
    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, k, v


def sdpa(q, keys, values, mask, scale: float, repeat_kv: bool) -> torch.Tensor:
    """Masked attention with grouped key/value heads.

    ``repeat_kv`` expands the key/value heads to the query heads first: on CUDA, SDPA's kernels
    that take an arbitrary mask do not take ``enable_gqa``, so GQA + mask would fall back to the
    slow math kernel. On CPU, ``enable_gqa`` avoids the copy. Both give the same result.
    """
    if repeat_kv:
        groups = q.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(
        q, keys, values, attn_mask=mask, scale=scale, enable_gqa=not repeat_kv
    )
