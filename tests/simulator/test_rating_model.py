"""RatingModel, prompt builder and artifacts manifest on a tiny random Llama of SmolLM2's shape."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from persona_gym.artifacts import SCHEMA_VERSION, ArtifactsError, read_manifest, write_manifest
from persona_gym.simulator.adapters import attach_adapters
from persona_gym.simulator.engine import pack
from persona_gym.simulator.memory import Interaction
from persona_gym.simulator.prompts import (
    PromptBuilder,
    PromptConfig,
    RatingRequest,
    rating_token_ids,
)
from persona_gym.simulator.rating_model import RatingModel, parse_rating
from tests.conftest import make_tiny_llama

PROFILE_A = "You rate generously and love animation and comedies."
PROFILE_B = "You are a harsh critic of action films; dramas please you."


def add_random_adapters(model, names, seed=0):
    """Wrap ``model`` with LoRA adapters whose B matrices are random (so they change outputs)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
        layers_to_transform=[2, 3],
    )
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
        torch.manual_seed(seed + len(name))
        for module in peft_model.modules():
            if hasattr(module, "lora_B") and name in module.lora_B:
                torch.nn.init.normal_(module.lora_B[name].weight, std=0.5)
    return peft_model.eval()


def requests(adapters=("base",)):
    window = (Interaction(1, 4, 10), Interaction(2, 2, 20))
    out = []
    for n, candidate in enumerate([0, 2, 3, 5, 4, 1]):
        out.append(
            RatingRequest(
                user_id=n % 2,
                profile=PROFILE_A if n % 2 == 0 else PROFILE_B,
                candidate=candidate,
                window=window[: n % 3],
                memories=("I rated Heat (1995) 5/5: crime is my thing",),
                adapter=adapters[n % len(adapters)],
            )
        )
    return out


@pytest.fixture
def builder(tokenizer, catalog):
    return PromptBuilder(
        tokenizer, catalog, PromptConfig.paper(window_size=2, n_memories=1, max_tokens=256)
    )


def plain_logits(model, builder, request):
    """The reference: the whole prompt through model.forward, last-token rating logits."""
    ids = torch.tensor([builder.full_ids(request)])
    with torch.no_grad():
        return model(ids).logits[0, -1, builder.rating_token_ids]


def test_probabilities_sum_to_one_and_match_plain_forward(tiny_llama, builder):
    model = RatingModel(tiny_llama, builder)
    batch = requests()
    probs = model.score(batch)
    assert probs.shape == (6, 5)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    reference = torch.stack([plain_logits(tiny_llama, builder, r) for r in batch]).softmax(-1)
    np.testing.assert_allclose(probs, reference.double().numpy(), atol=1e-5)


def test_grouped_multi_adapter_equals_each_adapter_alone(tokenizer, builder):
    peft_model = add_random_adapters(make_tiny_llama(len(tokenizer)), ["p0", "p1"])
    model = RatingModel(peft_model, builder)
    mixed = requests(adapters=("p0", "p1", "base"))
    probs = model.score(mixed)
    for request, row in zip(mixed, probs, strict=True):
        alone = model.score([request])[0]
        np.testing.assert_allclose(row, alone, atol=1e-5)
        if request.adapter == "base":
            with peft_model.disable_adapter():
                ref = plain_logits(peft_model, builder, request)
        else:
            peft_model.set_adapter(request.adapter)
            ref = plain_logits(peft_model, builder, request)
        np.testing.assert_allclose(row, ref.softmax(-1).double().numpy(), atol=1e-5)
    # the adapters really differ from each other and from the base model
    same = [r for r in mixed if r.user_id == 0][0]
    outs = [
        model.score([RatingRequest(**{**same.__dict__, "adapter": a})])[0]
        for a in ("p0", "p1", "base")
    ]
    assert np.abs(outs[0] - outs[1]).max() > 1e-3 and np.abs(outs[0] - outs[2]).max() > 1e-3


def test_unknown_adapter_is_a_clear_error(tiny_llama, builder):
    model = RatingModel(tiny_llama, builder)
    with pytest.raises(KeyError, match="adapter 'persona-9' is not loaded"):
        model.score([RatingRequest(0, PROFILE_A, 1, adapter="persona-9")])


def test_save_load_round_trip_gives_identical_scores(tmp_path, tokenizer, builder):
    peft_model = add_random_adapters(make_tiny_llama(len(tokenizer)), ["p0", "p1"])
    batch = requests(adapters=("p0", "p1"))
    before = RatingModel(peft_model, builder).score(batch)
    peft_model.save_pretrained(tmp_path)  # non-default names go to tmp_path/<name>
    reloaded = attach_adapters(
        make_tiny_llama(len(tokenizer)), {"p0": tmp_path / "p0", "p1": tmp_path / "p1"}
    )
    after = RatingModel(reloaded, builder).score(batch)
    np.testing.assert_array_equal(before, after)


def test_missing_adapter_folder_fails_clearly(tmp_path, tiny_llama):
    with pytest.raises(FileNotFoundError, match="adapter_config.json.*persona-gym train"):
        attach_adapters(tiny_llama, {"p0": tmp_path / "nowhere"})


