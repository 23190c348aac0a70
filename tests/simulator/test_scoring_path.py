"""The rating model's scoring path pinned with values, without a tokenizer: a token-level prompt
builder over a tiny random Llama (64 tokens, 2 layers) and random LoRA adapters. ``score`` must
equal the plain one-prompt-per-request forward pass of each request's own adapter, whatever the
grouping, sharing, caching and batching; the token counts, batches, packed tensors and shared
rows are pinned by hand (``test_rating_model.py`` checks the same on SmolLM2's tokenizer)."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from persona_gym.simulator.engine import PackedBatch, SharedRow, pack, share_rows
from persona_gym.simulator.engine.kv_cache import PrefixKV, pad_rows, stack_padded
from persona_gym.simulator.memory import Interaction
from persona_gym.simulator.prompts import PromptConfig, RatingRequest
from persona_gym.simulator.rating_model import RatingModel, parse_rating
from tests.conftest import make_tiny_llama

VOCAB = 64
RATING_IDS = [50, 51, 52, 53, 54]


class TokenBuilder:
    """A prompt builder at the token level: the prefix is the user's, the block is the window
    then the candidate (so candidates rated in one state share the block's start)."""

    def __init__(self, config: PromptConfig | None = None, pad: int | None = 0, eos: int = 1):
        self.config = config or PromptConfig.paper(window_size=2, n_memories=0, max_tokens=256)
        self.tokenizer = SimpleNamespace(pad_token_id=pad, eos_token_id=eos)
        self.rating_token_ids = RATING_IDS
        self.item_placeholder_id = 2

    def segments(self, request: RatingRequest) -> tuple[list[int], list[int]]:
        prefix = [3, 4 + request.user_id % 5, 10 + request.user_id % 7, 5]
        window = [t for x in request.window for t in (20 + x.item_index % 10, 30 + int(x.rating))]
        return prefix, [6, 7, *window, 40 + request.candidate % 10, 8]

    def full_ids(self, request: RatingRequest) -> list[int]:
        prefix, block = self.segments(request)
        return prefix + block


def with_adapters(names, seed=0):
    """The tiny model wrapped with LoRA adapters whose B matrices are random (they change outputs)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = make_tiny_llama(VOCAB, seed=seed, layers=2)
    config = LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q_proj", "v_proj"],
        init_lora_weights=False,
        layers_to_transform=[1],
    )
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for n, name in enumerate(names):
        if n:
            peft_model.add_adapter(name, config)
        torch.manual_seed(seed + 10 + n)
        for module in peft_model.modules():
            if hasattr(module, "lora_B") and name in module.lora_B:
                torch.nn.init.normal_(module.lora_B[name].weight, std=0.5)
    return peft_model.eval()


def plain(model, builder, request) -> torch.Tensor:
    """The reference: the whole prompt through the model under the request's adapter."""
    ids = torch.tensor([builder.full_ids(request)])
    with torch.no_grad():
        if request.adapter == "base":
            with model.disable_adapter():
                logits = model(ids).logits
        else:
            model.set_adapter(request.adapter)
            logits = model(ids).logits
    return logits[0, -1, RATING_IDS]


WINDOW = (Interaction(1, 4.0, 10), Interaction(2, 2.0, 20), Interaction(7, 5.0, 30))


def requests(adapters=("p0", "p1", "base")) -> list[RatingRequest]:
    out = []
    for n in range(9):
        out.append(
            RatingRequest(
                user_id=n % 3,
                profile="",
                candidate=n,
                window=WINDOW[: n % 3],
                adapter=adapters[(n // 2) % len(adapters)],
            )
        )
    return out


@pytest.fixture(scope="module")
def peft_model():
    return with_adapters(["p0", "p1"])


def test_scores_are_each_requests_own_adapter_forward(peft_model):
    builder = TokenBuilder()
    model = RatingModel(peft_model, builder)
    batch = requests()
    probs = model.score(batch)
    assert probs.shape == (9, 5) and probs.dtype == np.float64
    reference = (
        torch.stack([plain(peft_model, builder, r) for r in batch]).softmax(-1).double().numpy()
    )
    np.testing.assert_allclose(probs, reference, atol=1e-5)
    # the adapters make a difference: the routing is observable
    other = [
        RatingRequest(r.user_id, r.profile, r.candidate, r.window, adapter="p1") for r in batch
    ]
    assert np.abs(model.score(other) - probs).max() > 1e-3
    logits = model.score_logits(batch)
    assert logits.dtype == torch.float32 and logits.device.type == "cpu"
    np.testing.assert_allclose(logits.softmax(-1).double().numpy(), probs, atol=1e-6)
    assert model.score([]).shape == (0, 5)


def test_each_prefix_is_computed_once_and_cached(peft_model):
    builder = TokenBuilder()
    model = RatingModel(peft_model, builder)
    batch = [r for r in requests() if r.adapter == "p0"]  # users 0, 1, 0, 1
    groups: dict[tuple, list] = {}
    for r in batch:
        prefix, block = builder.segments(r)
        groups.setdefault(tuple(prefix), []).append(block)
    prefix_tokens = sum(len(p) for p in groups)
    block_tokens = sum(
        row.width
        for blocks in groups.values()
        for row in share_rows(blocks, list(range(len(blocks))))
    )
    first = model.score(batch)
    assert model.tokens_processed == prefix_tokens + block_tokens
    again = model.score(batch)
    assert (
        model.tokens_processed == prefix_tokens + 2 * block_tokens
    )  # the prefixes come from the cache
    np.testing.assert_array_equal(first, again)
    assert len(model.cache) == len(groups) == 2
    newcomer = RatingRequest(4, "", 2, adapter="p0")  # a new user: only their prefix is computed
    prefix, block = builder.segments(newcomer)
    model.score([newcomer])
    assert model.tokens_processed == prefix_tokens + 2 * block_tokens + len(prefix) + len(block)


def test_candidates_in_one_state_share_the_window_and_count_it_once(peft_model):
    builder = TokenBuilder()
    model = RatingModel(peft_model, builder)
    batch = [RatingRequest(0, "", c, WINDOW, adapter="p1") for c in range(5)]
    model.score(batch[:1])
    before = model.tokens_processed
    probs = model.score(batch)
    blocks = [builder.segments(r)[1] for r in batch]
    common = len(blocks[0]) - 2  # everything but the candidate token and the end token
    assert all(b[:common] == blocks[0][:common] for b in blocks)
    assert model.tokens_processed - before == sum(len(b) for b in blocks) - 4 * common
    reference = (
        torch.stack([plain(peft_model, builder, r) for r in batch]).softmax(-1).double().numpy()
    )
    np.testing.assert_allclose(probs, reference, atol=1e-5)


def test_small_token_budgets_split_batches_with_the_same_scores(peft_model):
    builder = TokenBuilder()
    wide = RatingModel(peft_model, builder).score(requests())
    narrow = RatingModel(peft_model, builder, max_batch_tokens=12)
    np.testing.assert_allclose(narrow.score(requests()), wide, atol=1e-5)
    one_by_one = RatingModel(peft_model, builder, max_batch_tokens=4)  # each prefix, each row alone
    np.testing.assert_allclose(one_by_one.score(requests()), wide, atol=1e-5)
    assert one_by_one.tokens_processed == expected_tokens(builder, requests())
    assert (
        narrow.max_batch_tokens == 12 and RatingModel(peft_model, builder).max_batch_tokens == 8192
    )
    assert RatingModel(peft_model, builder).cache.max_bytes == 2 << 30


def expected_tokens(builder, batch) -> int:
    """What one call on a fresh model computes: each adapter's distinct prefixes, then the rows
    of shared blocks after each prefix."""
    groups: dict[tuple, list] = {}
    for r in batch:
        prefix, block = builder.segments(r)
        groups.setdefault((r.adapter, tuple(prefix)), []).append(block)
    return sum(
        len(prefix) + sum(row.width for row in share_rows(blocks, list(range(len(blocks)))))
        for (_, prefix), blocks in groups.items()
    )


def test_budget_batches_by_hand(peft_model):
    model = RatingModel(peft_model, TokenBuilder(), max_batch_tokens=300)
    same = lambda n: n  # noqa: E731
    assert model._budget([100, 100, 100, 100], same) == [
        [100, 100, 100],
        [100],
    ]  # 300 tokens fit, 400 do not
    assert model._budget([], same) == []
    assert model._budget([400], same) == [[400]]  # a row wider than the budget goes alone
    model.max_batch_tokens = 10_000
    # 4 rows of 10 then one of 13: 5 * 13 = 65 <= 1.25 * 53 = 66.25 -> together
    assert model._budget([10, 10, 10, 10, 13], same) == [[10, 10, 10, 10, 13]]
    # ... one of 14: 70 > 1.25 * 54 = 67.5 -> alone
    assert model._budget([10, 10, 10, 10, 14], same) == [[10, 10, 10, 10], [14]]
    # exactly at a quarter of padding: 2 * 5 = 10 <= 1.25 * 8 = 10 -> together
    assert model._budget([3, 5], same) == [[3, 5]]
    assert model._budget(["ab", "abc"], len) == [["ab", "abc"]]
    # 2 * 6 = 12 > 1.25 * (3 + 6) = 11.25: apart; after it the count restarts from the new batch:
    # 2 * 11 = 22 > 1.25 * (6 + 11) = 21.25: apart again
    assert model._budget([3, 6, 11], same) == [[3], [6], [11]]


def test_the_pad_token_falls_back_to_eos_and_adapters_are_listed(peft_model):
    assert RatingModel(peft_model, TokenBuilder(pad=7)).pad_id == 7
    assert RatingModel(peft_model, TokenBuilder(pad=None, eos=9)).pad_id == 9
    assert RatingModel(peft_model, TokenBuilder(pad=0)).pad_id == 0
    model = RatingModel(peft_model, TokenBuilder())
    assert model.adapters == ["p0", "p1"] and model.device.type == "cpu"
    assert model.tokens_processed == 0
    bare = RatingModel(make_tiny_llama(VOCAB, layers=2), TokenBuilder())
    assert bare.adapters == []
    base = RatingRequest(0, "", 3, adapter="base")
    np.testing.assert_allclose(
        bare.score([base])[0],
        plain_bare(bare.model, TokenBuilder(), base).softmax(-1).double().numpy(),
        atol=1e-5,
    )


def plain_bare(model, builder, request):
    with torch.no_grad():
        return model(torch.tensor([builder.full_ids(request)])).logits[0, -1, RATING_IDS]


def test_unknown_adapters_are_named(peft_model):
    model = RatingModel(peft_model, TokenBuilder())
    with pytest.raises(KeyError) as err:
        model.score([RatingRequest(0, "", 1, adapter="p9")])
    assert err.value.args[0] == "adapter 'p9' is not loaded; loaded: ['p0', 'p1', 'base']"


def test_item_token_and_prior_prompts_need_them_for_every_adapter(peft_model):
    items = PromptConfig.paper(window_size=2, n_memories=0, max_tokens=256, item_tokens=True)
    with pytest.raises(ValueError) as err:
        RatingModel(peft_model, TokenBuilder(items), item_tokens={"p0": object()})
    assert str(err.value) == (
        "the prompt uses item tokens but adapters ['p1'] have no item_tokens.pt: "
        "train them with `persona-gym train` (the shipped recipe has them)"
    )
    prior = PromptConfig.paper(
        window_size=2, n_memories=0, max_tokens=256, cf_cue=True, cf_prior=True
    )
    with pytest.raises(ValueError) as err:
        RatingModel(peft_model, TokenBuilder(prior))
    assert str(err.value).startswith(
        "the prompt uses a collaborative prior but adapters ['p0', 'p1'] have no "
    )
    assert str(err.value).endswith(
        ": train them with `persona-gym train` (the shipped recipe has it)"
    )
    # the base model has no projection: an item-token request for it is refused
    model = RatingModel(
        peft_model, TokenBuilder(items), item_tokens={"p0": object(), "p1": object()}
    )
    with pytest.raises(
        ValueError,
        match=r"^adapter 'base' has no item projection: item-token prompts "
        r"need adapters trained with `persona-gym train` \(the shipped recipe has them\)$",
    ):
        model.score([RatingRequest(0, "", 1, adapter="base")])
    # without item tokens or a prior, nothing is needed
    assert (
        RatingModel(peft_model, TokenBuilder()).item_tokens == {}
        and RatingModel(peft_model, TokenBuilder()).priors == {}
    )


@dataclass
class ShiftPrior:
    """A stand-in collaborative prior: adds ``prediction + 10 * surprise`` to rating logit 0."""

    calls: list

    def __call__(self, logits, predictions, surprises):
        self.calls.append((logits.clone(), predictions.clone(), surprises.clone()))
        out = logits.clone()
        out[:, 0] += predictions + 10 * surprises
        return out


def test_the_prior_moves_each_adapters_logits_with_the_requests_cues(peft_model):
    config = PromptConfig.paper(
        window_size=2, n_memories=0, max_tokens=256, cf_cue=True, cf_prior=True
    )
    priors = {"p0": ShiftPrior([]), "p1": ShiftPrior([])}
    model = RatingModel(peft_model, TokenBuilder(config), priors=priors)
    plain_model = RatingModel(peft_model, TokenBuilder())
    batch = [
        RatingRequest(0, "", 1, adapter="p0", cf_prediction=3.5, surprise=0.25),
        RatingRequest(1, "", 2, adapter="p1", cf_prediction=2.0, surprise=None),
        RatingRequest(2, "", 3, adapter="p0", cf_prediction=4.0, surprise=-0.5),
    ]
    got, bare = model.score_logits(batch), plain_model.score_logits(batch)
    ((p0_logits, p0_pred, p0_surprise),) = priors["p0"].calls
    np.testing.assert_allclose(p0_logits.numpy(), bare[[0, 2]].numpy(), atol=1e-6)
    assert p0_pred.tolist() == [3.5, 4.0] and p0_surprise.tolist() == [0.25, -0.5]
    assert priors["p1"].calls[0][1].tolist() == [2.0] and priors["p1"].calls[0][2].tolist() == [
        0.0
    ]  # none: 0
    for row, shift in {0: 3.5 + 2.5, 1: 2.0, 2: 4.0 - 5.0}.items():
        assert got[row, 0].item() == pytest.approx(bare[row, 0].item() + shift, abs=1e-5)
        np.testing.assert_allclose(got[row, 1:].numpy(), bare[row, 1:].numpy(), atol=1e-6)
    with pytest.raises(
        ValueError,
        match=r"^adapter 'base' has no collaborative prior: prompts with cf_prior "
        r"need adapters trained with `persona-gym train` \(the shipped recipe has it\)$",
    ):
        model.score([RatingRequest(0, "", 1, adapter="base", cf_prediction=3.0)])


def test_each_adapters_item_tokens_shape_its_scores(peft_model):
    from persona_gym.simulator.engine import ItemTokens

    config = PromptConfig.paper(window_size=2, n_memories=0, max_tokens=256, item_tokens=True)
    embeddings = np.random.default_rng(0).normal(size=(10, 6))
    items = {
        "p0": ItemTokens(embeddings, hidden_size=64, layer=1),
        "p1": ItemTokens(embeddings, hidden_size=64, layer=1),
    }
    model = RatingModel(peft_model, ItemBuilder(config), item_tokens=items)
    batch = [RatingRequest(0, "", 3, adapter="p0"), RatingRequest(1, "", 4, adapter="p1")]
    before = model.score(batch)
    with torch.no_grad():
        items["p0"].proj.bias.normal_(generator=torch.Generator().manual_seed(1))
    after = model.score(batch)
    assert np.abs(after[0] - before[0]).max() > 1e-4  # p0's projection moved p0's rating ...
    np.testing.assert_allclose(after[1], before[1], atol=1e-6)  # ... and not p1's
    assert model.layered.items is items["p1"]  # the last group's


class ItemBuilder(TokenBuilder):
    """Item-token prompts: the candidate is one soft token ``-(i + 1)``."""

    def segments(self, request):
        prefix, block = super().segments(request)
        return prefix, [*block[:-2], -(request.candidate + 1), block[-1]]


def test_the_layered_model_gets_the_compile_flag_and_the_placeholder(peft_model):
    from persona_gym.simulator.engine import attention, layers

    model = RatingModel(peft_model, TokenBuilder())
    assert (
        model.layered.attend is attention.attend
        and model.layered._layer_call is layers._layer_forward
    )
    assert model.layered.placeholder_id == 2 and model.layered.rating_ids.tolist() == RATING_IDS
    compiled = RatingModel(
        peft_model, TokenBuilder(), compile=True
    )  # wrapped now, compiled on first use
    assert compiled.layered.attend is not attention.attend
    shared = RatingModel(peft_model, TokenBuilder(), layered=model.layered)
    assert shared.layered is model.layered


def test_generated_answers_at_the_ends_of_the_scale():
    assert parse_rating(" 1") == 1.0 and parse_rating("5") == 5.0 and parse_rating("1.0") == 1.0
    assert parse_rating("4.5") == 5.0 and parse_rating("1.49") == 1.0
    for outside in (" 0.99", "5.01", "0.5", "-3"):
        assert np.isnan(parse_rating(outside)) or outside == "-3", outside
    assert parse_rating("-3") == 3.0  # the sign is not part of the number: "3"
    assert parse_rating("rated 2 then 5") == 2.0  # the first number


# -- packing ------------------------------------------------------------------------------------
def test_pack_lays_out_ids_positions_and_the_block_mask_by_hand():
    batch = pack([([1, 2], [[3, 4], [5]]), ([6], [[7]])], pad_id=0)
    assert isinstance(batch, PackedBatch)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 0, 0]]
    assert batch.rows.tolist() == [0, 0, 1] and batch.cols.tolist() == [3, 4, 1]
    assert (batch.n_tokens, batch.n_pad) == (7, 3)
    assert batch.attention_mask.shape == (2, 1, 5, 5) and batch.attention_mask.dtype == torch.bool
    assert batch.attention_mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # block 1 sees the prefix and itself
        [1, 1, 1, 1, 0],
        [1, 1, 0, 0, 1],  # block 2 sees the prefix, not block 1
    ]
    assert batch.attention_mask[1, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 0, 1, 0, 0],  # padding sees the prefix and itself (never read)
        [1, 0, 0, 1, 0],
        [1, 0, 0, 0, 1],
    ]
    assert batch.input_ids.dtype == torch.long and batch.position_ids.dtype == torch.long
    no_prefix = pack([([], [[9, 8], [7]])], pad_id=5)
    assert no_prefix.position_ids.tolist() == [[0, 1, 0]] and no_prefix.cols.tolist() == [1, 2]
    with pytest.raises(ValueError, match="^empty block: every candidate needs at least one token$"):
        pack([([1], [[2], []])], pad_id=0)


