"""``persona-gym evaluate-policy``: judge policies in the simulator and on logged held-out data.

**In the simulator** each policy plays ``--episodes`` episodes per seed. Episode ``e`` of seed
``s`` draws its user and every rating/churn draw from ``np.random.default_rng([s, e])`` — the
same users for every policy — and runs the environments' own episode logic
(:class:`persona_gym.envs.core.RecCore`, ``--n-envs`` episodes per simulator call). Per policy,
with a 95% bootstrap interval over all episodes of all seeds (centred on its estimate:
``persona_gym.evaluation.policy.bootstrap_ci``):

* ``return``          sum of rewards (the env's reward: expected rating by default);
* ``mean_rating``     mean expected rating of the recommended movies;
* ``share_ge4``       share of ratings the user gave (sampled) that are >= 4;
* ``churn``           share of episodes the user left;
* ``coverage``        distinct recommended movies / catalogue size;
* ``diversity``       intra-episode genre diversity (mean pairwise 1 - Jaccard);
* ``novelty``         mean self-information -log2(share of users who rated the movie).

**On logged data** (the protocol's test interactions, never seen in training): each user's state
after their logged training history (the env's reset state), the policy's top ``k``:

* ``hit_rate``, ``ndcg``   HR@k (a test movie in the top k) and binary NDCG@k vs the test movies;
* ``hit_rating``           mean real rating of the hits;
* ``replay``               top-k replay (Li et al., 2011, with a top-k acceptance): walk each
  user's test interactions in time order; an interaction whose movie is in the policy's current
  top k is accepted — its real rating counts and it joins the user's history (the policy's next
  observation) — else skipped. The estimate is the mean accepted rating (``replay_accepted``
  interactions).

**Paired differences**: every policy meets the same users, so each pair of policies is compared
episode by episode: the mean of the per-episode difference in return and in mean rating, with
its bootstrap interval; a pair whose interval contains 0 is *not distinguishable*.

**Gap closed** (with ``random`` and ``simulator-greedy`` among the policies): ``(policy - random)
/ (simulator-greedy - random)`` of mean return and mean rating.

Every interval is clipped to its metric's range (``persona_gym.evaluation.policy.METRIC_BOUNDS``: a share
within 0..1, a rating within 1..5).

**Agreement** (with at least 4 policies evaluated on logged data): Kendall's tau / Spearman's
rho between the policies' simulator ordering (mean rating) and their logged ordering (NDCG@k,
replay): do simulator wins carry to logged data?

**On Ray** (``--ray-workers N``, ``pip install 'persona-gym[ray]'``): the episodes of each
(policy, seed) are cut into contiguous chunks of whole ``--n-envs`` batches, played by ``N`` Ray
actors that each hold their own simulator, and merged back in order: the results are those of
the single-process run with the same seeds (:mod:`agents.ray_eval`).

The policy names are checked before anything loads. One progress line per policy and seed goes
to stderr. Writes ``results.json``, ``report.md`` and ``policies.png`` (bars with intervals) to
``--out``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack, closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from agents.policies import BASELINES, Batch, MFPolicy, Policy, make_policy
from persona_gym.config_cli import add_config_arguments, config_from_args, plain
from persona_gym.envs.config import add_env_kwargs_argument, parse_env_kwargs
from persona_gym.envs.core import EpisodeState, RecCore
from persona_gym.evaluation.metrics import ndcg_hit_at_k
from persona_gym.evaluation.policy import (
    METRIC_BOUNDS,
    MIN_AGREEMENT_POLICIES,
    bootstrap_ci,
    intra_list_diversity,
    novelty,
    rank_agreement,
)
from persona_gym.evaluation.policy_report import format_table, write_report
from persona_gym.registry import ENV_IDS, env_config_name
from persona_gym.simulator.rater import Rater

log = logging.getLogger(__name__)

__all__ = [
    "PolicyEvalConfig",
    "check_policy_names",
    "evaluate_logged",
    "evaluate_policies",
    "load_evaluation",
    "gap_closed",
    "make_batch",
    "paired_differences",
    "simulate",
    "summarize_episodes",
]


def make_batch(core: RecCore, states: list[EpisodeState]) -> Batch:
    """The policy's view of some episodes: stacked observations, masks, users, states."""
    return Batch(
        core.observations(states),
        np.stack([s.allowed for s in states]),
        np.array([s.user_id for s in states], dtype=np.int64),
        states,
    )


