"""``PersonaRecEnv``: one simulated user per episode rates the movies the agent recommends.

Registered as ``PersonaML100K-v0`` and ``PersonaML1M-v0`` (``import persona_gym``). Its class
docstring is the environments' contract; the rules are implemented once, in
:class:`persona_gym.envs.core.RecCore`, shared with :class:`persona_gym.envs.PersonaRecVectorEnv`.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from persona_gym.envs.config import EnvConfig, load_env_config
from persona_gym.envs.core import EpisodeState, RecCore
from persona_gym.errors import ConfigError, ConfigTypeError
from persona_gym.simulator.rater import Rater, redact_url

__all__ = [
    "ActType",
    "EnvTypeError",
    "ObsType",
    "PersonaRecEnv",
    "check_render_mode",
    "check_time_limit",
]

_URL = re.compile(r"https?://[^\s'\"<>]+")


class EnvTypeError(ConfigTypeError):
    """An argument of the env has the wrong type. Its message is redacted when it is made:
    ``gym.make`` re-raises a ``TypeError`` from the env as ``type(err)(message + its kwargs)``,
    and the kwargs may hold a ``server_url`` with credentials."""

    def __init__(self, message: str) -> None:
        super().__init__(_URL.sub(lambda m: redact_url(m.group(0)), message))


def check_render_mode(render_mode: Any, supported: Sequence[str]) -> None:
    """Refuse (:class:`EnvTypeError`, a ``TypeError``) a ``render_mode`` other than ``None`` or
    one of ``supported``. A ``TypeError``: SB3's ``make_vec_env`` asks for ``"rgb_array"`` and
    retries without a render mode on a ``TypeError``."""
    if render_mode is not None and render_mode not in supported:
        raise EnvTypeError(
            f"render_mode={render_mode!r} is not supported: use one of {list(supported)} "
            "(render() returns the text view) or None"
        )


def check_time_limit(limit: Any) -> int:
    """``gym.make``'s ``max_episode_steps`` argument as the env's horizon: an int >= 1 (``None``:
    not given, the caller uses the config's); ``-1``, 0 or a non-int is a :class:`ConfigError`."""
    if (
        isinstance(limit, int | np.integer)
        and not isinstance(limit, bool | np.bool_)
        and limit >= 1
    ):
        return int(limit)
    why = (
        "removes the TimeLimit, and these episodes need a horizon"
        if isinstance(limit, int) and limit == -1 and not isinstance(limit, bool)
        else "is not an int >= 1"
    )
    raise ConfigError(
        f"gym.make(..., max_episode_steps={limit!r}) {why}: pass an int >= 1 or leave it out "
        "(the env config's EnvConfig.max_episode_steps applies)"
    )


def _time_limit(env: gym.Env) -> Any:
    """The ``max_episode_steps`` of the ``TimeLimit`` that ``gymnasium.make`` is about to wrap
    ``env`` in: the argument of the call, else the registered one; ``None`` when ``env`` is not
    being built by ``gym.make`` or gets no ``TimeLimit`` (``-1`` is returned, to be refused).

    ``gym.make`` keeps that argument for the wrapper and tells the env nothing, so the env reads
    it from the frame of ``gymnasium.envs.registration.make`` itself (past the ``__init__``
    frames of ``env``); any other caller gets ``None``.
    """
    from gymnasium.envs import registration

    make_code = getattr(registration.make, "__code__", None)
    frame = sys._getframe(1)
    while frame is not None and frame.f_locals.get("self") is env:
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None or frame.f_code is not make_code:
        return None
    limit = frame.f_locals.get("max_episode_steps")
    if limit is None:
        limit = getattr(frame.f_locals.get("env_spec"), "max_episode_steps", None)
    return limit


ObsType = dict[str, Any]  # the arrays of the Observation Space table
ActType = np.int64


class PersonaRecEnv(gym.Env[ObsType, ActType]):
    """Recommend one movie per step to a simulated user; the user's rating is the reward.

    ## Description

    Each episode is one simulated user of the rater (by default the shipped ML-100k
    simulator: SmolLM2-135M with the user's persona LoRA adapter). The agent recommends one
    catalogue item per step; the user rates it from their profile, the memories retrieved for
    the item and their short-term window (the last ``k`` interactions: the logged history, then
    this episode's recommendations with the ratings the user gave, i.e. the sampled ones). The
    rating rule is the :class:`~persona_gym.simulator.rater.Rater`'s; everything else is the env's.

    ## Action Space

    ``Discrete(n_items)``: a catalogue index (``ItemCatalog``; ``info["item_id"]`` is the
    dataset's id). Allowed actions: not rated in the logged history (with ``mask_rated``) and
    not shown yet in this episode; :meth:`action_masks` and ``info["action_mask"]`` mark them
    (sb3-contrib's MaskablePPO reads ``action_masks``). A masked action is never rated; it
    follows ``repeat_rule`` (Rewards, Episode End).

    ## Observation Space

    A flat ``Dict`` of float32 ``Box`` es (SB3's ``MultiInputPolicy`` reads it;
    ``FlattenObservation`` gives one ``Box``); ``d`` is the item embedding size, ``w`` is
    ``obs_window``:

    | Key              | Shape     | Range   | Meaning                                                |
    |------------------|-----------|---------|--------------------------------------------------------|
    | ``profile``      | ``(d,)``  | [-1, 1] | normalised mean embedding of the items the user rated  |
    |                  |           |         | ``>= like_threshold`` in the logged history (all their |
    |                  |           |         | items when none)                                       |
    | ``recent_items`` | ``(w*d,)``| [-1, 1] | embeddings of the last ``w`` interactions, oldest      |
    |                  |           |         | first, zero-padded at the front; slot ``j`` is         |
    |                  |           |         | ``[j*d:(j+1)*d]`` (1-D: SB3 warns on 2-D non-images)   |
    | ``recent_ratings``| ``(w,)`` | [0, 1]  | their ratings as ``(r - 1) / 4``                       |
    | ``recent_mask``  | ``(w,)``  | {0, 1}  | 1 where a slot holds an interaction                    |
    | ``step_fraction``| ``(1,)``  | [0, 1]  | ``min(steps / max_episode_steps, 1)``                  |

    ## Rewards

    A rated action earns ``reward_scale * rating + reward_offset``, with ``rating`` the
    expected rating of the user's 5-way distribution (``reward="expected"``, the default) or
    the rating drawn from it with the env's RNG (``"sampled"``). A masked action earns
    ``repeat_penalty`` (not scaled), calls no model and leaves the window unchanged.

    ## Starting State

    The user is drawn uniformly from ``user_ids`` with ``self.np_random`` (one integer draw),
    or chosen with ``reset(options={"user_id": u})``; the window starts as the end of their
    logged history and nothing is shown yet. Each rated step then draws, in this order, one
    uniform for the sampled rating and one for the churn rule; a masked step draws nothing.

    ## Episode End

    * ``terminated``: the user left (``leave_rule="threshold"``: after a rating
      ``<= leave_threshold`` they leave with probability ``leave_prob``; ``"model"``: after each
      rated step with the probability of the fitted leave model, :mod:`persona_gym.leave`), or
      a masked action under ``repeat_rule="terminate"``;
    * ``truncated``: every item is masked (nothing left to recommend), or the horizon: after
      ``max_episode_steps`` steps. The env truncates there itself, on the same step as the
      ``TimeLimit`` that ``gym.make`` adds: its horizon is ``gym.make``'s ``max_episode_steps``
      argument when given (an int >= 1; ``-1``, which would remove the ``TimeLimit``, is
      refused), else ``EnvConfig.max_episode_steps``.

    After ``terminated`` or ``truncated``, ``step`` raises ``gymnasium.error.ResetNeeded``
    until ``reset``.

    ## Info

    The same keys after ``reset`` and every ``step``: ``user_id``, ``persona``, ``step``; the
    last recommendation's ``item_index`` and ``item_id`` (-1 after reset), ``title``,
    ``rating_probs`` ``(5,)``, ``expected_rating`` and ``sampled_rating`` (NaN after reset and
    for masked actions), ``masked_action``; ``left``; ``action_mask`` ``(n_items,)`` bool; and
    ``text`` (the ``render()`` view) with ``render_mode="ansi"``.

    ## Arguments

    ```python
    gym.make("PersonaML100K-v0", artifacts="path/to/artifacts", reward="sampled")
    ```

    | Argument        | Default     | Meaning                                                   |
    |-----------------|-------------|-----------------------------------------------------------|
    | ``config``      | ``"ml100k"``| a bundled config name, a YAML path or an ``EnvConfig``    |
    | ``render_mode`` | ``None``    | ``"ansi"``: ``render()`` returns the text view; any other |
    |                 |             | mode is refused (a ``TypeError``, so SB3's                |
    |                 |             | ``make_vec_env`` retries without its ``"rgb_array"``)     |
    | ``rater``       | ``None``    | a :class:`~persona_gym.simulator.rater.Rater` to use instead of     |
    |                 |             | loading the config's SLM simulator (e.g. a ``TableRater``)|
    | ``**overrides`` |             | single :class:`EnvConfig` fields; those that shape the    |
    |                 |             | episode: ``artifacts``, ``variant``, ``reward``,          |
    |                 |             | ``reward_scale``, ``reward_offset``, ``repeat_rule``,     |
    |                 |             | ``repeat_penalty``, ``mask_rated``, ``leave_threshold``,  |
    |                 |             | ``leave_prob``, ``leave_rule``, ``leave_model``,          |
    |                 |             | ``like_threshold``, ``obs_window``,                       |
    |                 |             | ``max_episode_steps``; of the model: ``base_model``,      |
    |                 |             | ``device``, ``dtype``, ``compile`` (each documented in    |
    |                 |             | :class:`EnvConfig`)                                       |

    ## Vectorized

    ``gym.make_vec(id, num_envs=N)`` builds the native :class:`PersonaRecVectorEnv`: all
    sub-environments' rated actions go to one ``Rater.rate`` call per step. Sub-environment
    ``i`` reset with seed ``s + i`` behaves exactly as this env reset with seed ``s + i``.
    Autoreset is ``NEXT_STEP``: the step after a sub-environment ends resets it, ignores its
    action and returns reward 0.0 for it.

    ## Version History

    * v0: initial version (persona LoRA simulators; ``PersonaML100K-v0`` and
      ``PersonaML1M-v0``).
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(
        self,
        config: str | EnvConfig = "ml100k",
        render_mode: str | None = None,
        rater: Rater | str | None = None,
        **overrides: Any,
    ):
        if isinstance(rater, str):  # a name: EnvConfig.rater ("slm" or "prior"), not a Rater
            overrides["rater"], rater = rater, None
        check_render_mode(render_mode, self.metadata["render_modes"])
        limit = _time_limit(self)
        try:
            self.config = load_env_config(config, **overrides)
        except ConfigTypeError as err:  # gym.make re-raises it with its kwargs: redact them
            raise EnvTypeError(str(err)) from None
        self.max_episode_steps = (
            check_time_limit(limit) if limit is not None else self.config.max_episode_steps
        )
        self.render_mode = render_mode
        self.core = RecCore(self.config, rater)
        self.observation_space = self.core.observation_space
        self.action_space = self.core.action_space
        self.state: EpisodeState | None = None
        self._ended = False  # the last step terminated or truncated the episode

    @property
    def rater(self) -> Rater:
        """The simulated users (shared by every env of the process with the same config)."""
        return self.core.rater

    @property
    def user_ids(self) -> list[int]:
        """Ids of the simulated users (valid ``options["user_id"]`` values)."""
        return list(self.core.user_ids)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[ObsType, dict[str, Any]]:
        super().reset(seed=seed)
        self.state = self.core.new_episode(self.np_random, options)
        self._ended = False
        return self.core.observation(self.state), self._info()

    def step(self, action: ActType | int) -> tuple[ObsType, float, bool, bool, dict[str, Any]]:
        if self.state is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        if self._ended:
            raise gym.error.ResetNeeded(
                "the episode ended (terminated or truncated); call reset() before step()"
            )
        result = self.core.step([self.state], [action], [self.np_random])[0]
        truncated = bool(result.truncated or self.state.steps >= self.max_episode_steps)
        self._ended = bool(result.terminated or truncated)
        return (
            self.core.observation(self.state),
            float(result.reward),
            result.terminated,
            truncated,
            self._info(),
        )

    def action_masks(self) -> np.ndarray:
        """``(n_items,)`` bool, true where the action is allowed (sb3-contrib MaskablePPO)."""
        if self.state is None:
            raise RuntimeError("call reset() before action_masks()")
        return self.state.allowed.copy()

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            gym.logger.warn(
                "render() with render_mode=None does nothing; make the env with render_mode='ansi'"
            )
            return None
        if self.state is None:
            return ""
        return self.core.text(self.state)

    def _info(self) -> dict[str, Any]:
        assert self.state is not None
        return self.core.info(self.state, with_text=self.render_mode == "ansi")
