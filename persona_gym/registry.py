"""What persona-gym names: its registered environment ids and the simulators it knows by name.

One table each; ``import persona_gym`` registers :data:`ENVS` with Gymnasium, the command line
offers them as ``--env`` choices, and an env config's ``artifacts: ml-100k`` resolves through
:data:`SIMULATORS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ENVS",
    "ENV_IDS",
    "SHIPPED_DIR",
    "SIMULATORS",
    "EnvEntry",
    "env_config_name",
    "simulator_dir",
]


@dataclass(frozen=True)
class EnvEntry:
    """One registered environment id.

    Attributes:
        env_id: the Gymnasium id (``gym.make(env_id)``).
        config: the bundled config it reads, ``envs_config/<config>.yaml``.
        dataset: the dataset of its default simulator (names the commands in error messages).
    """

    env_id: str
    config: str
    dataset: str


ENVS: tuple[EnvEntry, ...] = (
    EnvEntry("PersonaML100K-v0", "ml100k", "ml-100k"),
    EnvEntry("PersonaML1M-v0", "ml1m", "ml-1m"),
)
ENV_IDS: tuple[str, ...] = tuple(e.env_id for e in ENVS)

# Where the package keeps the simulators it ships (adapters, manifest and persona cards only:
# the MovieLens-derived tables are regenerated on first use, see persona_gym.artifacts).
SHIPPED_DIR = Path(__file__).parent / "default_artifacts"
MAX_EPISODE_STEPS = 20  # EnvConfig.max_episode_steps's default (read here without loading torch)
# Simulator names an env config's ``artifacts`` may use, and their folder in SHIPPED_DIR. A
# name is shipped when its folder holds a manifest; the others (ML-1M: its licence and size)
# are trained by the user, and naming them gives the commands that do it.
SIMULATORS: dict[str, str] = {"ml-100k": "ml100k", "ml-1m": "ml1m"}


def env_config_name(env_id: str) -> str:
    """The bundled config of a registered env id (``PersonaML100K-v0`` -> ``ml100k``)."""
    for entry in ENVS:
        if entry.env_id == env_id:
            return entry.config
    raise ValueError(f"unknown env id {env_id!r}; choose from {list(ENV_IDS)}")


def simulator_dir(name: str) -> Path:
    """The package folder of a simulator name (``"ml-100k"`` -> ``.../default_artifacts/ml100k``)."""
    return SHIPPED_DIR / SIMULATORS[name]