def test_manifest_validation(tmp_path):
    with pytest.raises(ArtifactsError, match="persona-gym train"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{ not json")
    with pytest.raises(ArtifactsError, match="not valid JSON"):
        read_manifest(tmp_path)
    base = {
        "base_model": {"model": "x", "sha256": None},
        "adapters": {"persona-0": "adapters/persona-0"},
        "prompt": {},
        "dataset": "ml-100k",
    }
    write_manifest(tmp_path, base)
    with pytest.raises(ArtifactsError, match="adapter 'persona-0' lacks"):
        read_manifest(tmp_path)
    (tmp_path / "adapters" / "persona-0").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / "adapters" / "persona-0" / name).write_text("{}")
    assert read_manifest(tmp_path)["schema_version"] == SCHEMA_VERSION
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["schema_version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ArtifactsError, match="schema_version 99 is not supported"):
        read_manifest(tmp_path)


def test_base_model_mismatch_fails(tmp_path):
    from persona_gym.artifacts import check_base_model
    from persona_gym.assets import SOURCE_FILE

    (tmp_path / SOURCE_FILE).write_text(json.dumps({"model": "other", "sha256": "b" * 64}))
    with pytest.raises(ArtifactsError, match="trained on base model"):
        check_base_model({"base_model": {"model": "smol", "sha256": "a" * 64}}, str(tmp_path))


def test_rating_tokens_must_be_single_tokens():
    class SplitsDigits:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [7, 8]}

    with pytest.raises(ValueError, match="encodes the rating '1' as 2 tokens"):
        rating_token_ids(SplitsDigits())


def test_prompt_budget_cuts_memories_then_window_then_profile(tokenizer, catalog):
    window = tuple(Interaction(i, 4, i) for i in range(5))
    memories = ("I rated Heat (1995) 5/5 " + "because of its long heist scenes " * 3,) * 2
    request = RatingRequest(0, PROFILE_A * 6, 0, window=window, memories=memories)
    sizes = {}
    for budget in (4096, 200, 150, 100):
        b = PromptBuilder(
            tokenizer, catalog, PromptConfig.paper(window_size=5, n_memories=2, max_tokens=budget)
        )
        prefix, block = b.segments(request)
        text = tokenizer.decode(block)
        sizes[budget] = (len(prefix), text.count("Memory:"), text.count("(1995)"))
        assert len(prefix) + len(block) <= budget
        assert "Toy Story (1995); Animation, Comedy" in text  # the candidate is never cut
    assert sizes[4096][1:] == (2, 5 + 2 + 1)
    assert sizes[200][1] < 2  # memories go first
    assert sizes[100][0] < sizes[4096][0]  # the profile is cut last


def test_pack_blocks_see_only_prefix_and_themselves(tiny_llama, tokenizer):
    """A block's rating is the same whatever other blocks share its sequence."""
    from persona_gym.simulator.engine import LayeredLM

    layered = LayeredLM(tiny_llama, [33, 34, 35, 36, 37])
    prefix, blocks = [1, 2, 3, 4, 5], [[6, 7], [8, 9, 10], [11]]
    with torch.no_grad():
        together = layered.forward(pack([(prefix, blocks)], 0))
        alone = torch.cat([layered.forward(pack([(prefix, [b])], 0)) for b in blocks])
        padded = layered.forward(pack([(prefix, blocks), ([1], [[2]])], 0))[:3]
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)


def test_prefix_cache_is_reused_and_bounded(tiny_llama, builder):
    model = RatingModel(tiny_llama, builder)
    batch = requests()
    first = model.score(batch)
    prefixes = sum(len(builder.prefix_ids(p)) for p in (PROFILE_A, PROFILE_B))
    with_prefixes = model.tokens_processed
    again = model.score(batch)
    blocks = model.tokens_processed - with_prefixes  # second call: blocks only
    assert with_prefixes == blocks + prefixes  # each prefix computed once
    assert blocks <= sum(len(builder.segments(r)[1]) for r in batch)
    np.testing.assert_array_equal(first, again)
    model.cache.max_bytes = 1  # keeps only what the current call needs
    model.score(batch[:1])
    assert len(model.cache) == 1
    np.testing.assert_allclose(model.score(batch), first, atol=1e-6)


def test_repeated_kv_heads_give_the_same_attention():
    """The CUDA path (key/value heads repeated) equals the CPU path (``enable_gqa``)."""
    from persona_gym.simulator.engine.attention import sdpa

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 3, 8, generator=gen)
    k, v = torch.randn(2, 2, 7, 8, generator=gen), torch.randn(2, 2, 7, 8, generator=gen)
    mask = torch.rand(2, 1, 3, 7, generator=gen) > 0.3
    mask[..., 0] = True  # every query sees at least one key
    torch.testing.assert_close(
        sdpa(q, k, v, mask, 0.3, repeat_kv=True), sdpa(q, k, v, mask, 0.3, repeat_kv=False)
    )