# -- in the simulator ---------------------------------------------------------------------------
def simulate(
    policy: Policy, core: RecCore, episodes: int, seed: int, n_envs: int = 16, first: int = 0
) -> list[dict]:
    """Play episodes ``first..episodes-1`` of ``seed`` (see module docstring); one record per
    episode.

    Episodes run in batches of ``n_envs`` starting at ``first``, ``first + n_envs``, ...; the
    batch starting at episode ``b`` reseeds the policy with ``seed * 1_000_003 + b`` and episode
    ``e`` draws from ``np.random.default_rng([seed, e])``. A batch's outcome therefore depends
    only on ``seed`` and its episodes, not on what the process ran before: a call whose
    ``first`` is a multiple of ``n_envs`` plays those episodes exactly as the call from 0 does
    (how ``--ray-workers`` splits the work)."""
    if not 0 <= first <= episodes:
        raise ValueError(f"simulate: first episode {first} outside 0..{episodes}")
    records = []
    for start in range(first, episodes, n_envs):
        ids = list(range(start, min(start + n_envs, episodes)))
        rngs = [np.random.default_rng([seed, e]) for e in ids]
        states = [core.new_episode(rng, None) for rng in rngs]
        policy.seed(seed * 1_000_003 + start)
        recs: list[dict[str, Any]] = [
            {
                "seed": seed,
                "episode": e,
                "user_id": s.user_id,
                "persona": s.persona,
                "return": 0.0,
                "items": [],
                "expected": [],
                "sampled": [],
                "masked": 0,
                "left": False,
            }
            for e, s in zip(ids, states, strict=True)
        ]
        active = list(range(len(states)))
        while active:
            actions = policy.act(make_batch(core, [states[i] for i in active]))
            results = core.step(
                [states[i] for i in active], list(actions), [rngs[i] for i in active]
            )
            still = []
            for i, action, result in zip(active, actions, results, strict=True):
                rec, last = recs[i], states[i].last
                rec["return"] += result.reward
                if last["masked"]:
                    rec["masked"] += 1
                else:
                    rec["items"].append(int(action))
                    rec["expected"].append(last["expected"])
                    rec["sampled"].append(last["sampled"])
                if result.terminated or result.truncated or core.at_horizon(states[i]):
                    rec["left"] = bool(states[i].left)
                else:
                    still.append(i)
            active = still
        records += recs
    return records


def summarize_episodes(records: list[dict], core: RecCore, n_users: int, seed: int = 0) -> dict:
    """Each simulator metric with its bootstrap interval over the episodes."""
    genres = core.catalog.genres
    per_episode = {
        "return": np.array([r["return"] for r in records]),
        "mean_rating": np.array(
            [np.mean(r["expected"]) if r["expected"] else np.nan for r in records]
        ),
        "share_ge4": np.array(
            [np.mean(np.array(r["sampled"]) >= 4) if r["sampled"] else np.nan for r in records]
        ),
        "churn": np.array([float(r["left"]) for r in records]),
        "diversity": np.array(
            [intra_list_diversity([genres[i] for i in r["items"]]) for r in records]
        ),
        "novelty": np.array(
            [novelty(r["items"], core.catalog.n_ratings, n_users) for r in records]
        ),
    }
    out: dict[str, Any] = {}
    for name, values in per_episode.items():
        out[name] = _ci(len(records), lambda idx, v=values: float(np.nanmean(v[idx])), seed, name)
    items = [set(r["items"]) for r in records]
    out["coverage"] = _ci(
        len(records),
        lambda idx: len(set().union(*(items[i] for i in idx))) / core.n_items,
        seed,
        "coverage",
    )
    out["episodes"] = len(records)
    return out


def gap_closed(
    entries: dict[str, dict], low: str = "random", high: str = "simulator-greedy"
) -> dict:
    """``(policy - random) / (simulator-greedy - random)`` of each policy's mean return and mean
    rating: the share of the gap to the myopic oracle a policy closes (empty without both)."""
    if low not in entries or high not in entries:
        return {}
    out = {}
    for metric in ("return", "mean_rating"):
        lo, hi = (entries[n]["simulator"][metric]["mean"] for n in (low, high))
        if hi != lo:
            out[metric] = {
                n: (e["simulator"][metric]["mean"] - lo) / (hi - lo) for n, e in entries.items()
            }
    return out


