"""RLlib's PPO on a persona-gym environment: env runners on Ray, each stepping persona-gym's
native vector env (one batched rating call per step for all its sub-envs).

RLlib pins ``gymnasium==1.2.2``, so it lives in its own environment (``make rllib-env`` builds
``.venv-rllib``; the project's own venv keeps a newer Gymnasium). Run::

    make rllib-example                     # = .venv-rllib/bin/python -m agents.rllib_example
    .venv-rllib/bin/python -m agents.rllib_example --env-runners 2 --envs-per-runner 4 --iterations 3

Gymnasium's registry is not used inside Ray workers, so the env is registered with
``ray.tune.registry.register_env``; with ``gym_env_vectorize_mode="vector_entry_point"`` RLlib
asks the creator for ``num_envs`` sub-envs at once, which it answers with
``gym.make_vec(..., vectorization_mode="vector_entry_point")`` (observations flattened for
RLlib's default MLP). Masked actions cost the env's ``repeat_penalty``; RLlib's default model
does not read the action mask.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

ENV_NAME = "persona-gym"


def make_env(context: dict[str, Any]):
    """RLlib's env creator: the native vector env for ``context["num_envs"]`` sub-envs (a single
    env without it), observations flattened."""
    import gymnasium as gym

    import persona_gym  # noqa: F401  (registers the ids in this worker)

    env_id = context.get("env_id", "PersonaML100K-v0")
    kwargs = dict(context.get("env_kwargs", {}))
    if "num_envs" in context:
        vec = gym.make_vec(
            env_id,
            num_envs=int(context["num_envs"]),
            vectorization_mode="vector_entry_point",
            **kwargs,
        )
        return gym.wrappers.vector.FlattenObservation(vec)
    return gym.wrappers.FlattenObservation(gym.make(env_id, **kwargs))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env", default="PersonaML100K-v0", help="registered persona-gym env id")
    parser.add_argument(
        "--artifacts", default=None, help="artifacts directory (default: the env's)"
    )
    parser.add_argument("--env-runners", type=int, default=1, help="Ray env-runner actors")
    parser.add_argument(
        "--envs-per-runner", type=int, default=4, help="sub-envs of each runner's vector env"
    )
    parser.add_argument("--iterations", type=int, default=2, help="PPO training iterations")
    parser.add_argument("--batch", type=int, default=128, help="env steps per iteration")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus", type=int, default=None, help="the local Ray cluster's CPUs")
    args = parser.parse_args(argv)

    import ray
    from ray.rllib.algorithms.ppo import PPOConfig
    from ray.tune.registry import register_env

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    register_env(ENV_NAME, make_env)
    env_kwargs = {"artifacts": args.artifacts} if args.artifacts else {}
    config = (
        PPOConfig()
        .environment(ENV_NAME, env_config={"env_id": args.env, "env_kwargs": env_kwargs})
        .env_runners(
            num_env_runners=args.env_runners,
            num_envs_per_env_runner=args.envs_per_runner,
            gym_env_vectorize_mode="vector_entry_point",
            rollout_fragment_length="auto",
        )
        .training(
            train_batch_size_per_learner=args.batch,
            minibatch_size=min(64, args.batch),
            num_epochs=2,
        )
        .debugging(seed=args.seed)
    )
    algo = config.build_algo()
    try:
        for iteration in range(1, args.iterations + 1):
            t0 = time.perf_counter()
            result = algo.train()
            runners = result.get("env_runners", {})
            print(
                f"iteration {iteration}: {runners.get('num_env_steps_sampled_lifetime', '?')} env steps, "
                f"episode return mean {runners.get('episode_return_mean', float('nan')):.3f}, "
                f"{time.perf_counter() - t0:.1f} s"
            )
    finally:
        algo.stop()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