def test_crowd_cue_starts_the_answer_with_the_item_average(tokenizer, catalog):
    """The block ends with the candidate's average right before the rating is read."""
    config = PromptConfig.paper(window_size=0, n_memories=0, max_tokens=256)
    cued = PromptBuilder(tokenizer, catalog, config)
    plain = PromptBuilder(
        tokenizer,
        catalog,
        PromptConfig.paper(window_size=0, n_memories=0, max_tokens=256, crowd_cue=False),
    )
    request = RatingRequest(user_id=0, profile=PROFILE_A, candidate=0)
    text = tokenizer.decode(cued.block_ids(request))
    assert text.endswith("<|im_start|>assistant\nViewers' average: 3.9. My rating:")
    assert tokenizer.decode(plain.block_ids(request)).endswith("<|im_start|>assistant\n")
    unrated = RatingRequest(user_id=0, profile=PROFILE_A, candidate=5)  # no training ratings
    assert tokenizer.decode(cued.block_ids(unrated)).endswith("Viewers' average: none. My rating:")


def test_manifests_from_before_the_crowd_cue_load_without_it(tmp_path, catalog):
    from persona_gym.artifacts import Artifacts

    manifest = {
        "prompt": {"window_size": 3, "n_memories": 1, "use_profile": True, "max_tokens": 384}
    }
    old = Artifacts(tmp_path, manifest, catalog, {}, None, None, {})
    assert old.prompt_config.crowd_cue is False
    manifest["prompt"]["crowd_cue"] = True
    assert (
        Artifacts(tmp_path, manifest, catalog, {}, None, None, {}).prompt_config.crowd_cue is True
    )


def test_generated_answers_parse_to_ratings():
    assert parse_rating(" 4") == 4.0
    assert parse_rating(" 3.6") == 4.0  # the crowd cue's format: rounded, not truncated to 3
    assert parse_rating(" 3.4 stars") == 3.0 and parse_rating("2.5") == 3.0
    assert parse_rating("My rating: 5/5") == 5.0
    for unrelated in ("", " great movie", " 0", " 7", " 10"):
        assert np.isnan(parse_rating(unrelated)), unrelated


def test_candidates_in_one_state_share_their_block_start(tiny_llama, builder):
    """Ranking: many movies for one user and window compute the window part once, with the
    ratings of the plain one-prompt-per-candidate path."""
    window = (Interaction(1, 4, 10), Interaction(2, 2, 20))
    batch = [
        RatingRequest(0, PROFILE_A, c, window=window, memories=(f"memory {c}",)) for c in range(6)
    ]
    model = RatingModel(tiny_llama, builder)
    model.score(batch[:1])  # caches the prefix
    before = model.tokens_processed
    probs = model.score(batch)
    reference = torch.stack([plain_logits(tiny_llama, builder, r) for r in batch]).softmax(-1)
    np.testing.assert_allclose(probs, reference.double().numpy(), atol=1e-5)
    blocks = [builder.segments(r)[1] for r in batch]
    common = 0
    while len({tuple(b[: common + 1]) for b in blocks}) == 1:
        common += 1
    assert common > 10  # the chat turn and the window
    assert model.tokens_processed - before == sum(len(b) for b in blocks) - 5 * common


def test_share_rows_never_costs_more_and_keeps_every_block():
    from persona_gym.simulator.engine import share_rows

    rng = np.random.default_rng(0)
    states = [rng.integers(0, 5, 12).tolist() for _ in range(3)]
    blocks = [
        states[n % 3] + rng.integers(0, 5, int(rng.integers(1, 6))).tolist() for n in range(30)
    ]
    blocks += [[7], [7], [7, 1]]  # duplicates and a one-token block
    rows = share_rows(blocks, list(range(len(blocks))), max_width=60)
    assert sorted(k for row in rows for k in row.keys) == list(range(len(blocks)))
    assert sum(row.width for row in rows) < sum(len(b) for b in blocks)
    for row in rows:
        shared, suffixes = row.segments()
        assert row.width <= 60 or len(row.blocks) == 1
        assert row.width == len(shared) + sum(len(s) for s in suffixes)
        for key, suffix in zip(row.keys, suffixes, strict=True):
            assert suffix and shared + suffix == blocks[key]  # the rating token stays in the block


def test_batches_bound_padding_and_tokens(tiny_llama, builder):
    model = RatingModel(tiny_llama, builder, max_batch_tokens=1000)
    assert model._budget([100] * 12, lambda n: n) == [[100] * 10, [100] * 2]
    model.max_batch_tokens = 10_000
    assert model._budget([100] * 12 + [110, 300], lambda n: n) == [
        [100] * 12 + [110],
        [300],
    ]  # the long row alone


def test_compiled_layers_keep_a_graph_per_adapter(tiny_llama):
    """dynamo guards on peft's active adapter: 8 personas and their shapes need more than its
    default 8 graphs, or the rest would silently run eagerly."""
    from persona_gym.simulator.engine import RECOMPILE_LIMIT, LayeredLM

    LayeredLM(tiny_llama, [33, 34, 35, 36, 37], compile=True)
    assert torch._dynamo.config.recompile_limit >= RECOMPILE_LIMIT >= 2 * 9
