"""Typed, validated configuration of the recommendation environments.

:class:`EnvConfig` holds every setting; the registered ids read theirs from
``envs_config/<name>.yaml`` (:func:`load_env_config`) and ``gym.make`` kwargs override single
fields (``gym.make("PersonaML100K-v0", artifacts="/path", device="cuda")``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from persona_gym.errors import ConfigError, ConfigTypeError
from persona_gym.registry import MAX_EPISODE_STEPS
from persona_gym.simulator.rater import redact_url

REWARDS = ("expected", "sampled")
REPEAT_RULES = ("penalty", "terminate")
LEAVE_RULES = ("threshold", "model")
DTYPES = ("auto", "float32", "float16", "bfloat16")
BACKENDS = ("local", "vllm", "vllm-server")
USERS = ("all", "training")
RATERS = ("slm", "prior")

__all__ = [
    "BACKENDS",
    "EnvConfig",
    "add_env_kwargs_argument",
    "check_device",
    "load_env_config",
    "parse_env_kwargs",
]

_DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(?::(\d+))?")


@dataclass(frozen=True)
class EnvConfig:
    """Settings of :class:`~persona_gym.envs.PersonaRecEnv` and its vector form.

    Attributes:
        dataset: the dataset the artifacts come from (``"ml-100k"``, ``"ml-1m"`` or a
            MovieLens folder); only used to name the commands in error messages.
        artifacts: ``"ml-100k"`` / ``"ml-1m"`` (the artifacts shipped in
            ``persona_gym/default_artifacts/``) or the path of an artifacts directory written by
            ``persona-gym distill``, ``personas`` and ``train``.
        rater: what rates the items: ``"slm"`` (the simulated users of the artifacts: the
            SLM with its persona adapters, the default) or ``"prior"`` (their collaborative
            prior alone, no language model: :class:`~persona_gym.simulator.prior_rater.PriorRater`,
            thousands of steps per second for prototyping; same users, windows and interface).
        variant: which adapter rates a user: ``"persona"`` (their persona's), ``"base"``, or
            the name of one adapter for everyone (``"single-max"``).
        users: whom episodes are drawn from: ``"all"`` (every simulated user of the artifacts;
            for artifacts built with ``persona-gym build DATASET --all-users``, every user with
            at least 20 ratings, most of whom the adapters never saw) or ``"training"`` (only
            the users the adapters were trained on).
        base_model: base SLM (alias, folder or hub id); ``None`` = the manifest's.
        device: torch device of the rating model (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``,
            ``"xpu"``); checked when the config is made (:func:`check_device`), so an unusable
            device fails at ``gym.make``.
        dtype: torch dtype of the rating model: ``auto`` (bfloat16 on CUDA and on CPUs with AMX
            or AVX512-BF16, float32 elsewhere: ``persona_gym.assets.resolve_dtype``),
            ``float32``, ``float16`` or ``bfloat16``.
        compile: run the rating model's decoder layers through ``torch.compile`` (same ratings;
            faster once compiled, after a warm-up on the first step: benchmarks/README.md).
        backend: where the rating model runs: ``"local"`` (this process, the default),
            ``"vllm"`` (vLLM's offline engine in this process, with ``dtype``) or
            ``"vllm-server"`` (a running OpenAI-compatible ``vllm serve`` at ``server_url``).
            The served backends take text-prompt artifacts only (not ``item_tokens``, as the
            shipped ``ml-100k`` simulator has) and need vLLM's environment (``make vllm-env``);
            see :mod:`persona_gym.simulator.served`. ``device`` and ``compile`` are the local
            engine's.
        server_url: base URL of the server for ``backend="vllm-server"``
            (``"http://127.0.0.1:8000/v1"``); must be ``None`` for the other backends. It may
            carry credentials (``http://user:pass@host/v1``, ``?api_key=...``): messages, logs
            and this config's ``repr`` show it redacted (``persona_gym.simulator.rater.redact_url``).
        server_timeout_s: ``backend="vllm-server"``: seconds one request to the server may
            take, its retries included (``VLLMSettings.timeout_s``); a server that holds a
            request fails within it. Must be > 0.
        vllm_kv_cache_gb: key/value cache of the offline vLLM engine in GiB (from RAM on a CPU).
        max_episode_steps: the horizon; ``truncated`` becomes true after this many steps and
            the next ``step`` raises ``ResetNeeded`` (the registered ids also pass it to
            ``TimeLimit``; the envs apply it themselves). Also the denominator of the
            observation's ``step_fraction``. Note: ``gym.make(id, max_episode_steps=N)`` sets
            the ``TimeLimit`` and the single env's truncation to ``N`` but not ``step_fraction``
            (Gymnasium does not pass it to the env's config); to change ``step_fraction`` too,
            use a YAML config or an ``EnvConfig`` with the same value. ``gym.make(id,
            max_episode_steps=-1)``, which would remove the ``TimeLimit``, is refused.
            ``gym.make_vec`` passes it to the vector env.
        reward: ``"expected"`` (mean of the 5-way rating distribution, low variance) or
            ``"sampled"`` (the rating the user actually gave this step, drawn with the env's RNG).
        reward_scale, reward_offset: reward = ``reward_scale * rating + reward_offset``. Every
            float field must be finite (NaN and inf, also YAML's ``.nan``/``.inf``, are refused).
        repeat_rule: what a masked action (an item the user already rated or was already
            shown) does: ``"penalty"`` (reward ``repeat_penalty``, no model call, no memory
            update, the step counts) or ``"terminate"`` (reward ``repeat_penalty`` and
            ``terminated=True``). Never an exception.
        repeat_penalty: reward of a masked action (not scaled).
        mask_rated: mask the items the user rated in the logged history (not only those shown
            in the episode).
        leave_threshold: a rating ``<= leave_threshold`` is a low rating.
        leave_prob: churn rule: after each low rating the user leaves (``terminated=True``)
            with this probability, drawn with the env's RNG. ``0`` disables churn, ``1`` makes
            the first low rating final. Used by ``leave_rule="threshold"``.
        leave_rule: how users leave: ``"model"`` (the default; after
            each rated step the user leaves with the probability of the leave model fitted on
            MovieLens sessions, :mod:`persona_gym.leave`, drawn with the env's RNG; masked
            steps never churn).
        leave_model: path of the leave model's JSON for ``leave_rule="model"``; ``None`` = the
            shipped one (``persona_gym/default_artifacts/leave_model.json``).
        like_threshold: logged ratings ``>= like_threshold`` define the profile embedding
            (the mean of the liked items' embeddings).
        obs_window: how many of the most recent interactions (logged history, then the
            episode's) appear in the observation.
    """

    dataset: str = "ml-100k"
    artifacts: str = "ml-100k"
    rater: str = "slm"
    variant: str = "persona"
    users: str = "all"
    base_model: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    compile: bool = False
    backend: str = "local"
    server_url: str | None = None
    vllm_kv_cache_gb: float = 2.0
    server_timeout_s: float = 300.0
    max_episode_steps: int = MAX_EPISODE_STEPS
    reward: str = "expected"
    reward_scale: float = 1.0
    reward_offset: float = 0.0
    repeat_rule: str = "penalty"
    repeat_penalty: float = -1.0
    mask_rated: bool = True
    leave_threshold: float = 2.0
    leave_prob: float = 0.3
    leave_rule: str = "model"
    leave_model: str | None = None
    like_threshold: float = 4.0
    obs_window: int = 5

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, str(f.type))
            if f.type == "float":
                if isinstance(value, int):
                    object.__setattr__(self, f.name, float(value))
                if not math.isfinite(value):
                    raise ConfigError(f"EnvConfig.{f.name} must be a finite number, got {value!r}")
        if self.reward not in REWARDS:
            raise ConfigError(f"EnvConfig.reward must be one of {REWARDS}, got {self.reward!r}")
        if self.repeat_rule not in REPEAT_RULES:
            raise ConfigError(
                f"EnvConfig.repeat_rule must be one of {REPEAT_RULES}, got {self.repeat_rule!r}"
            )
        if self.leave_rule not in LEAVE_RULES:
            raise ConfigError(
                f"EnvConfig.leave_rule must be one of {LEAVE_RULES}, got {self.leave_rule!r}"
            )
        if self.rater not in RATERS:
            raise ConfigError(f"EnvConfig.rater must be one of {RATERS}, got {self.rater!r}")
        if self.users not in USERS:
            raise ConfigError(f"EnvConfig.users must be one of {USERS}, got {self.users!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"EnvConfig.dtype must be one of {DTYPES}, got {self.dtype!r}")
        _check_backend(self)
        if self.max_episode_steps < 1:
            raise ConfigError(
                f"EnvConfig.max_episode_steps must be >= 1, got {self.max_episode_steps}"
            )
        if self.obs_window < 1:
            raise ConfigError(f"EnvConfig.obs_window must be >= 1, got {self.obs_window}")
        if not 0.0 <= self.leave_prob <= 1.0:
            raise ConfigError(f"EnvConfig.leave_prob must be in [0, 1], got {self.leave_prob}")
        if self.reward_scale == 0:
            raise ConfigError("EnvConfig.reward_scale must be non-zero, got 0")
        if not self.artifacts:
            raise ConfigError(
                "EnvConfig.artifacts must name 'ml-100k', 'ml-1m' or a directory, got ''"
            )
        check_device(self.device)

    def __repr__(self) -> str:
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.server_url:
            shown["server_url"] = redact_url(self.server_url)
        return "EnvConfig(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    def replace(self, **overrides: Any) -> EnvConfig:
        """A copy with some fields changed (unknown names raise, naming the field)."""
        _check_keys(overrides, "overrides")
        return dataclasses.replace(self, **overrides)


def _check_backend(config: EnvConfig) -> None:
    if config.backend not in BACKENDS:
        raise ConfigError(f"EnvConfig.backend must be one of {BACKENDS}, got {config.backend!r}")
    if config.backend == "vllm-server":
        if not config.server_url:
            raise ConfigError(
                "EnvConfig.backend='vllm-server' needs server_url, the server's base URL "
                "(e.g. server_url='http://127.0.0.1:8000/v1')"
            )
        if not config.server_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"EnvConfig.server_url must start with http:// or https://, got "
                f"{redact_url(config.server_url)!r}"
            )
    elif config.server_url is not None:
        raise ConfigError(
            f"EnvConfig.server_url={redact_url(config.server_url)!r} is read only by "
            f"backend='vllm-server' (backend is {config.backend!r}); set both or neither"
        )
    for name in ("vllm_kv_cache_gb", "server_timeout_s"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"EnvConfig.{name} must be > 0, got {getattr(config, name)}")


_TYPES = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str | None": (str, type(None)),
}


def _check_type(name: str, value: Any, annotation: str) -> None:
    allowed = _TYPES[annotation]
    ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
    if not ok:
        hint = (
            " (YAML reads a bare 1e5 as a string: write 1.0e+5)" if isinstance(value, str) else ""
        )
        raise ConfigTypeError(f"EnvConfig.{name} must be {annotation}, got {value!r}{hint}")


def _check_keys(mapping: dict[str, Any], where: str) -> None:
    known = {f.name for f in fields(EnvConfig)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise ConfigError(
            f"{where}: unknown EnvConfig field(s) {unknown}; known fields: {sorted(known)}"
        )


def check_device(device: str) -> None:
    """Fail (:class:`ConfigError`) unless ``device`` names a torch device usable here."""
    match = _DEVICE.fullmatch(device)
    if match is None:
        raise ConfigError(
            f"EnvConfig.device={device!r} is not a device; use 'cpu', 'cuda', "
            "'cuda:N', 'mps' or 'xpu'"
        )
    kind, index = match.group(1), match.group(2)
    if kind == "cpu":
        if index not in (None, "0"):
            raise ConfigError(
                f"EnvConfig.device={device!r}: the CPU has no index {index}; use 'cpu'"
            )
        return
    import torch

    backend = getattr(torch, kind, None) if kind != "mps" else torch.backends.mps
    if backend is None or not backend.is_available():
        raise ConfigError(
            f"EnvConfig.device={device!r}: no {kind} device is available on this "
            f"machine (torch {torch.__version__}); use device='cpu'"
        )
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if index is not None and int(index) >= count:
        raise ConfigError(
            f"EnvConfig.device={device!r}: this machine has {count} {kind} "
            f"device(s), numbered 0..{count - 1}"
        )


def load_env_config(name_or_path: str | Path | EnvConfig = "ml100k", **overrides: Any) -> EnvConfig:
    """The :class:`EnvConfig` of ``envs_config/<name>.yaml`` (or a YAML path), with overrides.

    An :class:`EnvConfig` passes through (overrides applied). Unknown keys in the file or in
    ``overrides`` raise ``ValueError`` naming the key and the file.
    """
    if isinstance(name_or_path, EnvConfig):
        return name_or_path.replace(**overrides)
    from envs_config import read_config

    data, path = read_config(name_or_path)
    _check_keys(data, str(path))
    _check_keys(overrides, f"overrides of {path}")
    try:
        return EnvConfig(**{**data, **overrides})
    except ConfigTypeError as err:
        raise ConfigTypeError(f"{path}: {err}") from err
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from err


def parse_env_kwargs(pairs: list[str]) -> dict[str, Any]:
    """``["max_episode_steps=30", "compile=true"]`` -> ``{"max_episode_steps": 30, "compile": True}``
    (values read as YAML), checked against :class:`EnvConfig`: an unknown field or a bad value
    fails here, naming it, before any work."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env-kwargs {pair!r}: write KEY=VALUE, e.g. max_episode_steps=30")
        out[key] = yaml.safe_load(value) if value else ""
    EnvConfig().replace(**out)
    return out


def add_env_kwargs_argument(parser: Any) -> None:
    """``--env-kwargs KEY=VALUE ...`` on a command's parser (:func:`parse_env_kwargs` reads it)."""
    parser.add_argument(
        "--env-kwargs",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="environment settings as gym.make keywords (EnvConfig fields, values "
        "read as YAML), e.g. max_episode_steps=30 leave_rule=model compile=true "
        "reward=sampled device=cuda (default: the env's config)",
    )
