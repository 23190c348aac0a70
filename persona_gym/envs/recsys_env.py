"""``PersonaRecEnv``: one simulated user per episode rates the movies the agent recommends.

Registered as ``PersonaML100K-v0`` and ``PersonaML1M-v0`` (``import persona_gym``). Its class
docstring is the environments' contract; the rules are implemented once, in
:class:`persona_gym.envs.core.RecCore`, shared with :class:`persona_gym.envs.PersonaRecVectorEnv`.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

from persona_gym.envs.config import EnvConfig, load_env_config
from persona_gym.envs.core import EpisodeState, RecCore
from persona_gym.rater import Rater

__all__ = ["ActType", "ObsType", "PersonaRecEnv"]


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
    rating rule is the :class:`~persona_gym.rater.Rater`'s; everything else is the env's.

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
    * ``truncated``: every item is masked (nothing left to recommend), or the horizon
      ``max_episode_steps`` (applied by ``gym.make``'s ``TimeLimit``).

    After ``terminated`` or ``truncated`` from the env itself, ``step`` raises
    ``gymnasium.error.ResetNeeded`` until ``reset``. A ``TimeLimit`` truncation happens in the
    wrapper, which does not refuse further steps; the env then keeps the episode going.

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
    | ``render_mode`` | ``None``    | ``"ansi"``: ``render()`` returns the text view; other     |
    |                 |             | modes warn and ``render()`` returns None                  |
    | ``rater``       | ``None``    | a :class:`~persona_gym.rater.Rater` to use instead of     |
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
        rater: Rater | None = None,
        **overrides: Any,
    ):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            # Like Gymnasium's own envs, an unsupported mode is not fatal (SB3's make_vec_env
            # asks for "rgb_array" by default): warn, and render() returns None.
            gym.logger.warn(
                f"render_mode {render_mode!r} is not supported; choose from "
                f"{self.metadata['render_modes']} or None; render() will return None"
            )
        self.config = load_env_config(config, **overrides)
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
        self._ended = bool(result.terminated or result.truncated)
        return (
            self.core.observation(self.state),
            float(result.reward),
            result.terminated,
            result.truncated,
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
                f"render() with render_mode={self.render_mode!r} does nothing; "
                "make the env with render_mode='ansi'"
            )
            return None
        if self.state is None:
            return ""
        return self.core.text(self.state)

    def _info(self) -> dict[str, Any]:
        assert self.state is not None
        return self.core.info(self.state, with_text=self.render_mode == "ansi")
