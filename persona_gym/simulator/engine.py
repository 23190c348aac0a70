"""Scoring engine: packed shared-prefix sequences through a decoder-only LM, layer by layer.

Many candidate blocks of one user are packed after that user's prefix in ONE sequence; a 4-D
attention mask lets each block attend to the prefix and to itself only, and each block's position
ids restart where the prefix ends, so every block sees exactly what it would see alone
(``prefix + block``) while the prefix is computed once. Sequences of several users are padded
into a batch. With the prefix's keys/values cached (:func:`encode_prefixes`), :func:`score_blocks`
computes only the blocks; blocks that start alike (candidates rated in one state) share that
start in one row, computed once (:func:`share_rows`).

The forward pass is run layer by layer (embeddings → decoder layers → final norm → the five
rating rows of the LM head) so that:

* only the block's last position goes through the LM head, and only its rating rows;
* the layers below the first LoRA layer, identical for every adapter, run once for a batch that
  mixes personas; only the layers that carry LoRA run per adapter group;
* training can cache the frozen lower layers' output once and train the upper layers on it.

Soft item tokens (``PromptConfig.item_tokens``): a negative id ``-(i + 1)`` in a block stands
for catalogue item ``i``. The layers below ``ItemTokens.layer`` see a fixed placeholder token
there; before that layer the placeholder's hidden state is replaced by a projection of the
item's text embedding (:class:`ItemTokens`). Injecting at the first LoRA layer rather than at
the input keeps the frozen lower layers identical for every adapter, so their training cache
and the persona-shared part of a batch stay valid, and a movie costs one token instead of ~15.

Supported: decoder-only models with the Llama layout (``model.model.embed_tokens``, ``.layers``,
``.rotary_emb``, ``.norm``, ``model.lm_head``): Llama, SmolLM2, Qwen2, Mistral, Phi-3.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

ROW_TOKENS = 512  # widest row of blocks sharing a start (see share_rows)
RECOMPILE_LIMIT = 64  # compiled graphs per function: one per adapter and shape class


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


def pack(sequences: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]], pad_id: int,
         device: torch.device | str = "cpu") -> PackedBatch:
    """Pack ``[(prefix_ids, [block_ids, ...]), ...]`` into one padded batch on ``device``.

    Each sequence is ``prefix + block_1 + block_2 + ...``; block tokens attend causally within
    their block and to the whole prefix; padding attends only to itself. The ``(B, T, T)`` mask
    is built on ``device`` from the ``(B, T)`` segment ids: on a GPU that spares the CPU building
    and copying it (22 ms for 1024 × 125 × 125 on a 2-core CPU).
    """
    lengths = [len(p) + sum(len(b) for b in blocks) for p, blocks in sequences]
    width = max(lengths)
    ids, positions, segments = [], [], []  # segment: 0 prefix, b+1 block b, -1 pad
    rows, cols = [], []
    for r, (prefix, blocks) in enumerate(sequences):
        n, pad = len(prefix), width - lengths[r]
        row_ids, row_positions, row_segments = list(prefix), list(range(n)), [0] * n
        for b, block in enumerate(blocks):
            m = len(block)
            if m == 0:
                raise ValueError("empty block: every candidate needs at least one token")
            row_ids += block
            row_positions += range(n, n + m)
            row_segments += [b + 1] * m
            rows.append(r)
            cols.append(len(row_ids) - 1)
        ids.append(row_ids + [pad_id] * pad)
        positions.append(row_positions + [0] * pad)
        segments.append(row_segments + [-1] * pad)
    segment = torch.tensor(segments, dtype=torch.long).to(device)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    mask = causal & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
    mask |= torch.eye(width, dtype=torch.bool, device=device)  # pad rows attend to themselves (no NaN)
    n_pad = sum(width - n for n in lengths)
    return PackedBatch(
        torch.tensor(ids, dtype=torch.long).to(device), torch.tensor(positions, dtype=torch.long).to(device),
        mask[:, None], torch.tensor(rows).to(device), torch.tensor(cols).to(device),
        n_tokens=sum(lengths), n_pad=n_pad,
    )


class ItemTokens(torch.nn.Module):
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

    def __init__(self, model: torch.nn.Module, rating_ids: Sequence[int], compile: bool = False,
                 placeholder_id: int = 0):
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
        if compile:
            # dynamo guards on peft's active adapter name: each adapter gets its own graph
            # (compiled once, ~1 s); past the default limit of 8 the rest would run eagerly
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self._layer_call = torch.compile(_layer_forward, dynamic=True) if compile else _layer_forward
        self.attend = torch.compile(_attend, dynamic=True) if compile else _attend
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

    def run_layers(self, hidden: torch.Tensor, batch: PackedBatch, start: int, end: int) -> torch.Tensor:
        """Decoder layers ``start..end-1`` on hidden states ``(B, T, H)``."""
        if start >= end:
            return hidden
        position_embeddings = self.rotary(hidden, position_ids=batch.position_ids)
        mask = batch.attention_mask
        for index in range(start, end):
            hidden = self.before_layer(index, hidden, batch.input_ids)
            hidden = self._layer_call(self.layers[index], hidden, mask, batch.position_ids,
                                      position_embeddings)
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


def _rows(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids ``(B, T)`` and lengths ``(B,)``."""
    lengths = torch.tensor([len(s) for s in sequences])
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for r, seq in enumerate(sequences):
        ids[r, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return ids, lengths


def _attend(layer, hidden, position_embeddings, past_k, past_v, mask):
    """One Llama-layout decoder layer over new tokens attending to ``past`` keys/values too
    (``past`` may hold zero positions).

    Returns the layer output and the new tokens' keys/values (after rotary embedding).
    """
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attn = layer.self_attn
    batch, length, _ = hidden.shape
    x = layer.input_layernorm(hidden)
    shape = (batch, length, -1, attn.head_dim)
    q = attn.q_proj(x).view(shape).transpose(1, 2)
    k = attn.k_proj(x).view(shape).transpose(1, 2)
    v = attn.v_proj(x).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    keys = torch.cat([past_k, k], dim=2)
    values = torch.cat([past_v, v], dim=2)
    out = _sdpa(q, keys, values, mask, attn.scaling, repeat_kv=q.is_cuda)
    hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, length, -1))
    hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return hidden, k, v


