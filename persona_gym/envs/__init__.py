"""Gymnasium environments whose users are persona-LoRA small language models.

* :class:`PersonaRecEnv`: the single environment (``gym.make("PersonaML100K-v0")``).
* :class:`PersonaRecVectorEnv`: the native batched form (``gym.make_vec(..., num_envs=N)``).
* :class:`EnvConfig` / :func:`load_env_config`: the settings (``envs_config/*.yaml``).

Example::

    import gymnasium as gym
    import persona_gym  # registers PersonaML100K-v0 and PersonaML1M-v0

    env = gym.make("PersonaML100K-v0", artifacts="path/to/artifacts", device="cpu")
    obs, info = env.reset(seed=0)                      # or options={"user_id": 42}
    action = env.action_space.sample(mask=info["action_mask"].astype("int8"))
    obs, reward, terminated, truncated, info = env.step(action)

    vec = gym.make_vec("PersonaML100K-v0", num_envs=16)  # native: one model call per step

SB3: ``MultiInputPolicy`` reads the Dict observation; sb3-contrib's ``MaskablePPO`` calls
``env.action_masks()``; ``gymnasium.wrappers.FlattenObservation`` gives one ``Box`` for
``MlpPolicy``.
"""

from persona_gym.envs.config import EnvConfig, load_env_config
from persona_gym.envs.core import EpisodeState, RecCore, clear_simulator_cache, get_simulator
from persona_gym.envs.recsys_env import PersonaRecEnv
from persona_gym.envs.vector_env import PersonaRecVectorEnv

__all__ = [
    "EnvConfig",
    "EpisodeState",
    "PersonaRecEnv",
    "PersonaRecVectorEnv",
    "RecCore",
    "clear_simulator_cache",
    "get_simulator",
    "load_env_config",
]
