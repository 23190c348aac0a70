"""Adversarial tests of the served rating backend (``backend="vllm-server"``) against real HTTP
servers on 127.0.0.1 (no mock of the fault): a server that answers NaN, infinite or string
log-probabilities, the wrong number of choices or a 5 MB reply; one that holds the request
past the configured timeout; one that echoes the credentials of its URL. Each is one clear
error line, within the timeout, and no credential is quoted anywhere (exception text and its
chain, log records, warnings, reprs)."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import warnings
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import gymnasium as gym
import pytest

import persona_gym  # noqa: F401  (registers the ids)
from persona_gym.envs import EnvConfig, clear_simulator_cache
from persona_gym.errors import ConfigError
from persona_gym.simulator.served import ServedError, VLLMServerClient, VLLMSettings

ENV_ID = "PersonaML100K-v0"
IDS = [33, 34, 35, 36, 37]
MODELS = ("tiny-base", "persona-0", "persona-1", "single-max")
KEY = "SECRETqueryKEY0123456789"
USER, PASSWORD = "alice", "hunter2PASSWORDxyz"
SECRETS = (KEY, PASSWORD, base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())

# (status, body bytes or None for no reply, extra headers) from (method, path, body, headers)
Reply = tuple[int, bytes, dict[str, str]]
Handler = Callable[[str, str, Any, dict[str, str]], Reply]


def models_reply() -> Reply:
    data = [{"id": m, "parent": None if i == 0 else MODELS[0]} for i, m in enumerate(MODELS)]
    return 200, json.dumps({"data": data}).encode(), {}


def completions_reply(body: dict, value: Callable[[int, int], Any], n: int | None = None) -> Reply:
    """A vLLM-shaped completions answer whose rating log-probabilities are ``value(prompt,
    rating)``, serialised as a buggy server would (``NaN``/``-Infinity`` literals)."""
    prompts = body["prompt"]
    choices = [
        {
            "index": i,
            "logprobs": {
                "top_logprobs": [
                    {f"token_id:{t}": value(i, r) for r, t in enumerate(body["logprob_token_ids"])}
                ]
            },
        }
        for i in range(len(prompts) if n is None else n)
    ]
    return 200, json.dumps({"choices": choices}).encode(), {}


def good(i: int, r: int) -> float:
    return -1.0 - r - 0.1 * i


class LoopbackServer:
    """A real HTTP server on 127.0.0.1 (port 0) whose every answer comes from ``handler``;
    ``GET /models`` answers the model list unless the handler answers it. It records each
    request (method, path with query, headers, arrival time); ``hold`` makes it hold every
    request until the test ends (a server that never answers)."""

    def __init__(self, handler: Handler | None = None, hold: bool = False):
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        owner = self

        class Handle(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                headers = dict(self.headers.items())
                owner.requests.append(
                    {
                        "method": method,
                        "path": self.path,
                        "headers": headers,
                        "at": time.monotonic(),
                    }
                )
                if hold:
                    owner.release.wait(60)
                    return
                reply = handler(method, self.path, body, headers) if handler else None
                if reply is None:
                    reply = models_reply()
                status, data, extra = reply
                self.send_response(status, extra.pop("reason", None))
                self.send_header("Content-Type", "application/json")
                if extra.pop("no-length", None) is None:
                    self.send_header("Content-Length", str(len(data)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                self._serve("GET")

            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                self._serve("POST")

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handle)
        self.httpd.daemon_threads = True
        self.httpd.handle_error = lambda *args: None  # type: ignore[method-assign]  # a client that hung up
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def secret_url(self) -> str:
        """The server's URL with credentials: userinfo and an ``api_key`` query value."""
        port = self.httpd.server_address[1]
        return f"http://{USER}:{PASSWORD}@127.0.0.1:{port}/v1?api_key={KEY}"

    def __enter__(self) -> LoopbackServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def on_completions(reply: Callable[[dict], Reply]) -> Handler:
    def handler(method: str, path: str, body: Any, headers: dict[str, str]) -> Reply | None:  # type: ignore[return]
        if method == "POST" and "/completions" in path:
            return reply(body)
        return None

    return handler  # type: ignore[return-value]


def client(url: str, **settings: Any) -> VLLMServerClient:
    values = {"url": url, "max_retries": 0, "timeout_s": 5.0, **settings}
    return VLLMServerClient(VLLMSettings(**values), ["persona-0"], IDS)


def texts(err: BaseException) -> list[str]:
    """The text of an exception and of every exception in its chain."""
    out = []
    seen: BaseException | None = err
    while seen is not None:
        out += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return out


