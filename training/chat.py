"""Chat-completion backends for the LLM distiller.

A backend turns a list of chat messages (``{"role": ..., "content": ...}``) into the reply
text. Two implementations:

* :class:`HFChatBackend`: a local Hugging Face causal LM (default SmolLM2-135M-Instruct)
  through ``generate``, greedy or seeded sampling;
* :class:`OpenAIChatBackend`: any OpenAI-compatible ``/chat/completions`` endpoint (OpenAI,
  vLLM, Ollama), over ``urllib`` with timeouts and bounded retries.

Each backend has an ``identity`` string: everything that changes its output, used in cache keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Protocol

from persona_gym.assets import DEFAULT_SLM
from persona_gym.errors import PersonaGymError

log = logging.getLogger(__name__)

__all__ = ["ChatBackend", "ChatBackendError", "HFChatBackend", "OpenAIChatBackend", "redact"]

Message = dict[str, str]
QUOTE_CHARS = 200  # how much of a server's reply an error or log line quotes
_SECRETS = re.compile(
    r"(?i)(\bbearer\s+|\bbasic\s+|\b(?:authorization|proxy-authorization|x-api-key|api[-_]?key|"
    r"access[-_]?token|auth[-_]?token|token|secret|password)[\"']?\s*[:=]\s*[\"']?(?:bearer\s+|basic\s+)?)"
    r"[^\s\"',;&}]+"
)
_KEY_LIKE = re.compile(r"\b(?:sk|pk|rk|hf|ghp|gho|xox[abp])[-_][A-Za-z0-9_\-]{8,}")


class ChatBackendError(PersonaGymError, RuntimeError):
    """A chat backend failed for good (after its retries); the message names the endpoint."""


def redact(text: str, secrets: tuple[str, ...] = (), limit: int = QUOTE_CHARS) -> str:
    """``text`` safe to quote in an error or a log: the given secret values, bearer/basic
    credentials, ``key: value`` pairs of auth headers and API-key fields, and strings shaped like
    API keys (``sk-...``) become ``[REDACTED]``; cut to ``limit`` characters."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[REDACTED]")
    text = _SECRETS.sub(lambda m: m.group(1) + "[REDACTED]", text)
    text = _KEY_LIKE.sub("[REDACTED]", text)
    return text if len(text) <= limit else text[:limit] + "…"


class ChatBackend(Protocol):
    """Completes chat messages. ``identity`` names everything that changes the output."""

    @property
    def identity(self) -> str: ...

    def complete(self, messages: list[Message]) -> str: ...


@dataclass
class HFChatBackend:
    """Local generation with a Hugging Face causal LM that has a chat template.

    The model loads on the first call. With ``temperature == 0`` decoding is greedy; otherwise
    it samples with a generator seeded from ``seed`` and the prompt, so each reply is
    reproducible whatever order the prompts come in.
    """

    model: str = DEFAULT_SLM  # alias, local folder or hub id (persona_gym.assets.resolve_model)
    max_new_tokens: int = 256  # reply length cap, in tokens
    temperature: float = 0.0  # 0: greedy
    seed: int = 0  # sampling seed (unused when greedy)
    repetition_penalty: float = 1.1  # small models loop without it
    device: str = "cpu"
    # an already loaded (model, tokenizer) pair, e.g. a tiny test model; ``model`` then only names it
    loaded: tuple[Any, Any] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    @property
    def identity(self) -> str:
        source = ""
        if self.loaded is None:
            from persona_gym.assets import model_source, resolve_model

            source = str(model_source(resolve_model(self.model)).get("sha256") or "")
        return (
            f"hf:{self.model}:{source}:max_new_tokens={self.max_new_tokens}:"
            f"temperature={self.temperature}:seed={self.seed}:"
            f"repetition_penalty={self.repetition_penalty}"
        )

    def _model(self) -> tuple[Any, Any]:
        if self.loaded is None:
            from persona_gym.assets import load_causal_lm

            log.info("loading %s for distillation", self.model)
            self.loaded = load_causal_lm(self.model, device=self.device)
        return self.loaded

    def complete(self, messages: list[Message]) -> str:
        import torch

        model, tokenizer = self._model()
        inputs = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        ).to(model.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "pad_token_id": tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
        }
        if self.temperature > 0:
            digest = hashlib.sha256(json.dumps(messages).encode()).digest()
            torch.manual_seed(self.seed + int.from_bytes(digest[:4], "little"))
            kwargs.update(do_sample=True, temperature=self.temperature)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        with torch.inference_mode():
            out = model.generate(**inputs, **kwargs)
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