def test_share_rows_groups_blocks_by_hand():
    a, b, c = [1, 2, 3, 4, 9], [1, 2, 3, 4, 8], [1, 2, 3, 5, 7]
    rows = share_rows([a, b, c], ["a", "b", "c"])
    assert [(row.keys, row.shared) for row in rows] == [(["b", "a", "c"], 3)]  # sorted blocks
    shared, suffixes = rows[0].segments()
    assert shared == [1, 2, 3] and suffixes == [[4, 8], [4, 9], [5, 7]]
    assert rows[0].width == 3 + 2 + 2 + 2
    # less than a quarter in common: a row of its own
    rows = share_rows([[1, 5, 6, 7, 8], [1, 9, 9, 9, 9]], [0, 1])
    assert [row.keys for row in rows] == [[0], [1]] and [row.shared for row in rows] == [4, 4]
    assert rows[0].segments() == ([], [[1, 5, 6, 7, 8]]) and rows[0].width == 5
    # exactly a quarter in common joins
    assert [row.keys for row in share_rows([[1, 2, 3, 4], [1, 5, 6, 7]], [0, 1])] == [[0, 1]]
    # a row may not cost more than its blocks alone: 3 blocks sharing 5 tokens, then one sharing
    # 3 (3 * 3 < 2 * 5: the row would recompute more than the fourth block saves) ...
    four = [[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 7], [1, 2, 3, 4, 5, 8], [1, 2, 3, 9, 9, 9]]
    rows = share_rows(four, [0, 1, 2, 3])
    assert [row.keys for row in rows] == [[0, 1, 2], [3]] and rows[0].shared == 5
    # ... while 2 blocks sharing 5 take a third sharing 3 (2 * 3 >= 5)
    rows = share_rows(four[:2] + four[3:], [0, 1, 3])
    assert [row.keys for row in rows] == [[0, 1, 3]] and rows[0].shared == 3
    # nor grow past max_width new tokens
    blocks = [[1, 2, 3, 4, 5, n] for n in range(6, 10)]
    assert [len(row.keys) for row in share_rows(blocks, list(range(4)), max_width=8)] == [3, 1]
    assert [len(row.keys) for row in share_rows(blocks, list(range(4)), max_width=9)] == [4]
    assert [len(row.keys) for row in share_rows(blocks, list(range(4)))] == [4]  # default 512
    # duplicates keep their own last token, and their input order (only the blocks are sorted)
    rows = share_rows([[4, 4], [4, 4]], ["y", "x"])
    assert (
        rows[0].shared == 1
        and rows[0].segments() == ([4], [[4], [4]])
        and rows[0].keys == ["y", "x"]
    )
    assert SharedRow([[1, 2]], [0], 1).width == 2
    # blocks that differ at their first token share nothing, however alike the rest
    assert [row.keys for row in share_rows([[2, 2, 3, 4], [1, 2, 3, 4]], [0, 1])] == [[1], [0]]
    # two blocks sharing 4, then one sharing 2: 2 * 2 >= 1 * 4, so it joins (at the boundary)
    rows = share_rows([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 9, 9]], [0, 1, 2])
    assert [(row.keys, row.shared) for row in rows] == [([0, 1, 2], 2)]
    with pytest.raises(ValueError):  # one key per block
        share_rows([[1, 2], [3, 4]], [0])


