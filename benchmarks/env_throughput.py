"""Environment-level throughput of the real shipped simulators (``benchmarks/simulator.py --env``):
env steps per second of ``gym.make`` / ``gym.make_vec``, and a simulator ranking 20 candidates in
each of several states in one call."""

from __future__ import annotations

import time

import numpy as np


def env_throughput(
    artifacts: str,
    dtype: str,
    compile: bool,
    steps: int,
    seed: int = 0,
    warmup: int = 128,
    rater: str = "slm",
    sizes: tuple[int, ...] = (1, 16, 64),
) -> dict:
    """Env steps/s of ``make_vec(n)`` for each of ``sizes`` on real artifacts, in the steady
    state: after every user was rated once (the per-user prefix each design caches) and
    ``warmup`` env steps; ``rater="prior"``: the collaborative prior alone, no model tokens."""
    import gymnasium as gym

    import persona_gym  # noqa: F401  (registers the ids)

    out = {}
    for n_envs in sizes:
        env = gym.make_vec(
            "PersonaML100K-v0",
            num_envs=n_envs,
            vectorization_mode="vector_entry_point",
            artifacts=artifacts,
            dtype=dtype,
            compile=compile,
            rater=rater,
        )
        users_model = env.unwrapped.core.rater
        rating_model = getattr(users_model, "model", None)
        # warm-up: every user rated once (what a user costs once per process, its cached prefix,
        # is not a per-step cost), then some steps (kernels, allocator)
        users = list(users_model.user_ids)
        for first in range(0, len(users), 64):
            part = users[first : first + 64]
            users_model.rate(
                part,
                [0] * len(part),
                [users_model.history(u)[-users_model.window_size :] for u in part],
            )
        rng = np.random.default_rng(seed)
        env.reset(seed=seed)
        for _ in range(max(1, warmup // n_envs)):  # warm-up: every persona's kernels compiled
            env.step(_random_actions(env, rng))
        tokens, start = _tokens(rating_model), time.perf_counter()
        n_steps = max(2, steps // n_envs)
        for _ in range(n_steps):
            env.step(_random_actions(env, rng))
        seconds = time.perf_counter() - start
        out[f"make_vec({n_envs})"] = {
            "env_steps_per_s": n_steps * n_envs / seconds,
            "tokens_per_env_step": (_tokens(rating_model) - tokens) / (n_steps * n_envs),
            "seconds": seconds,
        }
        env.close()
        print(
            f"  env {artifacts} ({rater}) make_vec({n_envs}): "
            f"{out[f'make_vec({n_envs})']['env_steps_per_s']:.1f} "
            "env steps/s",
            flush=True,
        )
    return out


def ranking_throughput(
    artifacts: str, dtype: str, compile: bool, states: int = 8, candidates: int = 20, seed: int = 0
) -> dict:
    """Ratings/s of the real simulator scoring ``candidates`` movies in each of ``states`` user
    states in one ``rate`` call (what ``SimulatorGreedyPolicy`` does every step)."""
    from persona_gym.simulator.simulator import UserSimulator

    sim = UserSimulator.load(artifacts, dtype=dtype, compile=compile)
    rng = np.random.default_rng(seed)
    users = [int(u) for u in rng.choice(sim.user_ids, states, replace=False)]
    items = [int(i) for i in rng.choice(len(sim.catalog), candidates, replace=False)]
    calls = (
        [u for u in users for _ in items],
        items * states,
        [sim.history(u)[-3:] for u in users for _ in items],
    )
    sim.rate(*calls)  # warm-up: prefixes cached, kernels ready
    tokens, start = sim.model.tokens_processed, time.perf_counter()
    sim.rate(*calls)
    seconds = time.perf_counter() - start
    n = states * candidates
    print(f"  ranking {artifacts}: {n / seconds:.1f} ratings/s", flush=True)
    return {
        "ratings_per_s": n / seconds,
        "tokens_per_rating": (sim.model.tokens_processed - tokens) / n,
        "candidates_per_state": candidates,
    }


def _tokens(rating_model) -> int:
    """Model tokens processed so far (0 for a rater without a language model)."""
    return rating_model.tokens_processed if rating_model is not None else 0


def _random_actions(env, rng) -> np.ndarray:
    masks = env.unwrapped.action_masks()
    return np.array([rng.choice(np.flatnonzero(m)) for m in masks])