# -- every reply is checked --------------------------------------------------------------------
BAD_REPLIES = {
    "nan": (
        lambda b: completions_reply(b, lambda i, r: float("nan") if r == 2 else good(i, r)),
        r"log-probability of rating token 35 is nan, expected a finite number",
    ),
    "-inf": (
        lambda b: completions_reply(b, lambda i, r: float("-inf") if r == 4 else good(i, r)),
        r"log-probability of rating token 37 is -inf, expected a finite number",
    ),
    "string": (
        lambda b: completions_reply(b, lambda i, r: str(good(i, r))),
        r"log-probability of rating token 33 is '-1\.0', expected a finite number",
    ),
    "null": (
        lambda b: completions_reply(b, lambda i, r: None),
        r"log-probability of rating token 33 is None, expected a finite number",
    ),
    "fewer choices": (
        lambda b: completions_reply(b, good, n=1),
        r"answered 1 choices with indices \[0\] for 2 prompts; expected one choice per prompt, "
        r"indices 0\.\.1",
    ),
    "missing rating token": (
        lambda b: (
            200,
            json.dumps(
                {
                    "choices": [
                        {"index": i, "logprobs": {"top_logprobs": [{"token_id:33": -1.0}]}}
                        for i in range(2)
                    ]
                }
            ).encode(),
            {},
        ),
        r"answer 0 has no log-probability for rating token id\(s\) \[34, 35, 36, 37\]",
    ),
    "no logprobs": (
        lambda b: (200, json.dumps({"choices": [{"index": 0}, {"index": 1}]}).encode(), {}),
        r"answered choice 0 without logprobs\.top_logprobs\[0\]",
    ),
    "not json": (
        lambda b: (200, b"<html>upstream error</html>", {}),
        r"answered what is not JSON \(JSONDecodeError at position 0\)",
    ),
    "5 MB reply": (
        lambda b: (200, b'{"choices": "' + b"x" * (5 << 20) + b'"}', {}),
        r"answered 5242\d{3} bytes, more than VLLMSettings\.max_reply_bytes=4194304",
    ),
    "5 MB reply without a length": (
        lambda b: (200, b'{"choices": "' + b"x" * (5 << 20) + b'"}', {"no-length": "1"}),
        r"answered more than VLLMSettings\.max_reply_bytes=4194304 bytes",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_REPLIES))
def test_a_bad_reply_is_one_error_line_naming_the_field(case):
    reply, message = BAD_REPLIES[case]
    with LoopbackServer(on_completions(reply)) as server:
        served = client(server.url)
        start = time.monotonic()
        with pytest.raises(ServedError, match=message) as err:
            served.logprobs([[1, 2], [3]], ["persona-0", "persona-0"])
        assert time.monotonic() - start < 5.0
    text = str(err.value)
    assert "\n" not in text and len(text) < 600
    assert text.startswith(f"{server.url}/completions")


def test_a_good_reply_passes_and_the_path_is_joined_before_the_query():
    with LoopbackServer(on_completions(lambda b: completions_reply(b, good))) as server:
        out = client(server.url + "?api_key=" + KEY).logprobs([[1], [2]], ["persona-0"] * 2)
    assert out.shape == (2, 5) and float(out[1, 0]) == pytest.approx(-1.1)
    assert [r["path"] for r in server.requests] == [
        f"/v1/models?api_key={KEY}",
        f"/v1/completions?api_key={KEY}",
    ]


# -- a server that holds the request ----------------------------------------------------------
def test_a_server_that_holds_the_request_fails_within_the_timeout(caplog):
    with LoopbackServer(hold=True) as server:
        settings = VLLMSettings(url=server.url, timeout_s=1.0, max_retries=2, backoff_s=0.1)
        start = time.monotonic()
        with pytest.raises(ServedError) as err:
            VLLMServerClient(settings, ["persona-0"], IDS)
        took = time.monotonic() - start
    assert took < 1.0 + 1.0, f"took {took:.1f} s for timeout_s=1"
    assert "failed after 1 attempt(s) within timeout_s=1 s; last error: TimeoutError" in str(
        err.value
    )
    assert "server_timeout_s" in str(err.value) and "\n" not in str(err.value)


def test_gym_make_on_a_holding_server_fails_within_env_config_timeout(served_kwargs):
    """The issue's case: ``gym.make`` on a server that never answers waited 600 s x 3; with
    ``EnvConfig.server_timeout_s`` it fails that long after the first request arrives."""
    with LoopbackServer(hold=True) as server:
        with pytest.raises(ServedError, match="within timeout_s=1 s") as err:
            gym.make(ENV_ID, **served_kwargs, server_url=server.url, server_timeout_s=1.0)
        failed = time.monotonic()
    assert server.requests and failed - server.requests[0]["at"] < 1.0 + 1.0
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("value", [-1, 0, float("nan"), float("inf")])
def test_the_timeout_must_be_positive(value):
    with pytest.raises(ConfigError, match="EnvConfig.server_timeout_s must be"):
        EnvConfig(server_timeout_s=value)
    with pytest.raises(ConfigError, match="VLLMSettings.timeout_s must be a positive number"):
        VLLMSettings(timeout_s=value)
    with pytest.raises(ConfigError, match="EnvConfig.server_timeout_s must be"):
        gym.make(ENV_ID, server_timeout_s=value)


