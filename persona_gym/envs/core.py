"""The episode logic shared by the single and the vector environment (one definition).

:class:`RecCore` owns the rater (:class:`~persona_gym.simulator.rater.Rater`), the spaces and the rules;
:class:`EpisodeState` is one user's episode. Both environments call :meth:`RecCore.step` with
their states, actions and random generators: the non-masked actions go to ONE ``Rater.rate``
call, then each state is advanced with its own generator, so a sub-environment of the vector
env seeded ``s`` behaves exactly as a single env seeded ``s``. The rules themselves are
documented once, in :class:`~persona_gym.envs.PersonaRecEnv`'s docstring.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium import spaces

from persona_gym import ratings
from persona_gym.artifacts import resolve_artifacts
from persona_gym.envs.config import EnvConfig
from persona_gym.errors import ConfigTypeError
from persona_gym.leave import LeaveModel, episode_features, load_leave_model
from persona_gym.simulator.memory import Interaction, format_window, short_term_window
from persona_gym.simulator.rater import Rater, check_distribution

__all__ = [
    "EpisodeState",
    "RecCore",
    "StepResult",
    "check_options",
    "clear_simulator_cache",
    "get_simulator",
]


def check_options(options: Any, example: str) -> Mapping[str, Any]:
    """``reset``'s ``options`` as a mapping (``None`` -> ``{}``), or a one-line
    :class:`~persona_gym.errors.ConfigTypeError` that shows what it accepts (``example``)."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        shown = repr(options)
        shown = shown if len(shown) <= 80 else shown[:80] + "…"
        raise ConfigTypeError(
            f"reset(options={shown}): options must be a dict such as {example}, or None"
        )
    return options


_CACHE: dict[tuple, Any] = {}
_CACHE_LOCK = threading.Lock()


def get_simulator(config: EnvConfig) -> Rater:
    """The process-wide SLM :class:`UserSimulator` of a config (loaded once per key).

    Key: (artifacts directory, variant, base model, device, dtype, compile, backend, server URL,
    server timeout, vLLM cache size); so ``gym.make_vec(..., vectorization_mode="sync")`` with 16 copies loads
    one model. ``backend="vllm"``/``"vllm-server"`` rates through vLLM
    (:func:`persona_gym.simulator.served.load_served`).
    """
    root = resolve_artifacts(config.artifacts, dataset=config.dataset)
    key = (
        str(root),
        config.rater,
        config.variant,
        config.base_model,
        config.device,
        config.dtype,
        config.compile,
        config.backend,
        config.server_url,
        config.server_timeout_s,
        config.vllm_kv_cache_gb,
    )
    with _CACHE_LOCK:
        simulator = _CACHE.get(key)
        if simulator is None:
            simulator = _load_simulator(root, config)
            _CACHE[key] = simulator
    return simulator


def _load_simulator(root: Path, config: EnvConfig) -> Rater:
    if config.rater == "prior":
        from persona_gym.simulator.prior_rater import PriorRater

        return PriorRater.load(root)
    if config.backend == "local":
        from persona_gym.simulator.simulator import UserSimulator

        return UserSimulator.load(
            root,
            variant=config.variant,
            base_model=config.base_model,
            device=config.device,
            dtype=config.dtype,
            compile=config.compile,
        )
    from persona_gym.assets import resolve_dtype
    from persona_gym.simulator.served import VLLMSettings, load_served

    settings = VLLMSettings(
        url=config.server_url,
        kv_cache_gb=config.vllm_kv_cache_gb,
        timeout_s=config.server_timeout_s,
    )
    return load_served(
        root,
        backend=config.backend,
        variant=config.variant,
        base_model=config.base_model,
        dtype=resolve_dtype(config.dtype, config.device),
        settings=settings,
    )


def clear_simulator_cache() -> None:
    """Forget the cached simulators (their memory is freed once no environment uses them)."""
    with _CACHE_LOCK:
        _CACHE.clear()


@dataclass
class EpisodeState:
    """One user's episode: the logged history, what happened since reset, and the mask.

    ``allowed[i]`` is false for items the user rated in the logged history (when
    ``mask_rated``) and for items already shown in this episode.
    """

    user_id: int
    persona: int
    history: tuple[Interaction, ...]  # logged training interactions, time order
    allowed: np.ndarray  # bool (n_items,)
    episode: list[Interaction] = field(default_factory=list)  # rated steps of this episode
    steps: int = 0
    left: bool = False
    last: dict[str, Any] = field(default_factory=dict)  # fields of the last step for info/text

    def interactions(self) -> tuple[Interaction, ...]:
        """Logged history followed by the episode's rated steps (the window's source)."""
        return self.history + tuple(self.episode)

    def record(self, item: int, rating: float, timestamp: int | None = None) -> None:
        """The transition of a rated step: the step counts, ``(item, rating)`` joins the episode
        (and so the next windows and observations), and the item is no longer allowed.

        ``timestamp`` defaults to the last logged timestamp plus the step number.
        """
        self.steps += 1
        if timestamp is None:
            timestamp = (self.history[-1].timestamp if self.history else 0) + self.steps
        self.episode.append(Interaction(item, rating, timestamp))
        self.allowed[item] = False


