"""Gymnasium environments whose users are persona-LoRA small language models.

* :class:`PersonaRecEnv`: the single environment (``gym.make("PersonaML100K-v0")``).
* :class:`PersonaRecVectorEnv`: the native batched form (``gym.make_vec(..., num_envs=N)``).
* :class:`EnvConfig` / :func:`load_env_config`: the settings (``envs_config/*.yaml``).
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
