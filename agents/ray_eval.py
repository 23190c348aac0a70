"""``evaluate-policy --ray-workers N``: the simulator episodes spread over Ray actors.

`Ray <https://docs.ray.io>`_ core only (``ray.init``, ``@ray.remote`` actors), no RLlib; an
optional dependency: ``pip install 'persona-gym[ray]'``.

Each of the ``N`` actors holds its own simulator: it receives the driver's
:class:`~persona_gym.envs.core.RecCore` pickled, i.e. its :class:`~persona_gym.envs.config.EnvConfig`
(the env id's config with ``--env-kwargs``, ``--artifacts`` and ``--dtype`` applied) and an
injected rater if there is one, and rebuilds it in its own process (the SLM simulator is
loaded there, never pickled). Policies are pickled to the actors with every reference to the
driver's core (or its rater) replaced by the actor's own (the simulator-greedy policy rates with
the actor's simulator).

The episodes of each (policy, seed) are cut into contiguous chunks of whole ``--n-envs`` batches
(``episodes 0..n_envs-1``, ``n_envs..2*n_envs-1``, ...), at most one chunk per actor, and the
chunks go to the actors in turn. A batch holds the same episodes as in the single-process run
and :func:`agents.evaluate.simulate` seeds every episode from ``(seed, episode)`` and the policy
from ``(seed, first episode of the batch)``, so each chunk replays exactly what the
single-process run plays for those episodes; the records are merged back in episode order and
everything computed from them (summaries, paired differences, gap closed) is the same. With the
table rater this is exact; with the SLM simulator the sampled ratings and churn are the same but
expected ratings may differ by ~1e-5 (each process encodes user prefixes in its own bf16 batches,
``benchmarks/README.md``, "Ray"). With
fewer batches than actors some actors stay idle: lower ``--n-envs`` to use them all.

The driver starts a local Ray instance with ``num_cpus=N`` (no dashboard) and shuts it down
after, unless ``RAY_ADDRESS`` names a cluster to join (every node then needs persona-gym and its
simulator artifacts installed) or Ray is already initialised in the process (left running).
Each actor reserves one CPU (a share where the cluster has fewer than ``N``) and uses
``max(1, cores // N)`` torch threads.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import pickle
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from agents.policies import Policy
from persona_gym.envs.core import RecCore

log = logging.getLogger(__name__)

__all__ = ["RAY_MISSING", "chunks", "ray_available", "ray_session", "simulate_on_ray"]

RAY_MISSING = "Ray is not installed: pip install 'persona-gym[ray]'"


def ray_available() -> bool:
    """Whether ``import ray`` would find Ray (without importing it)."""
    return importlib.util.find_spec("ray") is not None


def chunks(episodes: int, n_envs: int, workers: int) -> list[tuple[int, int]]:
    """``[(first, end), ...]``: episodes ``0..episodes-1`` cut into at most ``workers``
    contiguous chunks of whole ``n_envs`` batches (the last batch may be short), as even as
    possible (their batch counts differ by at most one), in order."""
    batches = -(-episodes // n_envs)
    parts = min(workers, batches)
    out, batch = [], 0
    for i in range(parts):
        size = batches // parts + (i < batches % parts)
        out.append((batch * n_envs, min((batch + size) * n_envs, episodes)))
        batch += size
    return out


@contextmanager
def ray_session(workers: int) -> Iterator[None]:
    """Ray for the block: already initialised (left running), the cluster of ``RAY_ADDRESS``,
    or a local instance with ``workers`` CPUs and no dashboard (shut down after)."""
    if not ray_available():
        raise ImportError(RAY_MISSING)
    import ray

    if ray.is_initialized():
        yield
        return
    address = os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


# -- pickling policies without the driver's simulator ----------------------------------------------
def _dump_policy(policy: Policy, core: RecCore) -> bytes:
    """``policy`` pickled (cloudpickle: local classes too) with the driver's core and rater as
    references that :func:`_load_policy` resolves to the actor's."""
    from ray import cloudpickle

    refs = {id(core): "core", id(core.rater): "rater"}

    class _Pickler(cloudpickle.Pickler):
        def persistent_id(self, obj: Any) -> str | None:
            return refs.get(id(obj))

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(policy)
    return buffer.getvalue()


class _CoreUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, core: RecCore):
        super().__init__(file)
        self.objects = {"core": core, "rater": core.rater}

    def persistent_load(self, pid: Any) -> Any:
        return self.objects[pid]


def _load_policy(blob: bytes, core: RecCore) -> Policy:
    policy: Policy = _CoreUnpickler(io.BytesIO(blob), core).load()
    return policy


class _Worker:
    """A Ray actor: its own simulator (the driver's core rebuilt here) and ``threads`` torch
    threads; plays chunks of episodes."""

    def __init__(self, core: RecCore, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.core = (
            core  # unpickled by Ray in this process: RecCore.__setstate__ loads the simulator
        )

    def simulate(self, blob: bytes, seed: int, first: int, end: int, n_envs: int) -> list[dict]:
        from agents.evaluate import simulate

        return simulate(_load_policy(blob, self.core), self.core, end, seed, n_envs, first=first)


def simulate_on_ray(
    core: RecCore,
    policies: dict[str, Policy],
    seeds: Sequence[int],
    episodes: int,
    n_envs: int,
    workers: int,
) -> Generator[tuple[str, list[dict]], None, None]:
    """``(name, records)`` per policy, in order: what ``simulate`` gives for each seed in
    ``seeds``, concatenated, played by ``workers`` Ray actors (module docstring). Every chunk is
    submitted at once; a policy is yielded as soon as its chunks are back. Needs a Ray session
    (:func:`ray_session`)."""
    import ray

    threads = max(1, (os.cpu_count() or 1) // workers)
    # one CPU each, or a share of a smaller cluster's (N actors of 1 CPU on fewer would wait forever)
    cpus = min(1.0, float(ray.cluster_resources().get("CPU", 1.0)) / workers)
    actor = ray.remote(num_cpus=cpus)(_Worker)
    core_ref = ray.put(core)
    pool: list[Any] = [actor.remote(core_ref, threads) for _ in range(workers)]
    parts = chunks(episodes, n_envs, workers)
    log.info(
        "%d Ray workers, %d torch thread(s) each; episodes per seed in chunks %s",
        workers,
        threads,
        parts,
    )
    pending: list[tuple[str, list[Any]]] = []
    turn = 0
    for name, policy in policies.items():
        blob = ray.put(_dump_policy(policy, core))
        refs = []
        for seed in seeds:
            for first, end in parts:
                refs.append(
                    pool[turn % workers].simulate.remote(blob, int(seed), first, end, n_envs)
                )
                turn += 1
        pending.append((name, refs))
    try:
        for name, refs in pending:
            yield name, [record for part in ray.get(refs) for record in part]
    finally:
        for worker in pool:
            ray.kill(worker)
