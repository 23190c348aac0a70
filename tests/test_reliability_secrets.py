"""Adversarial tests of the chat backend's errors and logs: a server that echoes credentials
never gets them quoted back, and quotes stay short. A real HTTP server on 127.0.0.1."""

from __future__ import annotations

import json
import logging

import pytest

from tests.distill.test_distill import ScriptedServer
from training.chat import ChatBackendError, OpenAIChatBackend

KEY = "sk-proj-SECRET0123456789abcdefXYZ"
QUOTE_LIMIT = 200  # training.chat.QUOTE_CHARS: how much of a reply an error quotes
MESSAGES = [{"role": "user", "content": "hi"}]


def echo(status: int, fmt: str) -> tuple[int, str]:
    return status, fmt.replace("KEY", KEY)


ECHOES = {
    "json header": '{"error": {"message": "bad", "headers": {"Authorization": "Bearer KEY"}}}',
    "raw header": "Unauthorized.\nAuthorization: Bearer KEY\nHost: x",
    "api key field": '{"api_key": "KEY", "detail": "invalid"}',
    "bare key": "invalid key KEY for model m",
    "x-api-key": "x-api-key: KEY",
    "long": "y" * 5000 + " Bearer KEY",
}


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("TEST_SECRET_KEY", KEY)
    monkeypatch.setattr("training.chat.time.sleep", lambda s: None)


@pytest.mark.parametrize("status", [400, 503])
@pytest.mark.parametrize("case", sorted(ECHOES))
def test_http_errors_never_quote_the_key(key_env, caplog, status, case):
    script = [echo(status, ECHOES[case])] * 3
    with ScriptedServer(script) as server, caplog.at_level(logging.WARNING, logger="training.chat"):
        backend = OpenAIChatBackend(
            server.base_url, "m", api_key_env="TEST_SECRET_KEY", max_retries=2, backoff_s=0
        )
        with pytest.raises(ChatBackendError) as err:
            backend.complete(MESSAGES)
    assert server.requests[0]["auth"] == f"Bearer {KEY}"  # the key was sent ...
    message = str(err.value)
    for text in (message, caplog.text):  # ... and is quoted nowhere
        assert KEY not in text and "SECRET0123456789" not in text
    assert f"HTTP {status}" in message and len(message) < QUOTE_LIMIT + 300


def test_malformed_replies_never_quote_the_key(key_env):
    body = json.dumps({"not_choices": [], "echo": {"Authorization": f"Bearer {KEY}"}})
    with ScriptedServer([(200, body)] * 2) as server:
        backend = OpenAIChatBackend(
            server.base_url, "m", api_key_env="TEST_SECRET_KEY", max_retries=1, backoff_s=0
        )
        with pytest.raises(ChatBackendError, match="malformed response") as err:
            backend.complete(MESSAGES)
    assert KEY not in str(err.value)


def test_a_key_in_the_url_is_not_quoted(key_env):
    backend = OpenAIChatBackend(
        "http://127.0.0.1:9/v1?api_key=" + KEY, "m", max_retries=0, timeout_s=2
    )
    with pytest.raises(ChatBackendError) as err:
        backend.complete(MESSAGES)
    assert KEY not in str(err.value) and "127.0.0.1:9" in str(err.value)


def test_redact_keeps_ordinary_text():
    from training.chat import QUOTE_CHARS, redact

    assert QUOTE_CHARS == QUOTE_LIMIT
    text = "model m is overloaded, retry in 3 s (max_tokens: 512)"
    assert redact(text) == text
    assert redact("z" * 1000).endswith("…") and len(redact("z" * 1000)) == QUOTE_CHARS + 1