def paired_differences(per_episode: dict[str, list[dict]], seed: int = 0) -> list[dict]:
    """For each pair of policies (in the given order) and for ``return`` and ``mean_rating``:
    the mean over episodes of ``a - b`` on the same (seed, episode), i.e. the same user and
    draws, its bootstrap interval and whether the interval excludes 0."""
    names = list(per_episode)
    for name in names[1:]:
        keys = [(r["seed"], r["episode"], r["user_id"]) for r in per_episode[name]]
        if keys != [(r["seed"], r["episode"], r["user_id"]) for r in per_episode[names[0]]]:
            raise ValueError(
                f"policies {names[0]!r} and {name!r} met different episodes; "
                "paired differences need the same seeds and episodes"
            )

    def values(name: str, metric: str) -> np.ndarray:
        if metric == "return":
            return np.array([r["return"] for r in per_episode[name]])
        return np.array(
            [np.mean(r["expected"]) if r["expected"] else np.nan for r in per_episode[name]]
        )

    out = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for metric in ("return", "mean_rating"):
                diff = values(a, metric) - values(b, metric)
                ci = _ci(
                    len(diff),
                    lambda idx, d=diff: float(np.nanmean(d[idx])),
                    seed,
                    bounds=_difference_bounds(metric),
                )
                out.append(
                    {
                        "a": a,
                        "b": b,
                        "metric": metric,
                        **ci,
                        "distinguishable": bool(ci["low"] > 0 or ci["high"] < 0),
                    }
                )
    return out


def _difference_bounds(metric: str) -> tuple[float, float] | None:
    """The range of a difference of two values of ``metric`` (``None``: unbounded)."""
    if metric not in METRIC_BOUNDS:
        return None
    low, high = METRIC_BOUNDS[metric]
    return low - high, high - low


def _ci(
    n: int,
    statistic,
    seed: int,
    metric: str | None = None,
    bounds: tuple[float, float] | None = None,
) -> dict:
    """The value and its bootstrap interval, clipped to ``bounds`` or to ``metric``'s range."""
    if bounds is None and metric is not None:
        bounds = METRIC_BOUNDS.get(metric)
    value, low, high = bootstrap_ci(n, statistic, seed=seed, bounds=bounds)
    return {"mean": value, "low": low, "high": high}


