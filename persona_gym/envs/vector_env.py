"""``PersonaRecVectorEnv``: ``num_envs`` users at once, one rating-model call per step.

The native vector form of :class:`~persona_gym.envs.PersonaRecEnv` (``gym.make_vec(id,
num_envs=N)``), whose docstring is the contract of both. Each sub-environment has its own
random generator: ``reset(seed=s)`` seeds sub-environment ``i`` with ``s + i`` (a list of seeds
sets them one by one), so its episodes, rewards and infos equal those of a single env reset
with seed ``s + i`` and given the same actions. Autoreset is ``NEXT_STEP``: the step after a
sub-environment terminates or truncates resets it; its action is ignored and its reward on
that step is 0.0 (with ``terminated`` and ``truncated`` false and the new episode's info).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gymnasium.utils import seeding
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

from persona_gym.envs.config import EnvConfig, load_env_config
from persona_gym.envs.core import EpisodeState, RecCore, check_options
from persona_gym.envs.recsys_env import EnvTypeError, check_render_mode
from persona_gym.errors import ConfigError, ConfigTypeError
from persona_gym.simulator.rater import Rater

__all__ = ["PersonaRecVectorEnv"]


class PersonaRecVectorEnv(VectorEnv):
    """Batched recommendation environment (see :class:`~persona_gym.envs.PersonaRecEnv`).

    Args:
        num_envs: number of sub-environments.
        config: a bundled config name, a YAML path or an :class:`EnvConfig`.
        max_episode_steps: the horizon (``None`` = the config's); each sub-environment
            truncates after this many steps.
        render_mode: ``None`` or ``"ansi"`` (``render()`` returns the sub-environments'
            text views joined by blank lines); any other mode is refused.
        rater: the simulated users (``None``: the config's SLM simulator).
        **overrides: single :class:`EnvConfig` fields.

    ``info`` holds the single env's keys as arrays with ``_key`` masks (``_add_info``), without
    ``text``.
    """

    metadata = {
        "render_modes": ["ansi"],
        "render_fps": 4,
        "autoreset_mode": AutoresetMode.NEXT_STEP,
    }

    def __init__(
        self,
        num_envs: int = 1,
        config: str | EnvConfig = "ml100k",
        max_episode_steps: int | None = None,
        render_mode: str | None = None,
        rater: Rater | str | None = None,
        **overrides: Any,
    ):
        if isinstance(rater, str):  # a name: EnvConfig.rater ("slm" or "prior"), not a Rater
            overrides["rater"], rater = rater, None
        is_int = isinstance(num_envs, int | np.integer) and not isinstance(
            num_envs, bool | np.bool_
        )
        if not is_int or num_envs < 1:
            raise ConfigError(f"num_envs must be an int >= 1, got {num_envs!r}")
        check_render_mode(render_mode, self.metadata["render_modes"])
        if max_episode_steps is not None:
            overrides["max_episode_steps"] = max_episode_steps
        try:
            self.config = load_env_config(config, **overrides)
        except ConfigTypeError as err:  # gym.make_vec may quote its kwargs: redact them
            raise EnvTypeError(str(err)) from None
        num_envs = int(num_envs)
        self.num_envs = num_envs
        self.max_episode_steps = self.config.max_episode_steps
        self.render_mode = render_mode
        self.core = RecCore(self.config, rater)
        self.single_observation_space = self.core.observation_space
        self.single_action_space = self.core.action_space
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.states: list[EpisodeState | None] = [None] * num_envs
        self.rngs: list[np.random.Generator] = [seeding.np_random()[0] for _ in range(num_envs)]
        self.autoreset = np.zeros(num_envs, dtype=bool)

    @property
    def user_ids(self) -> list[int]:
        """Ids of the simulated users (valid ``options["user_id"]`` values)."""
        return list(self.core.user_ids)

    def reset(
        self, *, seed: int | list[int | None] | None = None, options: dict[str, Any] | None = None
    ):
        """Reset every sub-environment.

        ``seed``: ``s`` seeds sub-environment ``i`` with ``s + i``; a list gives one seed per
        sub-environment. ``options``: ``{"user_id": u}`` (every sub-environment gets user u),
        ``{"user_id": [u0, u1, ...]}`` (one per sub-environment) and/or ``{"reset_mask": m}``
        (reset only where ``m`` is true; the others keep their episodes).
        """
        options = dict(
            check_options(options, "{'user_id': u or [u0, u1, ...], 'reset_mask': [True, ...]}")
        )
        mask = self._reset_mask(options.pop("reset_mask", None))
        if isinstance(seed, int) or seed is None:
            super().reset(seed=seed)
            seeds = [None if seed is None else seed + i for i in range(self.num_envs)]
        else:
            seeds = list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"got {len(seeds)} seeds for {self.num_envs} sub-environments")
        users = options.pop("user_id", None)
        if not isinstance(users, list | tuple | np.ndarray):
            users = [users] * self.num_envs
        if len(users) != self.num_envs:
            raise ValueError(
                f"options['user_id'] has {len(users)} ids for {self.num_envs} sub-environments"
            )
        infos: dict[str, Any] = {}
        for i in range(self.num_envs):
            if mask[i]:
                if seeds[i] is not None:
                    self.rngs[i] = seeding.np_random(seeds[i])[0]
                sub_options = {**options, "user_id": users[i]} if users[i] is not None else options
                self.states[i] = self.core.new_episode(self.rngs[i], sub_options)
                self.autoreset[i] = False
            infos = self._add_info(infos, self.core.info(self._state(i)), i)
        return self._observations(), infos

    def step(self, actions):
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"actions must have shape ({self.num_envs},), got {actions.shape}")
        rewards = np.zeros(self.num_envs, dtype=np.float64)
        terminated = np.zeros(self.num_envs, dtype=bool)
        truncated = np.zeros(self.num_envs, dtype=bool)
        stepping = []
        for i in range(self.num_envs):
            if self.autoreset[i]:
                self.states[i] = self.core.new_episode(self.rngs[i], None)
            else:
                stepping.append(i)
        results = self.core.step(
            [self._state(i) for i in stepping],
            [actions[i] for i in stepping],
            [self.rngs[i] for i in stepping],
        )
        for i, result in zip(stepping, results, strict=True):
            rewards[i] = result.reward
            terminated[i] = result.terminated
            truncated[i] = result.truncated or self.core.at_horizon(self._state(i))
        self.autoreset = terminated | truncated
        infos: dict[str, Any] = {}
        for i in range(self.num_envs):
            infos = self._add_info(infos, self.core.info(self._state(i)), i)
        return self._observations(), rewards, terminated, truncated, infos

    def action_masks(self) -> np.ndarray:
        """``(num_envs, n_items)`` bool, true where the action is allowed."""
        return np.stack([self._state(i).allowed for i in range(self.num_envs)])

    def render(self) -> str | None:  # type: ignore[override]  # one text, not one frame per env
        if self.render_mode != "ansi":
            return None
        return "\n\n".join(self.core.text(s) for s in self.states if s is not None)

    def _reset_mask(self, value: Any) -> np.ndarray:
        """``options['reset_mask']`` as a bool array of shape ``(num_envs,)`` (``None``: all);
        values that are not booleans are refused, not cast (``'no'`` would be true)."""
        if value is None:
            return np.ones(self.num_envs, dtype=bool)
        mask = np.asarray(value)
        if mask.dtype != np.bool_ or mask.shape != (self.num_envs,):
            shown = repr(value)
            shown = shown if len(shown) <= 80 else shown[:80] + "…"
            raise ConfigError(
                f"options['reset_mask'] must be {self.num_envs} booleans (a list of True/False "
                f"or a bool array of shape ({self.num_envs},)), got {shown}"
            )
        return mask

    def _state(self, i: int) -> EpisodeState:
        state = self.states[i]
        if state is None:
            raise RuntimeError("call reset() before step()")
        return state

    def _observations(self) -> dict[str, np.ndarray]:
        return self.core.observations([self._state(i) for i in range(self.num_envs)])
