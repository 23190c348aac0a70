"""The OpenAI-compatible chat backend (:class:`training.chat.OpenAIChatBackend`) against a real
HTTP server on 127.0.0.1 (port 0; no mock of the fault): a timeout that is not a positive
number is refused when the backend is built, one line naming the field, and a reply over
``MAX_REPLY_BYTES`` (announced or not) is one error line at once, never read into memory or
retried."""

from __future__ import annotations

import json

import pytest

from persona_gym.simulator.served import MAX_REPLY_BYTES
from tests.test_reliability_served import LoopbackServer
from training.chat import ChatBackendError, OpenAIChatBackend

MESSAGES = [{"role": "user", "content": "hi"}]


def chat_reply(content: str) -> bytes:
    return json.dumps(
        {"choices": [{"message": {"role": "assistant", "content": content}}]}
    ).encode()


@pytest.mark.parametrize("timeout", [-1, 0, -0.5, float("nan"), float("inf"), "5", True, None])
def test_a_timeout_that_is_not_positive_is_one_line_naming_the_field(timeout):
    with pytest.raises(ValueError) as err:
        OpenAIChatBackend("http://127.0.0.1:9/v1", "m", timeout_s=timeout)
    assert str(err.value) == f"timeout_s must be a positive number of seconds, got {timeout!r}"


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "no-length"])
def test_a_5_mb_reply_is_one_error_line_without_retries(announced):
    body = chat_reply("x" * (5 << 20))
    extra = {} if announced else {"no-length": "1"}

    def handler(method, path, _body, _headers):
        return (200, body, dict(extra)) if method == "POST" else None

    with LoopbackServer(handler) as server:
        backend = OpenAIChatBackend(server.url, "m", max_retries=2, backoff_s=0, timeout_s=10)
        with pytest.raises(ChatBackendError) as err:
            backend.complete(MESSAGES)
    message = str(err.value)
    assert "\n" not in message, message
    assert message.startswith(f"{server.url}/chat/completions answered more than ")
    assert f"{MAX_REPLY_BYTES} bytes" in message and len(message) < 300
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert len(server.requests) == 1  # refused at once, not retried


def test_a_reply_within_the_limit_is_read():
    def handler(method, path, _body, _headers):
        return (200, chat_reply("fine"), {"no-length": "1"}) if method == "POST" else None

    with LoopbackServer(handler) as server:
        assert OpenAIChatBackend(server.url, "m", timeout_s=10).complete(MESSAGES) == "fine"