def test_bad_reply_limits_are_refused():
    with pytest.raises(ConfigError, match="VLLMSettings.max_reply_bytes must be >= 1, got 0"):
        VLLMSettings(max_reply_bytes=0)
    with pytest.raises(ConfigError, match="VLLMSettings.backoff_s must be a number >= 0"):
        VLLMSettings(backoff_s=-1)


# -- credentials are sent, never quoted --------------------------------------------------------
def echo_everything(status: int) -> Handler:
    """A server that quotes back the request's path (query included) and headers (the basic
    credentials decoded), in the body and in the status line's reason phrase."""

    def handler(method: str, path: str, body: Any, headers: dict[str, str]) -> Reply:
        auth = headers.get("Authorization", "")
        decoded = base64.b64decode(auth.split()[-1]).decode() if auth else ""
        echo = {"path": path, "headers": headers, "credentials": decoded, "api_key": KEY}
        return status, json.dumps(echo).encode(), {"reason": f"echo {path} {decoded}"}

    return handler


def assert_no_secret(*texts_: str) -> None:
    for text in texts_:
        for secret in SECRETS:
            assert secret not in text, f"{secret!r} quoted in {text[:300]!r}"


@pytest.mark.parametrize("status", [200, 400, 503])
def test_a_server_echoing_credentials_gets_none_quoted(status, caplog):
    """200: a reply that is no model list (quoted in the error); 400: refused; 503: retried
    (each attempt logged). The credentials were sent (basic auth, the query string)."""
    with LoopbackServer(echo_everything(status)) as server:
        settings = VLLMSettings(url=server.secret_url(), max_retries=1, backoff_s=0.01)
        with (
            caplog.at_level(logging.DEBUG),
            warnings.catch_warnings(record=True) as caught,
            pytest.raises(ServedError) as err,
        ):
            warnings.simplefilter("always")
            VLLMServerClient(settings, ["persona-0"], IDS)
    request = server.requests[0]
    assert request["path"] == f"/v1/models?api_key={KEY}"  # joined to the path, query kept
    assert request["headers"]["Authorization"] == "Basic " + SECRETS[2]
    message = str(err.value)
    assert "\n" not in message and "127.0.0.1" in message and "api_key=***" in message
    assert_no_secret(
        *texts(err.value),
        caplog.text,
        *(r.getMessage() for r in caplog.records),
        *(str(w.message) for w in caught),
        repr(settings),
    )


def test_reprs_and_config_errors_never_quote_credentials(served_kwargs):
    with LoopbackServer(on_completions(lambda b: completions_reply(b, good))) as server:
        url = server.secret_url()
        served = VLLMServerClient(VLLMSettings(url=url), ["persona-0"], IDS)
        config = EnvConfig(backend="vllm-server", server_url=url)
        assert "api_key=***" in repr(config) and "***@127.0.0.1" in repr(served.settings)
        assert_no_secret(repr(config), repr(served), repr(served.settings), str(config))
        errors = []
        for kwargs in (
            {"server_url": url},  # backend local: server_url is refused, quoted
            {"backend": "vllm-server", "server_url": url.replace("http://", "htp://")},
            {"backend": "vllm-server", "server_url": url, "render_mode": "human"},
            {"backend": "vllm-server", "server_url": url, "obs_window": "3"},
        ):
            with pytest.raises((ConfigError, TypeError)) as err:
                gym.make(ENV_ID, **{**served_kwargs, "backend": "local", **kwargs})
            errors += texts(err.value)
        assert_no_secret(*errors)
        assert any("127.0.0.1" in e for e in errors)


# -- through the env: a NaN server never reaches the agent ------------------------------------
@pytest.fixture
def served_kwargs(trained_tiny_artifacts):
    """``gym.make`` kwargs of the tiny trained artifacts on the served backend (its tokenizer and
    adapters, scored by whatever server the test starts)."""
    yield {
        "artifacts": str(trained_tiny_artifacts),
        "dataset": "synthetic",
        "mask_rated": False,
        "leave_rule": "threshold",
        "leave_prob": 0.0,
        "obs_window": 3,
        "backend": "vllm-server",
    }
    clear_simulator_cache()


def test_nan_logprobs_from_the_server_never_become_rewards(served_kwargs):
    nan = on_completions(lambda b: completions_reply(b, lambda i, r: float("nan")))
    with LoopbackServer(nan) as server:
        env = gym.make(ENV_ID, **served_kwargs, server_url=server.url, server_timeout_s=5.0)
        env.reset(seed=0)
        with pytest.raises(ServedError, match="is nan, expected a finite number") as err:
            env.step(0)
    assert "\n" not in str(err.value)
    assert env.unwrapped.state.steps == 0  # the failed step changed nothing