def test_pack_builds_every_tensor_on_the_device():
    batch = pack([([1, 2], [[3, 4], [5]]), ([6], [[7]])], pad_id=0, device="meta")
    for name in ("input_ids", "position_ids", "attention_mask", "rows", "cols"):
        tensor = getattr(batch, name)
        assert tensor.device.type == "meta", name
    assert batch.input_ids.dtype == torch.long and batch.attention_mask.shape == (2, 1, 5, 5)
    assert (batch.n_tokens, batch.n_pad) == (7, 3)


# -- the prefix cache's tensors ---------------------------------------------------------------------
def test_rows_pad_on_the_right_and_prefixes_stack_zero_padded():
    ids, lengths = pad_rows([[5, 6, 7], [8]], pad_id=3)
    assert (
        ids.tolist() == [[5, 6, 7], [8, 3, 3]]
        and lengths.tolist() == [3, 1]
        and ids.dtype == torch.long
    )
    one = torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).reshape(2, 1, 3, 2)
    two = torch.ones(2, 1, 1, 2)
    stacked = stack_padded([one, two])
    assert stacked.shape == (2, 2, 1, 3, 2)
    torch.testing.assert_close(stacked[:, 0], one)
    torch.testing.assert_close(stacked[:, 1, :, :1], two)
    assert not stacked[:, 1, :, 1:].any()
    equal = stack_padded([one, one + 1])
    torch.testing.assert_close(equal, torch.stack([one, one + 1], dim=1))
    kv = PrefixKV(one, two)
    assert kv.length == 3 and kv.nbytes == 2 * one.numel() * 4 and kv.values is two