def _sdpa(q, keys, values, mask, scale: float, repeat_kv: bool) -> torch.Tensor:
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


@torch.inference_mode()
def encode_prefixes(layered: LayeredLM, prefixes: Sequence[Sequence[int]], pad_id: int,
                    device: torch.device | str) -> list[PrefixKV]:
    """Run prefixes through every layer and keep their keys/values (the prefix KV cache)."""
    ids, lengths = _rows(prefixes, pad_id)
    ids, lengths = ids.to(device), lengths.to(device)
    width = ids.shape[1]
    positions = torch.arange(width, device=device).expand(len(prefixes), width)
    valid = torch.arange(width, device=device)[None, :] < lengths[:, None]
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    mask = (causal[None] & valid[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)
    hidden = layered.embed_ids(ids)
    position_embeddings = layered.rotary(hidden, position_ids=positions)
    keys, values = [], []
    attn = layered.layers[0].self_attn
    heads = attn.k_proj.out_features // attn.head_dim
    no_past = hidden.new_zeros((len(prefixes), heads, 0, attn.head_dim))  # same types as blocks'
    for layer in layered.layers:
        hidden, k, v = layered.attend(layer, hidden, position_embeddings, no_past, no_past, mask[:, None])
        keys.append(k)
        values.append(v)
    keys, values = torch.stack(keys), torch.stack(values)  # (layers, B, heads, P, d)
    return [PrefixKV(keys[:, r, :, :n].clone(), values[:, r, :, :n].clone())
            for r, n in enumerate(lengths.tolist())]


@torch.inference_mode()
def score_blocks(layered: LayeredLM, prefixes: Sequence[PrefixKV],
                 rows: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                 pad_id: int, device: torch.device | str) -> torch.Tensor:
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
    mask = torch.cat([past_valid[:, None, :].expand(batch, width, past), packed.attention_mask[:, 0]],
                     dim=2)[:, None]
    hidden = layered.embed_ids(ids)
    position_embeddings = layered.rotary(hidden, position_ids=positions)
    past_k = _stack_padded([p.keys for p in prefixes]).to(device)  # (layers, B, heads, P, d)
    past_v = _stack_padded([p.values for p in prefixes]).to(device)
    for index, layer in enumerate(layered.layers):
        hidden = layered.before_layer(index, hidden, ids)
        hidden, _, _ = layered.attend(layer, hidden, position_embeddings, past_k[index], past_v[index], mask)
    return layered.head(hidden[packed.rows, packed.cols])


@dataclass
class SharedRow:
    """Blocks scored in one row of :func:`score_blocks`: their first ``shared`` tokens are equal
    and computed once. ``keys`` are the caller's labels of the blocks (e.g. request indices)."""

    blocks: list[list[int]]
    keys: list
    shared: int

    @property
    def width(self) -> int:
        """New tokens the row computes."""
        return sum(len(b) for b in self.blocks) - (len(self.blocks) - 1) * self.shared

    def segments(self) -> tuple[list[int], list[list[int]]]:
        """``(shared tokens, [block suffix, ...])``, the row as :func:`score_blocks` takes it."""
        if len(self.blocks) == 1:
            return [], self.blocks
        return self.blocks[0][: self.shared], [b[self.shared :] for b in self.blocks]


def share_rows(blocks: Sequence[Sequence[int]], keys: Sequence, max_width: int = ROW_TOKENS) -> list[SharedRow]:
    """Group blocks that follow the same prefix into rows sharing their common leading tokens.

    Candidates scored in the same state (same window, different movies) differ only at the end
    of their blocks, so sorting the blocks puts them next to each other and their common start
    is computed once. A block joins the current row only when it shares at least a quarter of
    its tokens (a few shared tokens do not pay for the padding a wider row brings into its
    batch: blocks of one user in different states share just the chat-turn start), the row
    does not cost more tokens than the block alone would, and the row stays within
    ``max_width`` new tokens (wide rows spend more on masked attention than the sharing saves).
    Every block keeps at least its last token for itself (the rating is read there).
    """
    rows: list[SharedRow] = []
    for block, key in sorted(zip((list(b) for b in blocks), keys, strict=True), key=lambda bk: bk[0]):
        row = rows[-1] if rows else None
        if row is not None:
            first = row.blocks[0]
            common = 0
            limit = min(len(first), len(block)) - 1
            while common < limit and first[common] == block[common]:
                common += 1
            n = len(row.blocks)
            shared = min(common, row.shared)
            width = row.width + (n - 1) * row.shared + len(block) - n * shared
            if 4 * shared >= len(block) and n * shared >= (n - 1) * row.shared and width <= max_width:
                row.blocks.append(block)
                row.keys.append(key)
                row.shared = shared
                continue
        rows.append(SharedRow([block], [key], shared=len(block) - 1))  # alone: all but its last
    return rows


def _stack_padded(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack ``(layers, heads, n_i, d)`` tensors into ``(layers, B, heads, max n_i, d)``, zero-padded
    at the end (one copy per prefix for all layers: fewer, larger copies than per layer)."""
    if all(t.shape[2] == tensors[0].shape[2] for t in tensors):
        return torch.stack(tensors, dim=1)
    layers, heads, _, dim = tensors[0].shape
    out = tensors[0].new_zeros((layers, len(tensors), heads, max(t.shape[2] for t in tensors), dim))
    for r, t in enumerate(tensors):
        out[:, r, :, : t.shape[2]] = t
    return out
