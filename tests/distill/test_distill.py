"""Distillers: data templates, no test leakage, determinism, LLM backends, resumable cache."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from persona_gym.catalog import ItemCatalog
from persona_gym.data import RatingsDataset, load_dataset, protocol_split
from persona_gym.distill import MEMORY_COLUMNS, DataDistiller, UserMemories
from training.chat import ChatBackendError, HFChatBackend, OpenAIChatBackend
from training.distill import LLMDistiller, LLMDistillerConfig, parse_reply

GENRES = ["Action", "Comedy", "Drama", "Horror", "Romance"]


def synthetic_dataset(
    n_users: int = 4, n_items: int = 30, per_user: int = 25, seed: int = 0
) -> RatingsDataset:
    """Small dataset: users who love one genre and hate another."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, n_items + 1, dtype=np.int64),
            "title": [f"Movie {i}" for i in range(1, n_items + 1)],
            "year": pd.array([1950 + (i * 7) % 50 for i in range(n_items)], dtype="Int64"),
            "genres": [
                (GENRES[i % 5],) if i % 3 else (GENRES[i % 5], GENRES[(i + 1) % 5])
                for i in range(n_items)
            ],
        }
    )
    rows = []
    for u in range(1, n_users + 1):
        liked, hated = GENRES[u % 5], GENRES[(u + 2) % 5]
        for t, i in enumerate(rng.choice(n_items, size=per_user, replace=False)):
            g = items["genres"][i]
            r = 5 if liked in g else 1 if hated in g else int(rng.integers(2, 5))
            rows.append((u, int(i) + 1, r, 1000 * u + t))
    ratings = pd.DataFrame(rows, columns=["user_id", "item_id", "rating", "timestamp"])
    users = pd.DataFrame(
        {
            "user_id": np.arange(1, n_users + 1),
            "gender": ["M", "F"] * (n_users // 2),
            "age": [25 + u for u in range(n_users)],
            "occupation": ["writer"] * n_users,
            "zip": ["00000"] * n_users,
        }
    )
    return RatingsDataset("synthetic", ratings, users, items)


def synthetic_split(n_users: int = 4):
    ds = synthetic_dataset(n_users=n_users)
    split = protocol_split(ds, n_users=n_users, min_interactions=10, max_interactions=50, seed=0)
    return ds, split, ItemCatalog.from_frames(ds.items, split.item_stats())


def _memories_bytes(result: UserMemories, out: Path) -> dict[str, bytes]:
    result.save(out)
    return {name: (out / name).read_bytes() for name in ("profiles.jsonl", "memories.parquet")}


# ------------------------------------------------------------------------------- data backend


def test_data_distiller_covers_every_training_interaction() -> None:
    ds, split, catalog = synthetic_split()
    result = DataDistiller().distill(ds, split, catalog)
    assert sorted(result.profiles) == [int(u) for u in split.user_ids]
    assert list(result.memories.columns) == MEMORY_COLUMNS
    assert len(result.memories) == len(split.train)
    merged = result.memories.merge(split.train, on=["user_id", "item_id", "timestamp"])
    assert len(merged) == len(split.train) and (merged["rating_x"] == merged["rating_y"]).all()
    test_keys = set(zip(split.test["user_id"], split.test["item_id"], strict=True))
    assert not test_keys & set(
        zip(result.memories["user_id"], result.memories["item_id"], strict=True)
    )
    # user 1 loves Comedy (GENRES[1]) and the profile says so with evidence
    profile = result.profiles[1]
    assert profile.startswith("PERSONA: You are a")
    assert "Above your mean: Comedy" in profile
    likes = result.traits[1]["likes"]
    assert likes[0]["genre"] == "Comedy" and likes[0]["n"] >= 3
    text = result.memories[result.memories["user_id"] == 1]["text"].iloc[0]
    assert text.startswith("I rated Movie") and "/5" in text and "crowd" in text


def test_data_distiller_on_a_few_ml100k_users() -> None:
    ds = load_dataset("ml-100k")
    split = protocol_split(ds, n_users=200, seed=0)
    catalog = ItemCatalog.from_frames(ds.items, split.item_stats())
    users = [int(u) for u in split.user_ids[:3]]
    result = DataDistiller(user_ids=users).distill(ds, split, catalog)
    assert sorted(result.profiles) == users
    assert len(result.memories) == int(split.train["user_id"].isin(users).sum())
    assert all(len(p.split()) < 80 for p in result.profiles.values())


def test_no_test_leakage_ml100k(tmp_path) -> None:
    """Changing every test-split rating changes no profile, memory or item average."""
    ds = load_dataset("ml-100k")
    split = protocol_split(ds, n_users=200, seed=0)
    test_keys = split.test[["user_id", "item_id"]].assign(is_test=True)
    ratings = ds.ratings.merge(test_keys, on=["user_id", "item_id"], how="left")
    is_test = ratings["is_test"].fillna(False).astype(bool).to_numpy()
    assert is_test.sum() == len(split.test)
    perturbed = ratings.drop(columns="is_test")
    perturbed.loc[is_test, "rating"] = perturbed.loc[is_test, "rating"] % 5 + 1  # all change
    ds2 = RatingsDataset(ds.name, perturbed, ds.users, ds.items)
    split2 = protocol_split(ds2, n_users=200, seed=0)
    assert not split2.test["rating"].equals(split.test["rating"])  # the test data did change

    pd.testing.assert_frame_equal(split.item_stats(), split2.item_stats())
    cat1 = ItemCatalog.from_frames(ds.items, split.item_stats())
    cat2 = ItemCatalog.from_frames(ds2.items, split2.item_stats())
    pd.testing.assert_frame_equal(cat1.to_frame(), cat2.to_frame())
    a = _memories_bytes(DataDistiller().distill(ds, split, cat1), tmp_path / "a")
    b = _memories_bytes(DataDistiller().distill(ds2, split2, cat2), tmp_path / "b")
    assert a == b


def test_data_distiller_is_deterministic(tmp_path) -> None:
    ds, split, catalog = synthetic_split()
    a = _memories_bytes(DataDistiller().distill(ds, split, catalog), tmp_path / "a")
    b = _memories_bytes(DataDistiller().distill(ds, split, catalog), tmp_path / "b")
    assert a == b
    loaded = UserMemories.load(tmp_path / "a")
    assert loaded.profiles == DataDistiller().distill(ds, split, catalog).profiles


@pytest.mark.integration
def test_cli_outputs_are_byte_identical(tmp_path) -> None:
    """Same seed, same files: distill + personas twice on an ML-1M-format folder (6 users,
    150 movies; the full ML-100k catalogue costs a minute of embeddings and adds nothing)."""
    from persona_gym.cli import main
    from tests.test_cli import write_ml1m

    data = write_ml1m(tmp_path / "ml-1m")
    dirs = [tmp_path / "run1", tmp_path / "run2"]
    for out in dirs:
        assert (
            main(
                [
                    "distill",
                    "--dataset",
                    str(data),
                    "--out",
                    str(out),
                    "--n-users",
                    "4",
                    "--no-progress",
                ]
            )
            == 0
        )
        assert (
            main(["personas", "--artifacts", str(out), "--k", "0", "--k-min", "2", "--k-max", "3"])
            == 0
        )
    files = sorted(p.relative_to(dirs[0]) for p in dirs[0].rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {
        "items.parquet",
        "profiles.jsonl",
        "memories.parquet",
        "split.json",
        "distill.json",
        "embeddings/items.npy",
        "embeddings/profiles.npy",
        "personas.json",
        "personas.png",
    }
    for f in files:
        assert (dirs[0] / f).read_bytes() == (dirs[1] / f).read_bytes(), f
    split = json.loads((dirs[0] / "split.json").read_text())
    assert len(split["user_ids"]) == 4 and "ratings" not in json.dumps(split).lower().replace(
        "n_ratings", ""
    )
    items = np.load(dirs[0] / "embeddings" / "items.npy")
    assert items.shape == (150, 384)


# ------------------------------------------------------------------------------- LLM backends


def _good_reply(n: int = 10) -> str:
    lines = [f"{k}. I enjoyed the story number {k}." for k in range(1, n + 1)]
    return "\n".join(lines) + "\nPROFILE: I like clever stories and dislike gore."


class ScriptedServer:
    """A real OpenAI-style HTTP server on 127.0.0.1 replying from a script of responses."""

    def __init__(self, script: list[tuple[int, str]] | None = None) -> None:
        self.script = list(script or [])
        self.requests: list[dict] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests.append(
                    {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
                )
                if self.path != "/v1/chat/completions":
                    status, payload = 404, "not found"
                elif owner.script:
                    status, payload = owner.script.pop(0)
                else:
                    content = _good_reply()
                    status, payload = (
                        200,
                        json.dumps(
                            {"choices": [{"message": {"role": "assistant", "content": content}}]}
                        ),
                    )
                data = payload.encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _ok(content: str) -> tuple[int, str]:
    return 200, json.dumps({"choices": [{"message": {"content": content}}]})


def test_http_backend_retries_a_malformed_response(monkeypatch) -> None:
    monkeypatch.setenv("TEST_KEY", "sk-test")
    with ScriptedServer(
        [(200, "this is not json"), (200, json.dumps({"choices": []})), _ok("hello")]
    ) as server:
        backend = OpenAIChatBackend(
            server.base_url, "m", api_key_env="TEST_KEY", max_retries=3, backoff_s=0.01
        )
        assert backend.complete([{"role": "user", "content": "hi"}]) == "hello"
    assert len(server.requests) == 3
    assert server.requests[0]["auth"] == "Bearer sk-test"
    assert server.requests[0]["body"]["model"] == "m"
    assert server.requests[0]["body"]["messages"] == [{"role": "user", "content": "hi"}]


def test_http_backend_gives_up_with_a_clear_error() -> None:
    with ScriptedServer([(200, "garbage")] * 3 + [(503, "overloaded")]) as server:
        backend = OpenAIChatBackend(server.base_url, "m", max_retries=2, backoff_s=0.01)
        with pytest.raises(ChatBackendError) as err:
            backend.complete([{"role": "user", "content": "hi"}])
        assert server.base_url + "/chat/completions" in str(err.value)
        assert "garbage" in str(err.value) and "3 attempts" in str(err.value)
        assert len(server.requests) == 3
    with ScriptedServer([(400, "bad model name")]) as server:  # client errors are not retried
        backend = OpenAIChatBackend(server.base_url, "m", max_retries=2, backoff_s=0.01)
        with pytest.raises(ChatBackendError, match="bad model name"):
            backend.complete([{"role": "user", "content": "hi"}])
        assert len(server.requests) == 1
        with pytest.raises(ChatBackendError, match="Connection|refused|URLError"):
            OpenAIChatBackend("http://127.0.0.1:9/v1", "m", max_retries=0, timeout_s=2).complete(
                [{"role": "user", "content": "hi"}]
            )


def test_llm_distiller_end_to_end_over_http(tmp_path) -> None:
    ds, split, catalog = synthetic_split()
    # one reply loses its reason lines and profile: those fall back to templates
    script = [_ok(_good_reply()), _ok("I cannot help with that.")]
    with ScriptedServer(script) as server:
        backend = OpenAIChatBackend(server.base_url, "gpt-test", backoff_s=0.01)
        config = LLMDistillerConfig(cache_dir=str(tmp_path / "cache"), progress=False)
        result = LLMDistiller(backend, config).distill(ds, split, catalog)
    n_train = split.train.groupby("user_id").size()
    assert len(server.requests) == sum(-(-int(n) // 10) for n in n_train)  # ceil(n/10) each
    assert len(result.memories) == len(split.train)
    first_user = int(split.user_ids[0])
    assert result.traits[first_user]["llm"]["reason_fallbacks"] == min(
        10, int(n_train.iloc[0]) - 10
    )
    assert result.profiles[first_user] == "PERSONA: I like clever stories and dislike gore."
    texts = result.memories[result.memories["user_id"] == first_user]["text"].tolist()
    assert texts[0].endswith("/5: I enjoyed the story number 1.")
    assert "crowd" in texts[10]  # template fallback for the unparsable batch
    # the prompt holds the batch, oldest first, and the profile so far
    second = server.requests[1]["body"]["messages"][1]["content"]
    assert "I like clever stories" in second and "\n1. Movie" in second


class _Flaky:
    """Wraps a backend; raises after `fail_after` calls (a simulated kill) and counts calls."""

    def __init__(self, inner, fail_after: int | None = None) -> None:
        self.inner, self.fail_after, self.calls = inner, fail_after, 0

    @property
    def identity(self) -> str:
        return self.inner.identity

    def complete(self, messages):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        return self.inner.complete(messages)


class _Canned:
    identity = "canned:v1"

    def complete(self, messages):
        return _good_reply()


def test_llm_distiller_resumes_after_a_kill(tmp_path) -> None:
    ds, split, catalog = synthetic_split(n_users=4)
    config = LLMDistillerConfig(cache_dir=str(tmp_path), progress=False)
    batches = split.train.groupby("user_id").size().map(lambda n: -(-n // 10))
    done_users = 2
    kill_at = int(batches.iloc[:done_users].sum()) + 1  # dies inside the third user
    with pytest.raises(KeyboardInterrupt):
        LLMDistiller(_Flaky(_Canned(), fail_after=kill_at), config).distill(ds, split, catalog)
    assert len(list(tmp_path.glob("user-*.json"))) == done_users
    rerun = _Flaky(_Canned())
    result = LLMDistiller(rerun, config).distill(ds, split, catalog)
    assert rerun.calls == int(batches.iloc[done_users:].sum())  # finished users not recomputed
    third = _Flaky(_Canned())
    again = LLMDistiller(third, config).distill(ds, split, catalog)
    assert third.calls == 0 and again.profiles == result.profiles
    # a different backend identity is a different cache entry
    other = _Flaky(_Canned())
    other.inner.identity = "canned:v2"
    LLMDistiller(other, config).distill(ds, split, catalog)
    assert other.calls == int(batches.sum())


def test_parse_reply_is_robust() -> None:
    reply = (
        "Sure!\n**1.** Great cast.\n2) Too slow\n2. duplicate\n7. out of range\nProfile: I like it."
    )
    reasons, profile = parse_reply(reply, 3)
    assert reasons == ["Great cast.", "Too slow", None]
    assert profile == "I like it."
    assert parse_reply("", 2) == ([None, None], None)


def test_llm_distiller_with_a_tiny_hf_model(tmp_path, tokenizer) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=4096,
        )
    ).eval()
    backend = HFChatBackend(model="tiny-random-llama", max_new_tokens=6, loaded=(model, tokenizer))
    reply = backend.complete([{"role": "user", "content": "hi"}])
    assert isinstance(reply, str)
    assert reply == backend.complete([{"role": "user", "content": "hi"}])  # greedy: repeatable
    ds, split, catalog = synthetic_split(n_users=2)
    config = LLMDistillerConfig(cache_dir=str(tmp_path), progress=False)
    result = LLMDistiller(backend, config).distill(ds, split, catalog)
    assert len(result.memories) == len(split.train)
    assert sorted(result.profiles) == [int(u) for u in split.user_ids]
    for traits in result.traits.values():
        assert traits["llm"]["backend"].startswith("hf:tiny-random-llama")
        # random weights write no parsable reasons: every one fell back, and was counted
        assert traits["llm"]["reason_fallbacks"] == traits["n_ratings"]


def test_profile_grammar_for_ages_and_age_bins() -> None:
    from persona_gym.distill.templates import profile_text

    traits = {
        "gender": "M",
        "occupation": "lawyer",
        "tendency": "generous",
        "mean": 4.2,
        "reference_mean": 3.6,
        "spread": "narrow",
        "likes": [],
        "dislikes": [],
        "top_genres": ["Drama"],
        "main_decade": 1990,
        "best_decade": 1990,
        "best_decade_mean": 4.0,
        "conformity": "balanced",
        "activity": "heavy",
        "n_ratings": 110,
        "diversity": "broad",
    }
    assert profile_text({**traits, "age": "53"}).startswith(
        "PERSONA: You are a 53-year-old male (lawyer)."
    )
    assert profile_text({**traits, "age": "25-34"}).startswith(
        "PERSONA: You are a male aged 25-34 (lawyer)."
    )
    assert profile_text({**traits, "age": None, "gender": None}).startswith(
        "PERSONA: You are a viewer (lawyer)."
    )
