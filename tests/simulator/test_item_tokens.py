"""Compact prompts: each movie as one soft token (PromptConfig.item_tokens, engine.ItemTokens)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from persona_gym.artifacts import load_artifacts
from persona_gym.simulator.adapters import ITEM_TOKENS_FILE, load_item_tokens, save_item_tokens
from persona_gym.simulator.engine import ItemTokens, pack
from persona_gym.simulator.memory import Interaction
from persona_gym.simulator.prompts import PromptBuilder, PromptConfig, RatingRequest
from persona_gym.simulator.rating_model import RatingModel
from persona_gym.simulator.simulator import UserSimulator
from tests.simulator.test_rating_model import PROFILE_A, PROFILE_B, add_random_adapters
from tests.training.test_train import config
from training.train import train

WINDOW = (Interaction(1, 4, 10), Interaction(2, 2.5, 20))


def request(candidate: int, user: int = 0, adapter: str = "base", window=WINDOW) -> RatingRequest:
    return RatingRequest(
        user_id=user,
        profile=PROFILE_A if user == 0 else PROFILE_B,
        candidate=candidate,
        window=window,
        memories=("I rated Heat (1995) 5/5: crime is my thing",),
        memory_items=((3, 5.0),),
        adapter=adapter,
    )


def builder_for(tokenizer, catalog, item_tokens: bool) -> PromptBuilder:
    prompt = PromptConfig.paper(
        window_size=2, n_memories=1, max_tokens=256, item_tokens=item_tokens
    )
    return PromptBuilder(tokenizer, catalog, prompt)


def random_items(catalog, hidden: int, layer: int, seed: int = 0) -> ItemTokens:
    torch.manual_seed(seed)
    embeddings = torch.randn(len(catalog), 16)
    items = ItemTokens(embeddings.numpy(), hidden, layer)
    torch.nn.init.normal_(items.proj.weight, std=0.5)
    torch.nn.init.normal_(items.proj.bias, std=0.5)
    return items.eval()


def test_block_holds_one_item_id_per_movie_in_text_order(tokenizer, catalog):
    soft = builder_for(tokenizer, catalog, True)
    text = builder_for(tokenizer, catalog, False)
    block = soft.block_ids(request(4))
    assert [i for i in block if i < 0] == [-2, -3, -4, -5]  # window 1, 2; memory 3; candidate 4
    decoded = tokenizer.decode([i for i in block if i >= 0])
    assert "user\nRecently rated:4;2.5<|im_end|>" in decoded  # the state: the window only
    assert decoded.endswith(
        "assistant\nMemory:5 Movie: Average:3.5 Rating:"
    )  # the candidate's part
    assert len(block) < len(text.block_ids(request(4))) - 20
    empty = soft.block_ids(request(4, window=()))
    assert "Recently rated: nothing yet" in tokenizer.decode([i for i in empty if i >= 0])
    # candidates in one state differ only in their last tokens (what RatingModel shares)
    other = soft.block_ids(RatingRequest(0, PROFILE_A, 0, window=WINDOW, memory_items=((5, 2.0),)))
    assert other[: len(block) - 14] == block[: len(block) - 14]


def test_item_layer_zero_equals_the_model_fed_the_item_vectors(tokenizer, catalog, tiny_llama):
    """Independent reference: HF forward on input embeddings with the item vectors put in."""
    builder = builder_for(tokenizer, catalog, True)
    items = random_items(catalog, tiny_llama.config.hidden_size, layer=0)
    model = RatingModel(tiny_llama, builder, item_tokens={"base": items})
    batch = [request(c, user=c % 2) for c in (0, 2, 5)]
    probs = model.score(batch)
    for row, r in zip(probs, batch, strict=True):
        ids = torch.tensor([builder.full_ids(r)])
        with torch.no_grad():
            embeds = tiny_llama.get_input_embeddings()(ids.clamp_min(0))
            embeds = items.inject(embeds, ids)
            logits = tiny_llama(inputs_embeds=embeds).logits[0, -1, builder.rating_token_ids]
        np.testing.assert_allclose(row, logits.softmax(-1).double().numpy(), atol=1e-5)


def test_cached_scoring_equals_the_packed_path_and_follows_the_item(tokenizer, catalog):
    from tests.conftest import make_tiny_llama

    builder = builder_for(tokenizer, catalog, True)
    peft_model = add_random_adapters(make_tiny_llama(len(tokenizer)), ["p0", "p1"])
    hidden = peft_model.config.hidden_size
    items = {
        "p0": random_items(catalog, hidden, 2, seed=1),
        "p1": random_items(catalog, hidden, 2, seed=2),
    }
    model = RatingModel(peft_model, builder, item_tokens=items)
    batch = [request(c, user=c % 2, adapter=("p0", "p1")[c % 2]) for c in range(6)]
    probs = model.score(batch)
    for row, r in zip(probs, batch, strict=True):
        peft_model.set_adapter(r.adapter)
        model.layered.items = items[r.adapter]
        prefix, block = builder.segments(r)
        packed = pack([(prefix, [block])], model.pad_id)
        with torch.no_grad():
            reference = model.layered.forward(packed).softmax(-1)[0]
        np.testing.assert_allclose(row, reference.double().numpy(), atol=1e-5)
    # the rating depends on which movie the soft token stands for
    assert (
        np.abs(
            model.score([request(0, adapter="p0")]) - model.score([request(5, adapter="p0")])
        ).max()
        > 1e-4
    )


def test_item_projection_round_trips_through_its_file(tmp_path, tokenizer, catalog, tiny_llama):
    builder = builder_for(tokenizer, catalog, True)
    embeddings = np.random.default_rng(0).normal(size=(len(catalog), 16)).astype(np.float32)
    items = ItemTokens(embeddings, tiny_llama.config.hidden_size, 2)
    torch.nn.init.normal_(items.proj.weight)
    save_item_tokens(items, tmp_path)
    loaded = load_item_tokens({"base": tmp_path}, embeddings)["base"]
    batch = [request(c) for c in (1, 4)]
    before = RatingModel(tiny_llama, builder, item_tokens={"base": items.eval()}).score(batch)
    after = RatingModel(tiny_llama, builder, item_tokens={"base": loaded}).score(batch)
    np.testing.assert_array_equal(before, after)
    with pytest.raises(ValueError, match="8-d"):
        load_item_tokens({"base": tmp_path}, embeddings[:, :8])
    with pytest.raises(
        FileNotFoundError, match=f"{ITEM_TOKENS_FILE}.*retrain with `persona-gym train`"
    ):
        load_item_tokens({"p0": tmp_path / "nowhere"}, embeddings)


def test_item_token_prompts_need_projections_and_cannot_generate(tokenizer, catalog, tiny_llama):
    builder = builder_for(tokenizer, catalog, True)
    peft_model = add_random_adapters(tiny_llama, ["p0"])
    with pytest.raises(ValueError, match=r"\['p0'\].*train them with `persona-gym train`"):
        RatingModel(peft_model, builder)
    model = RatingModel(
        peft_model,
        builder,
        item_tokens={"p0": random_items(catalog, peft_model.config.hidden_size, 2)},
    )
    with pytest.raises(ValueError, match="base.*`persona-gym train`"):
        model.score([request(1, adapter="base")])
    with pytest.raises(ValueError, match="generation needs text prompts"):
        model.generate([request(1, adapter="p0")])


def test_training_with_item_tokens_learns_and_ships_a_projection(artifacts, tiny_base):
    prompt = PromptConfig.paper(window_size=2, n_memories=1, max_tokens=256, item_tokens=True)
    manifest = train(
        artifacts, config(tiny_base, variants=("persona",), prompt=prompt), progress=False
    )
    assert manifest["prompt"]["item_tokens"] is True
    loaded = load_artifacts(artifacts)
    assert loaded.prompt_config.item_tokens
    for name, folder in loaded.adapter_dirs.items():
        state = torch.load(folder / ITEM_TOKENS_FILE, weights_only=True)
        assert state["layer"] == 2 and state["weight"].abs().sum() > 0, name
    simulator = UserSimulator.load(artifacts, base_model=tiny_base)
    probs = simulator.rate([0, 0], [1, 2])
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    assert np.abs(probs[0] - probs[1]).max() > 0
