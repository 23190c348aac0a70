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

from persona_gym.simulator.engine.kv_cache import PrefixKV, encode_prefixes, score_blocks
from persona_gym.simulator.engine.layers import RECOMPILE_LIMIT, ItemTokens, LayeredLM
from persona_gym.simulator.engine.packing import (
    ROW_TOKENS,
    PackedBatch,
    SharedRow,
    pack,
    share_rows,
)

__all__ = [
    "RECOMPILE_LIMIT",
    "ROW_TOKENS",
    "ItemTokens",
    "LayeredLM",
    "PackedBatch",
    "PrefixKV",
    "SharedRow",
    "encode_prefixes",
    "pack",
    "score_blocks",
    "share_rows",
]