# -- on logged data -------------------------------------------------------------------------------
def top_k(scores: np.ndarray, k: int) -> list[list[int]]:
    """Per row of ``(n, n_items)`` scores, the indices of its ``k`` best finite scores, best
    first (ties to the lower index)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[int(i) for i in row if np.isfinite(scores[r, i])] for r, row in enumerate(order)]


def evaluate_logged(
    policy: Policy, core: RecCore, test: pd.DataFrame, k: int = 10, seed: int = 0
) -> dict:
    """HR@k, NDCG@k, mean rating of hits and the top-k replay estimate (module docstring).

    ``test``: ``user_id, item_index, rating, timestamp`` rows of the simulator's users.
    """
    unknown = sorted(set(test["user_id"]) - set(core.user_ids))
    if unknown:
        raise ValueError(f"test interactions of users the simulator does not have: {unknown[:5]}")
    users = sorted(set(test["user_id"]))
    if not users:
        raise ValueError("no test interactions to evaluate on")
    policy.seed(seed)
    events = {
        u: g.sort_values(["timestamp", "item_index"], kind="stable")
        for u, g in test.groupby("user_id")
    }
    rng = np.random.default_rng(seed)  # unused by new_episode with a user id; required by its API
    states = [core.new_episode(rng, {"user_id": u}) for u in users]
    ranked = top_k(policy.scores(make_batch(core, states)), k)
    ndcgs, hits, hit_ratings = [], [], []
    for user, top in zip(users, ranked, strict=True):
        g = events[user]
        value, n_hits = ndcg_hit_at_k(top, g["item_index"], k)
        ndcgs.append(value)
        hits.append(float(n_hits > 0))
        rating_of = dict(zip(g["item_index"].astype(int), g["rating"].astype(float), strict=True))
        hit_ratings.append([rating_of[i] for i in top if i in rating_of])

    accepted: list[list[float]] = [[] for _ in users]
    sequences = [
        list(
            zip(
                events[u]["item_index"].astype(int),
                events[u]["rating"].astype(float),
                events[u]["timestamp"].astype(int),
                strict=True,
            )
        )
        for u in users
    ]
    for t in range(max(len(s) for s in sequences)):
        rows = [r for r, s in enumerate(sequences) if t < len(s)]
        tops = top_k(policy.scores(make_batch(core, [states[r] for r in rows])), k)
        for r, top in zip(rows, tops, strict=True):
            item, rating, stamp = sequences[r][t]
            if item in top:
                states[r].record(item, rating, stamp)
                accepted[r].append(rating)

    n = len(users)
    ndcg_of, hit_of = np.array(ndcgs), np.array(hits)
    flat_hits = [x for h in hit_ratings for x in h]
    flat_accepted = [x for a in accepted for x in a]
    return {
        "users": n,
        "k": k,
        "hit_rate": _ci(n, lambda idx: float(hit_of[idx].mean()), seed, "hit_rate"),
        "ndcg": _ci(n, lambda idx: float(ndcg_of[idx].mean()), seed, "ndcg"),
        "hit_rating": _ci(
            n, lambda idx: _pooled_mean([hit_ratings[i] for i in idx]), seed, "hit_rating"
        )
        if flat_hits
        else None,
        "replay": _ci(n, lambda idx: _pooled_mean([accepted[i] for i in idx]), seed, "replay")
        if flat_accepted
        else None,
        "replay_accepted": len(flat_accepted),
        "test_interactions": int(sum(len(s) for s in sequences)),
    }


def _pooled_mean(groups: list[list[float]]) -> float:
    values = [x for g in groups for x in g]
    return float(np.mean(values)) if values else float("nan")


# -- all together -------------------------------------------------------------------------------
@dataclass
class PolicyEvalConfig:
    """Settings of :func:`evaluate_policies`.

    Attributes:
        episodes: simulator episodes per seed and policy.
        seeds: simulator seeds (each gives the same users to every policy).
        n_envs: episodes stepped together (one simulator call per step; train-agent's
            ``--n-envs``).
        k: cut-off of HR / NDCG / replay.
        logged: also evaluate on the logged test interactions.
        ray_workers: play the simulator episodes on this many Ray actors, each with its own
            simulator (``pip install 'persona-gym[ray]'``; a local Ray instance unless
            ``RAY_ADDRESS`` is set); the same results as without. How, not what: not recorded
            in ``results.json``. ``None``: in this process.
    """

    episodes: int = 32
    seeds: tuple[int, ...] = (0,)
    n_envs: int = 16
    k: int = 10
    logged: bool = True
    ray_workers: int | None = None

    def __post_init__(self) -> None:
        from persona_gym.errors import ConfigError

        for name in ("episodes", "n_envs", "k"):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"PolicyEvalConfig.{name} (--{name.replace('_', '-')}) must be >= 1, got {getattr(self, name)}"
                )
        if not self.seeds:
            raise ConfigError("PolicyEvalConfig.seeds (--seeds) must name at least one seed")
        if self.ray_workers is not None:
            from agents.ray_eval import RAY_MISSING, ray_available

            if self.ray_workers < 1:
                raise ConfigError(
                    f"PolicyEvalConfig.ray_workers (--ray-workers) must be >= 1, got {self.ray_workers}"
                )
            if not ray_available():
                raise ConfigError(f"PolicyEvalConfig.ray_workers (--ray-workers): {RAY_MISSING}")


def evaluate_policies(
    core: RecCore,
    policies: dict[str, Policy],
    config: PolicyEvalConfig,
    test: pd.DataFrame | None,
    n_users: int,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Simulator and logged metrics of each policy, and the agreement of their orderings (with
    at least :data:`persona_gym.evaluation.policy.MIN_AGREEMENT_POLICIES` policies evaluated on logged data).

    ``progress``: called with one line per policy and seed as their episodes finish (with Ray:
    per policy, all seeds), and per policy when its logged evaluation is done.

    With ``config.ray_workers`` the simulator episodes run on Ray actors (:mod:`agents.ray_eval`;
    a Ray session for the call unless one is open) and ``seconds`` is each policy's wall time
    from the previous one's end (the actors work on the next policies meanwhile)."""
    say = progress or (lambda line: None)
    settings = {k: v for k, v in vars(config).items() if k != "ray_workers"}
    results: dict[str, Any] = {"policies": {}, "config": settings | {"seeds": list(config.seeds)}}
    per_episode: dict[str, list[dict]] = {}
    with ExitStack() as stack:
        if config.ray_workers is None:
            played: Iterable[tuple[str, list[dict]]] = (
                (name, _play_seeds(name, policy, core, config, say))
                for name, policy in policies.items()
            )
        else:
            from agents.ray_eval import ray_session, simulate_on_ray

            stack.enter_context(ray_session(config.ray_workers))
            played = stack.enter_context(
                closing(
                    simulate_on_ray(
                        core,
                        policies,
                        config.seeds,
                        config.episodes,
                        config.n_envs,
                        config.ray_workers,
                    )
                )
            )
        started = time.perf_counter()
        for name, records in played:
            if config.ray_workers is not None:
                say(_progress_line(name, f"seeds {list(config.seeds)}", records, started))
            _summarize_policy(
                name, policies[name], records, core, config, test, n_users, started, results
            )
            if "logged" in results["policies"][name]:
                logged = results["policies"][name]["logged"]
                say(
                    f"{name}: logged test interactions of {logged['users']} users, "
                    f"NDCG@{logged['k']} {logged['ndcg']['mean']:.3f}"
                )
            per_episode[name] = records
            started = time.perf_counter()
    results["differences"] = paired_differences(per_episode)
    results["gap_closed"] = gap_closed(results["policies"])
    names = [n for n in policies if "logged" in results["policies"][n]]
    if len(names) >= MIN_AGREEMENT_POLICIES:
        sim = [results["policies"][n]["simulator"]["mean_rating"]["mean"] for n in names]
        agreement = {}
        for metric in ("ndcg", "replay"):
            logged = [
                (results["policies"][n]["logged"][metric] or {"mean": np.nan})["mean"]
                for n in names
            ]
            if not np.isnan(logged).any():
                agreement[f"mean_rating_vs_{metric}"] = rank_agreement(sim, logged)
        results["agreement"] = agreement
    return results


