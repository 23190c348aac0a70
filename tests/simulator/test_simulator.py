"""UserSimulator: artifacts + rating model → rating distributions for (user, item, window)."""

from __future__ import annotations

import numpy as np
import pytest

from persona_gym.simulator.memory import Interaction
from persona_gym.simulator.simulator import UserSimulator


@pytest.fixture(scope="module")
def simulator(trained_tiny_artifacts):
    return UserSimulator.load(trained_tiny_artifacts)


def test_rate_uses_each_users_persona_adapter(simulator):
    assert simulator.user_ids == [0, 1, 2, 3]
    assert [simulator.adapter_of(u) for u in range(4)] == ["persona-0", "persona-1"] * 2
    probs = simulator.rate([0, 1, 2, 3], [0, 1, 2, 3], [(), (Interaction(4, 5, 1),), (), ()])
    assert probs.shape == (4, 5)
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-6)
    alone = simulator.rate([1], [1], [(Interaction(4, 5, 1),)])
    np.testing.assert_allclose(probs[1], alone[0], atol=1e-6)


def test_requests_retrieve_memories_and_cut_the_window(simulator):
    window = tuple(Interaction(i, 3, i) for i in range(5))
    request = simulator.request(0, 2, window)
    assert request.window == window[-2:]  # the artifacts' prompt window size is 2
    assert len(request.memories) == 1 and "Heat" not in request.memories[0]  # own item excluded


def test_bad_users_and_items_are_named(simulator):
    with pytest.raises(KeyError, match="user 99 is not a simulated user"):
        simulator.rate([99], [0])
    with pytest.raises(IndexError, match="candidate 6 is outside the catalogue"):
        simulator.rate([0], [6])


def test_single_and_base_variants(trained_tiny_artifacts):
    single = UserSimulator.load(trained_tiny_artifacts, variant="single-max")
    base = UserSimulator.load(trained_tiny_artifacts, variant="base")
    assert single.adapter_of(3) == "single-max" and base.adapter_of(3) == "base"
    assert np.abs(single.rate([0], [1]) - base.rate([0], [1])).max() > 0
    with pytest.raises(ValueError, match="no-such"):
        UserSimulator.load(trained_tiny_artifacts, variant="no-such")
