"""``UserSimulator`` without a language model: which adapter rates each user under each variant,
what a rating request holds (profile, retrieved memories, the cut window, the collaborative
cues), and that ``rate`` returns the scorer's rows in request order (``test_simulator.py`` and
``tests/envs/test_episode_values.py`` check the same routing with trained tiny adapters)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from persona_gym.artifacts import Artifacts, ArtifactsError, load_personas, load_tables
from persona_gym.simulator.memory import Interaction, logged_history
from persona_gym.simulator.prompts import PromptConfig
from persona_gym.simulator.retrieval import MemoryIndex
from persona_gym.simulator.simulator import UserSimulator

ADAPTERS = ["persona-0", "persona-1", "single-max"]


class FakeScorer:
    """Scores each request with a distribution that names its adapter and candidate."""

    def __init__(self, prompt: PromptConfig, adapters=ADAPTERS):
        self.builder = SimpleNamespace(config=prompt)
        self._adapters = list(adapters)
        self.requests: list = []

    @property
    def adapters(self) -> list[str]:
        return self._adapters

    def score(self, requests):
        self.requests += list(requests)
        return np.stack([distribution(r.adapter, r.candidate) for r in requests])


def distribution(adapter: str, candidate: int) -> np.ndarray:
    """A different distribution per (adapter, candidate)."""
    names = ["base", *ADAPTERS, "user-0", "user-1", "user-2", "user-3"]
    logits = np.array([names.index(adapter), candidate, 1.0, 0.5 * candidate, 0.0])
    return np.exp(logits) / np.exp(logits).sum()


class FakeCollaborative:
    def __init__(self):
        self.asked = []
        self.tastes = []

    def cues(self, user_id, candidate, window, taste=None):
        self.asked.append((user_id, candidate, tuple(window)))
        self.tastes.append(taste)
        return 3.25 + candidate, -0.5


def artifacts(table_artifacts, personas=None, collaborative=None) -> Artifacts:
    catalog, profiles, memories, embeddings = load_tables(table_artifacts)
    manifest = {
        "prompt": {"window_size": 2, "n_memories": 2, "max_tokens": 256},
        "adapters": {name: f"adapters/{name}" for name in ADAPTERS},
    }
    return Artifacts(
        table_artifacts,
        manifest,
        catalog,
        profiles,
        memories,
        embeddings,
        load_personas(table_artifacts) if personas is None else personas,
        collaborative,
    )


def simulator(
    table_artifacts, variant="persona", prompt=None, **kwargs
) -> tuple[UserSimulator, FakeScorer]:
    prompt = prompt or PromptConfig.paper(window_size=2, n_memories=2, max_tokens=256)
    scorer = FakeScorer(prompt)
    return UserSimulator(artifacts(table_artifacts, **kwargs), scorer, variant), scorer


def test_each_user_is_rated_by_their_personas_adapter(table_artifacts):
    sim, scorer = simulator(table_artifacts)
    assert [sim.persona(u) for u in sim.user_ids] == [0, 1, 0, 1]
    assert [sim.adapter_of(u) for u in sim.user_ids] == [
        "persona-0",
        "persona-1",
        "persona-0",
        "persona-1",
    ]
    probs = sim.rate([0, 1, 2, 3, 1], [5, 4, 3, 2, 1])
    assert [r.adapter for r in scorer.requests] == [
        "persona-0",
        "persona-1",
        "persona-0",
        "persona-1",
        "persona-1",
    ]
    expected = [
        distribution(a, c)
        for a, c in zip([r.adapter for r in scorer.requests], [5, 4, 3, 2, 1], strict=True)
    ]
    np.testing.assert_array_equal(probs, np.stack(expected))
    # another persona's adapter would rate the same user and movie differently
    assert not np.allclose(probs[0], distribution("persona-1", 5))
    assert len(scorer.requests) == 5  # one call for the whole batch


def test_persona_is_the_default_variant(table_artifacts):
    scorer = FakeScorer(PromptConfig.paper(window_size=2, n_memories=2, max_tokens=256))
    sim = UserSimulator(artifacts(table_artifacts), scorer)
    assert sim.variant == "persona" and sim.adapter_of(3) == "persona-1"


@pytest.mark.parametrize(
    "variant, adapters",
    [
        ("single-max", ["single-max"] * 4),
        ("base", ["base"] * 4),
        ("user", ["user-0", "user-1", "user-2", "user-3"]),
    ],
)
def test_other_variants_route_everyone_alike_or_by_user(table_artifacts, variant, adapters):
    sim, scorer = simulator(table_artifacts, variant=variant)
    sim.rate([0, 1, 2, 3], [0, 0, 0, 0])
    assert [r.adapter for r in scorer.requests] == adapters
    assert [sim.adapter_of(u) for u in range(4)] == adapters


def test_an_unknown_variant_names_the_adapters(table_artifacts):
    with pytest.raises(ValueError) as err:
        simulator(table_artifacts, variant="single-min")
    assert str(err.value) == (
        "variant 'single-min': no such adapter; available: "
        "['base', 'persona-0', 'persona-1', 'single-max']"
    )


def test_a_user_without_a_persona_reads_minus_one(table_artifacts):
    sim, _ = simulator(table_artifacts, variant="single-max", personas={0: 1, 1: 0})
    assert [sim.persona(u) for u in range(4)] == [1, 0, -1, -1]
    assert type(sim.persona(0)) is int


def test_the_rater_protocols_views(table_artifacts):
    sim, _ = simulator(table_artifacts)
    art = sim.artifacts
    assert sim.source == str(table_artifacts) and sim.user_ids == [0, 1, 2, 3]
    assert sim.catalog is art.catalog and sim.item_embeddings is art.item_embeddings
    assert (
        sim.window_size == 2 and sim.variant == "persona" and sim.prompt is sim.model.builder.config
    )
    assert sim.profile(1) == art.profiles[1] and sim.profile(np.int64(2)) == art.profiles[2]
    assert sim.history(3) == logged_history(art.memories, 3) and len(sim.history(3)) == 6


def test_a_request_holds_the_profile_the_top_memories_and_the_cut_window(table_artifacts):
    sim, _ = simulator(table_artifacts)
    window = tuple(Interaction(i, 1.0 + i % 5, 2000 + i) for i in range(4))
    request = sim.request(1, 2, window)
    top = MemoryIndex(sim.artifacts.memories, sim.artifacts.item_embeddings).top_k(1, 2, 2)
    assert len(top) == 2 and all(m.item_index != 2 for m in top)
    assert request.user_id == 1 and request.candidate == 2 and type(request.candidate) is int
    assert request.profile == sim.artifacts.profiles[1] and request.adapter == "persona-1"
    assert request.window == window[-2:]
    assert request.memories == tuple(m.text for m in top)
    assert request.memory_items == tuple((m.item_index, m.rating) for m in top)
    assert request.cf_prediction is None and request.surprise is None
    assert sim.request(1, 2).window == ()


def test_rate_without_windows_means_empty_windows(table_artifacts):
    sim, scorer = simulator(table_artifacts)
    sim.rate([0, 1], [1, 2])
    assert [r.window for r in scorer.requests] == [(), ()]
    sim.rate([0], [1], [(Interaction(3, 4.0, 1), Interaction(4, 2.0, 2), Interaction(5, 5.0, 3))])
    assert scorer.requests[-1].window == (Interaction(4, 2.0, 2), Interaction(5, 5.0, 3))
    with pytest.raises(ValueError):  # one window per row
        sim.rate([0, 1], [1, 2], [()])


@pytest.mark.parametrize(
    "cues", [dict(cf_cue=True), dict(surprise_cue=True), dict(cf_cue=True, surprise_cue=True)]
)
def test_collaborative_cues_come_from_the_artifacts_model(table_artifacts, cues):
    collaborative = FakeCollaborative()
    prompt = PromptConfig.paper(window_size=2, n_memories=1, max_tokens=256, **cues)
    sim, _ = simulator(table_artifacts, prompt=prompt, collaborative=collaborative)
    window = (Interaction(0, 5.0, 1), Interaction(1, 4.0, 2), Interaction(3, 2.0, 3))
    request = sim.request(2, 4, window)
    assert (request.cf_prediction, request.surprise) == (7.25, -0.5)
    assert collaborative.asked == [(2, 4, window[-2:])]  # the cut window
    assert collaborative.tastes == [
        None
    ]  # no persona_taste in the manifest: the user's own factors
    # with it, the cues use the taste of the user under the adapter that rates them
    sim.artifacts.taste = lambda user, adapter: np.array([user, int(adapter[-1])])
    request = sim.request(3, 4, window)
    np.testing.assert_array_equal(collaborative.tastes[-1], [3, sim.persona(3)])
    assert request.adapter == f"persona-{sim.persona(3)}"
    bare, _ = simulator(table_artifacts, prompt=prompt)
    with pytest.raises(ArtifactsError, match="collaborative"):
        bare.request(2, 4, window)


def test_bad_users_and_candidates_are_named(table_artifacts):
    sim, _ = simulator(table_artifacts)
    with pytest.raises(KeyError) as err:
        sim.request(99, 0)
    assert err.value.args[0] == f"user 99 is not a simulated user of {table_artifacts}"
    for candidate in (-1, 6):
        with pytest.raises(IndexError) as err:
            sim.request(0, candidate)
        assert str(err.value) == f"candidate {candidate} is outside the catalogue (0..5)"
    assert sim.request(0, 5).candidate == 5 and sim.request(0, 0).candidate == 0
