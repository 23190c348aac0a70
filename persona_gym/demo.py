"""``persona-gym demo``: the main job on the embedded default (ML-100k, SmolLM2-135M), offline.

It loads the shipped ML-100k simulator (the first run regenerates its MovieLens-derived tables
from the bundled dataset, about a minute), then runs one episode of ``PersonaML100K-v0`` with a
random policy over unmasked movies and prints what the simulated user rated, the reward, and the
environment's speed.
"""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the main job on the embedded default (offline)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the episode (user and policy)")
    parser.add_argument("--steps", type=int, default=20, help="steps of the episode")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import gymnasium as gym
    import numpy as np

    import persona_gym  # noqa: F401  (registers the environments)
    from persona_gym.data import load_dataset

    summary = load_dataset("ml-100k").summary()
    print(f"MovieLens-100k: {summary['n_users']} users, {summary['n_items']} items, "
          f"{summary['n_ratings']} ratings")
    started = time.perf_counter()
    env = gym.make("PersonaML100K-v0", max_episode_steps=args.steps)
    _, info = env.reset(seed=args.seed)
    print(f"simulator ready in {time.perf_counter() - started:.1f} s; user {info['user_id']} "
          f"(persona {info['persona']})")
    rng = np.random.default_rng(args.seed)
    total, steps, started = 0.0, 0, time.perf_counter()
    print(f"{'step':>4}  {'movie':<52}{'E[rating]':>10}{'rated':>6}")
    while True:
        action = int(rng.choice(np.flatnonzero(info["action_mask"])))
        _, reward, terminated, truncated, info = env.step(action)
        steps, total = steps + 1, total + reward
        print(f"{steps:>4}  {info['title'][:50]:<52}{info['expected_rating']:>10.2f}"
              f"{info['sampled_rating']:>6.0f}")
        if terminated or truncated:
            break
    seconds = time.perf_counter() - started
    ending = "the user left" if info["left"] else "horizon reached"
    print(f"return {total:.2f} over {steps} steps ({ending}); {steps / seconds:.2f} steps/s")
    return 0
