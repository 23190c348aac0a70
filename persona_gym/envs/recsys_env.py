"""``PersonaRecEnv``: one simulated user per episode rates the movies the agent recommends.

Registered as ``PersonaML100K-v0`` and ``PersonaML1M-v0`` (``import persona_gym``). The episode
logic (rules, observation, info) is :class:`persona_gym.envs.core.RecCore`'s, shared with
:class:`persona_gym.envs.PersonaRecVectorEnv`.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from persona_gym.envs.config import EnvConfig, load_env_config
from persona_gym.envs.core import EpisodeState, RecCore

__all__ = ["PersonaRecEnv"]


class PersonaRecEnv(gym.Env):
    """Recommend one movie per step to a persona-LoRA simulated user; the rating is the reward.

    Args:
        config: a bundled config name (``"ml100k"``, ``"ml1m"``), a YAML path or an
            :class:`EnvConfig`.
        render_mode: ``None`` or ``"ansi"`` (``render()`` returns the text view, which then
            also goes to ``info["text"]``). Other modes warn; ``render()`` then returns None.
        **overrides: single :class:`EnvConfig` fields (``artifacts="/path"``, ``device="cuda"``).

    * Reset: the user is drawn uniformly with ``self.np_random`` or chosen with
      ``options={"user_id": ...}``.
    * Action: ``Discrete(n_items)``, a catalogue index. :meth:`action_masks` /
      ``info["action_mask"]`` mark the allowed items (not rated in the logged history when
      ``mask_rated``, not yet shown). A masked action follows ``config.repeat_rule``.
    * Reward: ``reward_scale * rating + reward_offset`` with the expected or the sampled rating
      of the user's persona adapter, prompted with their profile, the retrieved memories of
      the candidate and the short-term window of the last ``k`` interactions (logged history,
      then this episode's recommendations with the ratings the user gave, i.e. the sampled ones).
    * ``terminated``: the user left (churn rule) or a masked action under ``"terminate"``;
      ``truncated``: every item is masked (nothing left to recommend); the horizon
      ``max_episode_steps`` is applied by ``TimeLimit`` (``gym.make``).
    * After ``terminated`` or ``truncated`` from the env itself, ``step`` raises
      ``gymnasium.error.ResetNeeded`` until ``reset`` (as ``OrderEnforcing`` does before the
      first reset). A ``TimeLimit`` truncation happens in the wrapper, which does not refuse
      further steps; the env then keeps the episode going, as every Gymnasium env does.
    * Observation and info keys: see :class:`~persona_gym.envs.core.RecCore` and
      :meth:`~persona_gym.envs.core.RecCore.info`.
    """

    metadata = {"render_modes": ["ansi"], "render_fps": 4}

    def __init__(self, config: str | EnvConfig = "ml100k", render_mode: str | None = None,
                 **overrides: Any):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            # Like Gymnasium's own envs, an unsupported mode is not fatal (SB3's make_vec_env
            # asks for "rgb_array" by default): warn, and render() returns None.
            gym.logger.warn(f"render_mode {render_mode!r} is not supported; choose from "
                            f"{self.metadata['render_modes']} or None; render() will return None")
        self.config = load_env_config(config, **overrides)
        self.render_mode = render_mode
        self.core = RecCore(self.config)
        self.observation_space = self.core.observation_space
        self.action_space = self.core.action_space
        self.state: EpisodeState | None = None
        self._ended = False  # the last step terminated or truncated the episode

    @property
    def simulator(self):
        """The shared :class:`~persona_gym.simulator.simulator.UserSimulator`."""
        return self.core.simulator

    @property
    def user_ids(self) -> list[int]:
        """Ids of the simulated users (valid ``options["user_id"]`` values)."""
        return list(self.core.user_ids)

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.state = self.core.new_episode(self.np_random, options)
        self._ended = False
        return self.core.observation(self.state), self._info()

    def step(self, action):
        if self.state is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        if self._ended:
            raise gym.error.ResetNeeded("the episode ended (terminated or truncated); call reset() "
                                        "before step()")
        result = self.core.step([self.state], [action], [self.np_random])[0]
        self._ended = bool(result.terminated or result.truncated)
        return (self.core.observation(self.state), float(result.reward), result.terminated,
                result.truncated, self._info())

    def action_masks(self) -> np.ndarray:
        """``(n_items,)`` bool, true where the action is allowed (sb3-contrib MaskablePPO)."""
        if self.state is None:
            raise RuntimeError("call reset() before action_masks()")
        return self.state.allowed.copy()

    def render(self) -> str | None:
        if self.render_mode != "ansi":
            gym.logger.warn(f"render() with render_mode={self.render_mode!r} does nothing; "
                            "make the env with render_mode='ansi'")
            return None
        if self.state is None:
            return ""
        return self.core.text(self.state)

    def _info(self) -> dict[str, Any]:
        assert self.state is not None
        return self.core.info(self.state, with_text=self.render_mode == "ansi")