def _mean_rating(records: list[dict]) -> float:
    """The mean over episodes of each episode's mean expected rating (NaN: nothing rated)."""
    means = [np.mean(r["expected"]) for r in records if r["expected"]]
    return float(np.mean(means)) if means else float("nan")


def _progress_line(name: str, what: str, records: list[dict], started: float) -> str:
    return (
        f"{name} {what}: {len(records)} episodes, mean rating {_mean_rating(records):.3f} "
        f"({time.perf_counter() - started:.0f} s)"
    )


def _play_seeds(
    name: str, policy: Policy, core: RecCore, config: PolicyEvalConfig, say: Callable[[str], None]
) -> list[dict]:
    """Every seed's episodes of one policy, in this process, with a progress line per seed."""
    records: list[dict] = []
    for seed in config.seeds:
        started = time.perf_counter()
        played = simulate(policy, core, config.episodes, seed, config.n_envs)
        say(_progress_line(name, f"seed {seed}", played, started))
        records += played
    return records


def _summarize_policy(
    name: str,
    policy: Policy,
    records: list[dict],
    core: RecCore,
    config: PolicyEvalConfig,
    test: pd.DataFrame | None,
    n_users: int,
    started: float,
    results: dict[str, Any],
) -> None:
    entry: dict[str, Any] = {"simulator": summarize_episodes(records, core, n_users, seed=0)}
    if config.logged and test is not None and policy.logged_eval:
        entry["logged"] = evaluate_logged(policy, core, test, config.k)
    entry["seconds"] = round(time.perf_counter() - started, 1)
    results["policies"][name] = entry
    log.info(
        "%s: mean rating %.3f (%.1f s)",
        name,
        entry["simulator"]["mean_rating"]["mean"],
        entry["seconds"],
    )


def check_policy_names(names: Sequence[str]) -> None:
    """Refuse, in one line and before anything loads, a policy name that is neither a baseline,
    ``agent`` nor an existing run folder / ``model.zip``."""
    from persona_gym.errors import ConfigError

    known = (*BASELINES, "agent")
    for name in names:
        if name not in known and not Path(name).exists():
            raise ConfigError(
                f"--policies: unknown policy {name!r}; choose from {', '.join(known)} or give a "
                "run folder / model.zip written by `persona-gym train-agent`"
            )


