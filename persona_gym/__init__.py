"""persona-gym: recommender-system environments whose users are persona-LoRA small language models.

``import persona_gym`` registers the environments of :data:`persona_gym.registry.ENVS`
(``PersonaML100K-v0``, ``PersonaML1M-v0``).
"""

__version__ = "0.1.0"


def _register_envs() -> None:
    """Register the environment ids with Gymnasium (string entry points: torch is not imported).

    Kwargs are plain data: the config name; ``gym.make(id, artifacts=..., device=...)``
    overrides single fields. ``nondeterministic=False``: every random draw comes from the env's
    ``np_random`` and the rating model is deterministic on CPU (on GPU, batched kernels may
    differ in the last bits between machines).
    """
    import gymnasium

    from envs_config import read_config
    from persona_gym.registry import ENVS, MAX_EPISODE_STEPS

    for entry in ENVS:
        if entry.env_id in gymnasium.registry:
            continue
        gymnasium.register(
            id=entry.env_id,
            entry_point="persona_gym.envs:PersonaRecEnv",
            vector_entry_point="persona_gym.envs:PersonaRecVectorEnv",
            max_episode_steps=int(
                read_config(entry.config)[0].get("max_episode_steps", MAX_EPISODE_STEPS)
            ),
            nondeterministic=False,
            kwargs={"config": entry.config},
        )


_register_envs()