@dataclass
class StepResult:
    """What one state's step produced (before the env adds horizon truncation)."""

    reward: float
    terminated: bool
    truncated: bool


@dataclass(frozen=True)
class _UserData:
    history: tuple[Interaction, ...]
    rated: np.ndarray  # bool (n_items,)
    profile: np.ndarray  # float32 (dim,)


class RecCore:
    """Spaces, rules and per-user data of a recommendation environment.

    Args:
        config: the validated settings.
        rater: the simulated users; ``None`` loads the SLM simulator of ``config`` (shared by
            every environment of the process with the same key, :func:`get_simulator`).
    """

    def __init__(self, config: EnvConfig, rater: Rater | None = None):
        self.config = config
        self._injected = rater  # pickled with the env; the SLM simulator is reloaded instead
        self.rater: Rater = rater if rater is not None else get_simulator(config)
        self.leave_model: LeaveModel | None = (
            load_leave_model(config.leave_model) if config.leave_rule == "model" else None
        )
        self._init_static()

    def _init_static(self) -> None:
        rater = self.rater
        self.catalog = rater.catalog
        self.n_items = len(self.catalog)
        self.user_ids: list[int] = list(
            rater.user_ids if self.config.users == "all" else rater.training_user_ids
        )
        self._known_users = set(self.user_ids)
        self.window_size = rater.window_size
        emb = np.asarray(rater.item_embeddings, dtype=np.float32)
        if emb.shape[0] != self.n_items:
            raise ValueError(
                f"{rater.source}: {emb.shape[0]} item embeddings for "
                f"{self.n_items} catalogue items; re-run `persona-gym distill`"
            )
        self.item_embeddings = emb
        self.dim = emb.shape[1]
        self._users: dict[int, _UserData] = {}
        w = self.config.obs_window
        self.observation_space = spaces.Dict(
            {
                "profile": spaces.Box(-1.0, 1.0, (self.dim,), np.float32),
                "recent_items": spaces.Box(-1.0, 1.0, (w * self.dim,), np.float32),
                "recent_ratings": spaces.Box(0.0, 1.0, (w,), np.float32),
                "recent_mask": spaces.Box(0.0, 1.0, (w,), np.float32),
                "step_fraction": spaces.Box(0.0, 1.0, (1,), np.float32),
            }
        )
        self.action_space = spaces.Discrete(self.n_items)

    # -- pickling: the model is reloaded (through the cache), never pickled ------------------
    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "rater": self._injected}

    def __setstate__(self, state: dict[str, Any]) -> None:
        RecCore.__init__(self, state["config"], state["rater"])

    # -- users -------------------------------------------------------------------------------
    def user_data(self, user_id: int) -> _UserData:
        """The user's logged history, its mask and profile embedding (computed once)."""
        data = self._users.get(user_id)
        if data is None:
            history = self.rater.history(user_id)
            rated = np.zeros(self.n_items, dtype=bool)
            items = np.array([x.item_index for x in history], dtype=np.int64)
            ratings = np.array([x.rating for x in history], dtype=np.float64)
            rated[items] = True
            liked = items[ratings >= self.config.like_threshold] if len(items) else items
            chosen = liked if len(liked) else items
            profile = (
                self.item_embeddings[chosen].mean(axis=0)
                if len(chosen)
                else np.zeros(self.dim, dtype=np.float32)
            )
            norm = float(np.linalg.norm(profile))
            profile = (profile / norm if norm > 0 else profile).astype(np.float32)
            data = _UserData(history, rated, profile)
            self._users[user_id] = data
        return data

    def check_user(self, user_id: Any) -> int:
        """The user id as an int, or ``ValueError`` naming the valid ids."""
        is_int = isinstance(user_id, int | np.integer) and not isinstance(user_id, bool | np.bool_)
        uid = int(user_id) if is_int else None
        if uid is None or uid not in self._known_users:
            ids = self.user_ids
            examples = ", ".join(str(u) for u in ids[:5])
            raise ValueError(
                f"options['user_id']={user_id!r} is not a simulated user of "
                f"{self.rater.source}: {len(ids)} users with ids in "
                f"[{ids[0]}, {ids[-1]}] (not contiguous), e.g. {examples}; see env.unwrapped.user_ids"
            )
        return uid

    def new_episode(self, rng: np.random.Generator, options: dict[str, Any] | None) -> EpisodeState:
        """A fresh episode: the user from ``options["user_id"]`` or drawn with ``rng``."""
        options = dict(check_options(options, "{'user_id': 42}"))
        unknown = sorted(set(options) - {"user_id"})
        if unknown:
            raise ValueError(f"unknown reset option(s) {unknown}; supported: ['user_id']")
        if options.get("user_id") is not None:
            user_id = self.check_user(options["user_id"])
        else:
            user_id = self.user_ids[int(rng.integers(len(self.user_ids)))]
        data = self.user_data(user_id)
        allowed = ~data.rated if self.config.mask_rated else np.ones(self.n_items, dtype=bool)
        if not allowed.any():
            raise ValueError(
                f"user {user_id} rated every item of the catalogue in the logged history, so "
                "nothing can be recommended with mask_rated=True; pass mask_rated=False"
            )
        persona = int(self.rater.persona(user_id))
        return EpisodeState(user_id, persona, data.history, allowed)

    # -- steps -------------------------------------------------------------------------------
    def check_action(self, action: Any) -> int:
        """The action as an int, or ``ValueError`` naming the valid range."""
        value = np.asarray(action)
        if value.shape != () or not np.issubdtype(value.dtype, np.integer):
            raise ValueError(
                f"action {action!r} is not one integer item index "
                f"(the action space is Discrete({self.n_items}))"
            )
        item = int(value)
        if not 0 <= item < self.n_items:
            raise ValueError(
                f"action {item} is outside Discrete({self.n_items}): valid actions "
                f"are catalogue indices 0..{self.n_items - 1}"
            )
        return item

    def window(self, state: EpisodeState) -> tuple[Interaction, ...]:
        """The short-term window the user model sees (training's definition)."""
        return short_term_window(state.interactions(), self.window_size)

    def at_horizon(self, state: EpisodeState) -> bool:
        """Whether the episode reached ``max_episode_steps`` (the vector env and the policy
        evaluation truncate there; ``gym.make``'s ``TimeLimit`` does it for the single env)."""
        return state.steps >= self.config.max_episode_steps

    def step(
        self,
        states: Sequence[EpisodeState],
        actions: Sequence[Any],
        rngs: Sequence[np.random.Generator],
    ) -> list[StepResult]:
        """Advance each state by its action; all rated actions in ONE ``Rater.rate`` call, whose
        rows must be rating distributions (:func:`~persona_gym.simulator.rater.check_distribution`: a
        corrupt model raises there, before any state changes)."""
        items = [self.check_action(a) for a in actions]
        rated = [i for i, (s, a) in enumerate(zip(states, items, strict=True)) if s.allowed[a]]
        probs = np.zeros((len(states), 5))
        if rated:
            probs[rated] = check_distribution(
                self.rater.rate(
                    [states[i].user_id for i in rated],
                    [items[i] for i in rated],
                    [self.window(states[i]) for i in rated],
                ),
                self.rater.source,
                row_name=lambda row: self._rater_of(states[rated[row]]),
                n_rows=len(rated),
            )
        results = []
        for i, (state, item) in enumerate(zip(states, items, strict=True)):
            if i in rated:
                results.append(self._rated(state, item, probs[i], rngs[i]))
            else:
                results.append(self._masked(state, item))
        return results

    def _rater_of(self, state: EpisodeState) -> str:
        """Who rated the state's user, for messages: the user and their adapter (or persona)."""
        adapter_of = getattr(self.rater, "adapter_of", None)
        if callable(adapter_of):
            return f"user {state.user_id} (adapter {adapter_of(state.user_id)!r})"
        return f"user {state.user_id} (persona {state.persona})"

    def _rated(
        self, state: EpisodeState, item: int, probs: np.ndarray, rng: np.random.Generator
    ) -> StepResult:
        cfg = self.config
        expected = float(ratings.expected(probs[None])[0])
        sampled = float(ratings.sample(probs[None], rng)[0])
        churn_draw = float(rng.random())
        state.record(item, sampled)
        if self.leave_model is None:
            state.left = sampled <= cfg.leave_threshold and churn_draw < cfg.leave_prob
        else:
            state.left = churn_draw < self.leave_probability(state)
        rating = expected if cfg.reward == "expected" else sampled
        state.last = {
            "item": item,
            "probs": probs.astype(np.float64),
            "expected": expected,
            "sampled": sampled,
            "masked": False,
        }
        return StepResult(
            cfg.reward_scale * rating + cfg.reward_offset, state.left, not state.allowed.any()
        )

    def leave_probability(self, state: EpisodeState) -> float:
        """The leave model's P(leave) after the state's last rated step (the episode is one
        session; the user's mean is that of their logged history)."""
        if self.leave_model is None:
            raise ValueError("leave_probability needs leave_rule='model'")
        history = self.user_data(state.user_id).history
        user_mean = float(np.mean([x.rating for x in history])) if history else 3.0
        features = episode_features([x.rating for x in state.episode], user_mean)
        return float(self.leave_model.probability(features))

    def _masked(self, state: EpisodeState, item: int) -> StepResult:
        state.steps += 1
        state.left = False
        state.last = {
            "item": item,
            "probs": np.full(5, np.nan),
            "expected": float("nan"),
            "sampled": float("nan"),
            "masked": True,
        }
        terminate = self.config.repeat_rule == "terminate"
        return StepResult(
            float(self.config.repeat_penalty), terminate, not terminate and not state.allowed.any()
        )

    # -- views -------------------------------------------------------------------------------
    def observation(self, state: EpisodeState) -> dict[str, np.ndarray]:
        """The observation of one episode (keys and shapes: ``PersonaRecEnv``'s docstring)."""
        w = self.config.obs_window
        recent = short_term_window(state.interactions(), w)
        items = np.zeros((w, self.dim), dtype=np.float32)
        scores = np.zeros(w, dtype=np.float32)
        mask = np.zeros(w, dtype=np.float32)
        if recent:
            n = len(recent)
            items[w - n :] = self.item_embeddings[[x.item_index for x in recent]]
            scores[w - n :] = [ratings.to_unit(x.rating) for x in recent]
            mask[w - n :] = 1.0
        fraction = min(state.steps / self.config.max_episode_steps, 1.0)
        return {
            "profile": self.user_data(state.user_id).profile.copy(),
            "recent_items": np.clip(items, -1.0, 1.0).reshape(-1),
            "recent_ratings": np.clip(scores, 0.0, 1.0),
            "recent_mask": mask,
            "step_fraction": np.array([fraction], dtype=np.float32),
        }

    def observations(self, states: Sequence[EpisodeState]) -> dict[str, np.ndarray]:
        """The observations of several episodes, stacked per key (a batch)."""
        singles = [self.observation(s) for s in states]
        return {key: np.stack([o[key] for o in singles]) for key in self.observation_space}

    def info(self, state: EpisodeState, with_text: bool = False) -> dict[str, Any]:
        """The info of one episode (keys: ``PersonaRecEnv``'s docstring); ``text`` only when
        ``with_text``."""
        last = state.last
        item = int(last.get("item", -1))
        info: dict[str, Any] = {
            "user_id": int(state.user_id),
            "persona": int(state.persona),
            "step": int(state.steps),
            "item_index": item,
            "item_id": int(self.catalog.item_ids[item]) if item >= 0 else -1,
            "title": self.catalog.title_year(item) if item >= 0 else "",
            "rating_probs": np.asarray(last.get("probs", np.full(5, np.nan)), dtype=np.float64),
            "expected_rating": float(last.get("expected", np.nan)),
            "sampled_rating": float(last.get("sampled", np.nan)),
            "masked_action": bool(last.get("masked", False)),
            "left": bool(state.left),
            "action_mask": state.allowed.copy(),
        }
        if with_text:
            info["text"] = self.text(state)
        return info

    def text(self, state: EpisodeState) -> str:
        """The text view: user, profile, short-term window, last recommendation and rating."""
        profile = self.rater.profile(state.user_id)
        lines = [
            f"User {state.user_id} (persona {state.persona}), step {state.steps}/"
            f"{self.config.max_episode_steps}",
            f"Profile: {profile}",
            format_window(self.window(state), self.catalog),
        ]
        last = state.last
        if last:
            title = self.catalog.title_year(int(last["item"]))
            if last["masked"]:
                lines.append(
                    f"Last: {title} was masked (already rated or shown): {self.config.repeat_rule}"
                )
            else:
                lines.append(
                    f"Last: recommended {title}; rated {last['sampled']:.0f} "
                    f"(expected {last['expected']:.2f})"
                )
        if state.left:
            lines.append("The user left.")
        return "\n".join(lines)