@dataclass
class OpenAIChatBackend:
    """An OpenAI-compatible chat endpoint: POST ``{base_url}/chat/completions``.

    Transient failures (connection errors, timeouts, HTTP 429/5xx, a reply that is not the
    OpenAI JSON shape) are retried ``max_retries`` times with exponential backoff; other HTTP
    errors, and a reply over :data:`~persona_gym.simulator.served.MAX_REPLY_BYTES`, fail at
    once. The final error names the URL and quotes the start of the bad response with
    credentials removed (:func:`redact`).
    """

    base_url: str  # e.g. "https://api.openai.com/v1" or "http://localhost:8000/v1"
    model: str  # model name the endpoint serves, e.g. "gpt-4o"
    api_key_env: str = "OPENAI_API_KEY"  # env var holding the key; unset: no auth header
    temperature: float = 0.0
    max_tokens: int = 512  # reply length cap
    timeout_s: float = 300.0  # per request (slow local servers need minutes)
    max_retries: int = 3  # extra attempts after the first
    backoff_s: float = 1.0  # first wait; doubles each retry

    def __post_init__(self) -> None:
        timeout = self.timeout_s
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not (math.isfinite(timeout) and timeout > 0)
        ):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout!r}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {self.base_url!r}")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    @property
    def identity(self) -> str:
        return (
            f"openai:{self.base_url.rstrip('/')}:{self.model}:temperature={self.temperature}:"
            f"max_tokens={self.max_tokens}"
        )

    def complete(self, messages: list[Message]) -> str:
        from persona_gym.simulator.served import MAX_REPLY_BYTES, ReplyTooLargeError, read_reply

        body = json.dumps(
            {
                "model": self.model,
                "messages": messages,
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
        ).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        secrets = (key,) if key else ()
        last = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            deadline = time.monotonic() + self.timeout_s
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    raw = read_reply(response, MAX_REPLY_BYTES, deadline, self.timeout_s).decode(
                        "utf-8", errors="replace"
                    )
            except ReplyTooLargeError:
                raise ChatBackendError(
                    f"{redact(self.url)} answered more than {MAX_REPLY_BYTES} bytes; a chat reply "
                    f"of max_tokens={self.max_tokens} is small: check the server (--base-url)"
                ) from None
            except urllib.error.HTTPError as err:
                detail = redact(err.read().decode("utf-8", errors="replace"), secrets)
                last = f"HTTP {err.code}: {detail}"
                if err.code != 429 and err.code < 500:
                    raise ChatBackendError(
                        f"{redact(self.url)} refused the request: {last}"
                    ) from err
                log.warning("%s: %s (attempt %d)", redact(self.url), last, attempt + 1)
                continue
            except (urllib.error.URLError, TimeoutError, OSError) as err:
                last = redact(f"{type(err).__name__}: {err}", secrets)
                log.warning("%s: %s (attempt %d)", redact(self.url), last, attempt + 1)
                continue
            content = _content_of(raw)
            if content is not None:
                return content
            last = f"malformed response: {redact(raw, secrets)!r}"
            log.warning("%s: %s (attempt %d)", redact(self.url), last, attempt + 1)
        raise ChatBackendError(
            f"{redact(self.url)} failed after {self.max_retries + 1} attempts; last error: {last}; "
            "check that the server runs and serves the model (--base-url, --model)"
        )


def _content_of(raw: str) -> str | None:
    """``choices[0].message.content`` of an OpenAI chat response, or None if not that shape."""
    try:
        content = json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None
