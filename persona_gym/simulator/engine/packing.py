"""Packing: candidate blocks after a shared prefix in one sequence, and rows that share a start.

:func:`pack` lays ``prefix + block_1 + block_2 + ...`` out in one padded row with a 4-D mask in
which each block attends to the prefix and to itself only, and its position ids restart where
the prefix ends, so every block sees exactly what it would see alone. :func:`share_rows` groups
blocks that start alike (candidates rated in one state) so that start is computed once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["ROW_TOKENS", "PackedBatch", "SharedRow", "pack", "share_rows"]

ROW_TOKENS = 512  # widest row of blocks sharing a start (see share_rows)


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


def pack(
    sequences: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
    pad_id: int,
    device: torch.device | str = "cpu",
) -> PackedBatch:
    """Pack ``[(prefix_ids, [block_ids, ...]), ...]`` into one padded batch on ``device``.

    Each sequence is ``prefix + block_1 + block_2 + ...``; block tokens attend causally within
    their block and to the whole prefix; padding attends only to itself. The ``(B, T, T)`` mask
    is built on ``device`` from the ``(B, T)`` segment ids: on a GPU that spares the CPU building
    and copying it (timing: benchmarks/README.md).
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
    mask |= torch.eye(
        width, dtype=torch.bool, device=device
    )  # pad rows attend to themselves (no NaN)
    n_pad = sum(width - n for n in lengths)
    return PackedBatch(
        torch.tensor(ids, dtype=torch.long).to(device),
        torch.tensor(positions, dtype=torch.long).to(device),
        mask[:, None],
        torch.tensor(rows).to(device),
        torch.tensor(cols).to(device),
        n_tokens=sum(lengths),
        n_pad=n_pad,
    )


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


def share_rows(
    blocks: Sequence[Sequence[int]], keys: Sequence, max_width: int = ROW_TOKENS
) -> list[SharedRow]:
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
    for block, key in sorted(
        zip((list(b) for b in blocks), keys, strict=True), key=lambda bk: bk[0]
    ):
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
            if (
                4 * shared >= len(block)
                and n * shared >= (n - 1) * row.shared
                and width <= max_width
            ):
                row.blocks.append(block)
                row.keys.append(key)
                row.shared = shared
                continue
        rows.append(SharedRow([block], [key], shared=len(block) - 1))  # alone: all but its last
    return rows