def load_evaluation(
    env_id: str, dtype: str = "auto", rater: Rater | str | None = None, **overrides: Any
) -> tuple[RecCore, pd.DataFrame, pd.DataFrame, int]:  # pragma: no mutate block
    """``(core, ratings, test, n_users)``: the env's episode logic on its shipped or configured
    simulator (or ``rater``: a Rater, or a name of ``EnvConfig.rater`` such as ``"prior"``), the
    train + background ratings the baselines fit on, the logged test interactions of the
    simulator's users (the protocol split rebuilt from the artifacts' ``split.json``), and the
    number of users in the dataset (for novelty)."""
    from persona_gym.artifacts import load_artifacts, resolve_artifacts
    from persona_gym.data.protocol import logged_data
    from persona_gym.envs.config import load_env_config
    from persona_gym.simulator.cf_models import fit_frame

    if isinstance(rater, str):  # `--env-kwargs rater=prior`: the env config's field
        overrides["rater"], rater = rater, None
    config = load_env_config(env_config_name(env_id), dtype=dtype, **overrides)
    core = RecCore(config, rater)
    data = logged_data(load_artifacts(resolve_artifacts(config.artifacts, dataset=config.dataset)))
    ratings = fit_frame(data.train, data.background)
    return core, ratings, data.test, int(ratings["user_id"].nunique())


def add_parser(subparsers: argparse._SubParsersAction) -> None:  # pragma: no mutate block
    parser = subparsers.add_parser(
        "evaluate-policy",
        help="judge policies in the simulator and on logged data",
        description=plain(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--env",
        dest="env_id",
        default="PersonaML100K-v0",
        choices=ENV_IDS,
        help="registered environment id (default: PersonaML100K-v0)",
    )
    parser.add_argument(
        "--policies",
        nargs="+",
        default=["random", "most-popular", "item-mean", "mf", "agent"],
        help=f"baselines {list(BASELINES)}, 'agent' (the shipped agent) and/or run folders / "
        "model.zip of train-agent (default: random most-popular item-mean mf agent)",
    )
    add_config_arguments(parser, PolicyEvalConfig)
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="the simulator's dtype (auto: bfloat16 where the CPU has AMX/AVX512-BF16 "
        "or on CUDA, float32 elsewhere) (default: auto)",
    )
    parser.add_argument(
        "--artifacts", help="simulator artifacts (default: the env config's, the shipped one)"
    )
    add_env_kwargs_argument(parser)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/policy-eval"),
        help="folder that receives results.json, report.md and policies.png "
        "(default: runs/policy-eval)",
    )
    parser.set_defaults(func=run)


def _say(line: str) -> None:
    """A progress line of the command, on stderr."""
    print(f"evaluate-policy: {line}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:  # pragma: no mutate block
    from persona_gym.errors import ConfigError

    config = config_from_args(PolicyEvalConfig, args)
    check_policy_names(args.policies)
    overrides = parse_env_kwargs(args.env_kwargs)
    if args.artifacts:
        overrides["artifacts"] = args.artifacts
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(
            f"--out {args.out} is a file; --out names the folder that receives "
            "results.json, report.md and policies.png"
        )
    created = not args.out.exists()
    args.out.mkdir(
        parents=True, exist_ok=True
    )  # a permission problem shows now, not after the work
    try:
        results = _evaluate(args, config, overrides)
    except BaseException:  # a failure or Ctrl-C leaves no empty --out behind
        if created and args.out.is_dir() and not any(args.out.iterdir()):
            args.out.rmdir()
        raise
    settings = "".join(f", {k}={v}" for k, v in overrides.items())
    results["env"] = {"id": args.env_id, "dtype": args.dtype, **overrides}
    report = write_report(
        results,
        args.out,
        f"Environment `{args.env_id}`{settings}; {args.episodes} episodes "
        f"x seeds {list(args.seeds)}; logged k={args.k}.",
    )
    print(format_table(results))
    print(f"report: {report}")
    return 0


def _evaluate(
    args: argparse.Namespace, config: PolicyEvalConfig, overrides: dict[str, Any]
) -> dict[str, Any]:  # pragma: no mutate block
    """Load the simulator and the logged data, make the policies, evaluate them."""
    _say(f"loading the {args.env_id} simulator and its logged data")
    core, ratings, test, n_users = load_evaluation(args.env_id, args.dtype, **overrides)
    policies: dict[str, Policy] = {}
    mf: MFPolicy | None = None
    for name in args.policies:
        policy = make_policy(name, core, ratings, mf=mf)
        if isinstance(policy, MFPolicy):  # simulator-greedy ranks MF's top: one MF fit
            mf = policy
        key = policy.name
        while key in policies:  # two runs with the same algorithm, seed and length
            key += "'"
        policies[key] = policy
    _say(
        f"{len(policies)} policies x {len(config.seeds)} seeds x {config.episodes} episodes"
        + (", then the logged test interactions" if config.logged else "")
    )
    return evaluate_policies(
        core, policies, config, test if config.logged else None, n_users, progress=_say
    )
