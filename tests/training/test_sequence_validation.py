"""The sequence trainer's validation stretch (its two layouts) and the gap scale refitted on it
(training/sequence_training.py), on synthetic reads: no model needed."""

from __future__ import annotations

import logging

import numpy as np
import torch

from persona_gym.simulator.rating_prior import RatingPrior
from persona_gym.simulator.sequence import GAP_BUCKETS, SequenceTokens, UserSequence
from training.sequence_training import (
    SequenceTrainConfig,
    _val_examples,
    fit_gap_scale,
    held_out,
)


def _tokens() -> SequenceTokens:
    return SequenceTokens(
        np.random.default_rng(0).normal(size=(10, 4)), torch.randn(5, 8), torch.zeros(8)
    )


def _reads(gen: torch.Generator, n: int, gap: int, scale: float, prior: RatingPrior):
    """``n`` synthetic reads at ``gap``: the LM's digit logits, and ratings drawn from the prior
    plus ``scale`` times them."""
    digits = 1.5 * torch.randn(n, 5, generator=gen)
    predictions = 2.0 + 2.5 * torch.rand(n, generator=gen)
    with torch.no_grad():
        logits = prior(scale * digits, predictions, torch.zeros(n))
    ratings = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0] + 1
    return digits, ratings, predictions, torch.full((n,), gap)


def test_the_gap_scale_keeps_the_departure_where_it_predicts_the_rating():
    gen = torch.Generator().manual_seed(0)
    prior = RatingPrior().requires_grad_(False)
    parts = [
        _reads(gen, 3000, 0, 1.0, prior),  # next to the window: the SLM's part is real
        _reads(gen, 40, 1, 1.0, prior),  # too few reads for a scale of its own
        _reads(gen, 3000, 5, 0.0, prior),  # far from it (bucket 3): noise around the prior
    ]
    read = [torch.cat(column) for column in zip(*parts, strict=True)]
    tokens = _tokens()
    counts = fit_gap_scale(tokens, prior, *read, mse_weight=0.1)
    assert counts == [3000, 40, 0, 3000, 0, 0, 0, 0]
    scale = tokens.scale.detach()
    assert 0.85 <= float(scale[0]) <= 1.15
    assert float(scale[3]) <= 0.15
    # a bucket without enough reads takes the nearest fitted one below it
    assert scale[1] == scale[0] and scale[2] == scale[0]
    assert torch.all(scale[4:] == scale[3])


def test_too_few_reads_keep_the_learned_scale_and_say_so(caplog):
    prior = RatingPrior().requires_grad_(False)
    tokens = _tokens()
    with torch.no_grad():
        tokens.scale.fill_(0.7)
    read = _reads(torch.Generator().manual_seed(1), 20, 0, 1.0, prior)
    with caplog.at_level(logging.WARNING):
        assert fit_gap_scale(tokens, prior, *read, mse_weight=0.1)[0] == 20
    assert torch.allclose(tokens.scale, torch.full((GAP_BUCKETS,), 0.7))
    assert "learned gap scale is kept" in caplog.text


def test_the_validation_stretch_is_read_with_the_rolling_and_the_evaluators_window():
    config = SequenceTrainConfig(history=3, window=2, val_per_user=2, val_share=0.25)
    n = 20
    seq = UserSequence(np.arange(n), np.ones(n, dtype=np.float32), np.full(n, 3.0, np.float32))
    assert held_out(n, config) == 5 and held_out(4, config) == 2
    (rolling,) = _val_examples({7: seq}, config, rolling=True)
    (far,) = _val_examples({7: seq}, config, rolling=False)
    for example in (rolling, far):  # the history before the window that precedes the stretch
        assert example.prefix.items.tolist() == [10, 11, 12]
    assert [b.items.tolist() for b in rolling.blocks] == [
        [13, 14, 15],
        [14, 15, 16],
        [15, 16, 17],
        [16, 17, 18],
        [17, 18, 19],
    ]
    assert rolling.gaps == [0] * 5
    assert [b.items.tolist() for b in far.blocks] == [[13, 14, t] for t in range(15, 20)]
    assert far.gaps == [0, 1, 2, 3, 4]
