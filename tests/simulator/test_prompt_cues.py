"""Collaborative cues in the rating prompt (text and item-token layouts)."""

from __future__ import annotations

import pytest

from persona_gym.simulator.memory import Interaction
from persona_gym.simulator.prompts import ITEM_MARK, PromptBuilder, PromptConfig, RatingRequest

WINDOW = (Interaction(0, 4.0, 1), Interaction(1, 2.0, 2))


def _request(**kw):
    return RatingRequest(
        user_id=1,
        profile="I like thrillers.",
        candidate=2,
        window=WINDOW,
        memories=("I rated Heat 4/5.",),
        memory_items=((3, 4.0),),
        **kw,
    )


def test_text_prompt_shows_prediction_and_surprise(tokenizer, catalog):
    builder = PromptBuilder(tokenizer, catalog, PromptConfig.paper(cf_cue=True, surprise_cue=True))
    request = _request(cf_prediction=4.26, surprise=-0.34)
    text = tokenizer.decode(builder.block_ids(request))
    assert "Surprise:-0.3" in text
    assert text.endswith("Viewers' average: 3.8. Predicted: 4.3. My rating:")
    plain = tokenizer.decode(
        PromptBuilder(tokenizer, catalog, PromptConfig.paper()).block_ids(request)
    )
    assert "Predicted" not in plain and "Surprise" not in plain
    assert plain.endswith("Viewers' average: 3.8. My rating:")


def test_item_prompt_puts_prediction_before_the_answer(tokenizer, catalog):
    config = PromptConfig.paper(item_tokens=True, cf_cue=True, surprise_cue=True, cf_items=True)
    builder = PromptBuilder(tokenizer, catalog, config)
    request = _request(cf_prediction=2.0, surprise=1.25)
    text = builder.answer_start(request, request.memory_items)
    assert text == f"Memory:{ITEM_MARK}4 Movie:{ITEM_MARK} Average:3.8 Predicted:2.0 Rating:"
    assert builder.block_text(request, WINDOW, ()).endswith(f"{ITEM_MARK}2 Surprise:+1.2")
    ids = builder.block_ids(request)
    assert sorted(-i - 1 for i in ids if i < 0) == [0, 1, 2, 3]  # window, memory, candidate


def test_missing_cues_and_bad_config_are_named(tokenizer, catalog):
    builder = PromptBuilder(tokenizer, catalog, PromptConfig.paper(cf_cue=True))
    with pytest.raises(ValueError, match="cf_prediction"):
        builder.block_ids(_request())
    builder = PromptBuilder(tokenizer, catalog, PromptConfig.paper(surprise_cue=True))
    with pytest.raises(ValueError, match="surprise"):
        builder.block_ids(_request())
    with pytest.raises(ValueError, match="cf_items needs item_tokens"):
        PromptConfig.paper(cf_items=True)
    assert (
        PromptConfig.paper(cf_cue=True).uses_collaborative
        and not PromptConfig.paper().uses_collaborative
    )
