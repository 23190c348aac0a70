"""``persona-gym demo``: the main job on the embedded default (ML-100k, SmolLM2-135M), offline.

1. loads the shipped ML-100k simulator (the first run regenerates its MovieLens-derived tables
   from the bundled dataset, once);
2. trains a short item-scoring MaskablePPO run (``--train-steps`` env steps, 16 users stepped
   together, a PPO update every 256 steps) and prints its greedy policy's mean rating on the
   same 8 users before and after training: the agent learns to rank by what the simulated
   users rate highly;
3. evaluates the baselines (random, most-popular, matrix factorisation), the agent shipped with
   the package (trained by ``make agent``, ``benchmarks/rl/``) and the short run in the
   simulator (``--episodes`` episodes, the same users for every policy, paired differences) and
   on the logged test interactions (HR@10, NDCG@10, replay);
4. prints the comparison, which policy the simulated users like best and by how much, and
   writes ``report.md``, ``results.json`` and ``policies.png`` to ``--out`` (the short run's
   folder, with its learning curve, goes to ``--out/agents``), then the time of each part.

The defaults keep it short: almost all of its time is the simulated users rating, one rating
per env step. ``persona-gym train-agent`` and ``persona-gym evaluate-policy`` do each part at
any size (``evaluate-policy`` also has the item-mean baseline and the simulator-greedy oracle).
Ctrl-C stops it with one line; a rerun starts over (a fresh run folder).
``--artifacts DIR`` runs the same job on a simulator you trained (``persona-gym distill``,
``personas``, ``train``) instead of the shipped one; the shipped agent is then left out (it
was trained on the shipped simulator's catalogue).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from persona_gym.config_cli import plain

#: The baselines of the comparison: chance, popularity, and the best of them on the shipped
#: simulator (matrix factorisation).
BASELINES = ("random", "most-popular", "mf")
#: The short run: users stepped together, env steps per sub-environment between PPO updates
#: (an update every 16 x 16 = 256 env steps) and the fixed users of its greedy evaluation.
TRAIN_ENVS, TRAIN_ROLLOUT, TRAIN_EVAL_USERS = 16, 16, 8


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the main job on the embedded default (offline)",
        description=plain(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the episodes and of the short run (default: 0)"
    )
    parser.add_argument(
        "--episodes", type=int, default=8, help="simulator episodes per policy (default: 8)"
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=512,
        help="env steps of the short training run; 0 skips it (default: 512)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="simulator dtype (auto: bfloat16 on CPUs with AMX/AVX512-BF16) (default: auto)",
    )
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=None,
        help="a simulator you trained instead of the shipped one (the shipped agent is "
        "left out) (default: the shipped ML-100k simulator)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="report folder (default: runs/demo)"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from agents.evaluate import PolicyEvalConfig, evaluate_policies, load_evaluation
    from agents.policies import SB3Policy, make_policy
    from agents.train import AgentConfig, train_agent
    from persona_gym.data import load_dataset
    from persona_gym.evaluation.policy_report import format_table, write_report

    started = time.perf_counter()
    evaluation = PolicyEvalConfig(episodes=args.episodes, seeds=(args.seed,))  # bad values fail now
    overrides: dict[str, Any] = {} if args.artifacts is None else {"artifacts": str(args.artifacts)}
    if args.artifacts is None:
        summary = load_dataset("ml-100k").summary()
        print(
            f"MovieLens-100k: {summary['n_users']} users, {summary['n_items']} items, "
            f"{summary['n_ratings']} ratings"
        )
    core, ratings, test, n_users = load_evaluation("PersonaML100K-v0", args.dtype, **overrides)
    phases = {"simulator": time.perf_counter() - started}
    print(
        f"simulator ready in {time.perf_counter() - started:.0f} s: {len(core.user_ids)} simulated "
        f"users, {core.n_items} movies, {len(test)} logged test interactions",
        flush=True,
    )

    names = [*BASELINES] + ([] if args.artifacts else ["agent"])
    policies = {name: make_policy(name, core, ratings, seed=args.seed) for name in names}
    if args.artifacts is None:
        header = (
            f"Main job: `PersonaML100K-v0` (shipped simulator, {args.dtype}), seed {args.seed}; `agent` is "
            "the item-scoring maskable DQN agent shipped with the package (`make agent`, "
            "benchmarks/rl/)."
        )
    else:
        header = f"Main job on the simulator `{args.artifacts}` ({args.dtype}), seed {args.seed}."
    if args.train_steps:
        print(
            f"training an item-scoring MaskablePPO for {args.train_steps} env steps "
            f"(greedy evaluation on {TRAIN_EVAL_USERS} fixed users before and after) ...",
            flush=True,
        )
        trained = time.perf_counter()
        run_dir = train_agent(
            AgentConfig(
                policy="items",
                timesteps=args.train_steps,
                seed=args.seed,
                n_envs=TRAIN_ENVS,
                n_steps=TRAIN_ROLLOUT,
                dtype=args.dtype,
                eval_every=args.train_steps,
                eval_episodes=TRAIN_EVAL_USERS,
                checkpoint_every=args.train_steps,
                out=str(args.out / "agents"),
                env_kwargs=overrides,
            ),
            progress=sys.stderr.isatty(),
            ratings=ratings,
        )
        phases["short run"] = time.perf_counter() - trained
        curve = pd.read_csv(run_dir / "eval.csv")
        print(
            "greedy mean rating during the short run: "
            + ", ".join(f"{r.mean_rating:.2f} at {r.steps} steps" for r in curve.itertuples())
        )
        policies["short run"] = SB3Policy.load(run_dir, name="short run")
        header += (
            f" `short run`: {args.train_steps} env steps of the same agent from scratch, run folder "
            f"`{run_dir}` ([learning curve]({Path(run_dir).relative_to(args.out) / 'learning_curve.png'}))."
        )
    print(
        f"evaluating {len(policies)} policies: {args.episodes} episodes each + logged data ...",
        flush=True,
    )
    evaluated = time.perf_counter()
    results = evaluate_policies(
        core,
        policies,
        evaluation,
        test,
        n_users,
        progress=lambda line: print(f"  {line}", flush=True),
    )
    phases["evaluation"] = time.perf_counter() - evaluated
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    answer = best_policy(results)
    report = write_report(results, args.out, f"{header}\n\n{answer}")
    print(format_table(results))
    print(f"\n{answer}")
    print(
        f"report: {report}; total {results['wall_seconds']:.0f} s ("
        + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in phases.items())
        + ")"
    )
    return 0


def best_policy(results: dict[str, Any]) -> str:
    """One line: the policy with the highest mean rating in the simulator and its paired
    difference (95% interval, same users and draws) from the runner-up and from the worst."""
    policies = results["policies"]
    ranked = sorted(policies, key=lambda n: -policies[n]["simulator"]["mean_rating"]["mean"])
    best = ranked[0]
    rating = policies[best]["simulator"]["mean_rating"]
    line = (
        f"Best in the simulator: {best}, mean rating {rating['mean']:.2f} "
        f"[{rating['low']:.2f}, {rating['high']:.2f}]"
    )
    diffs = {(d["a"], d["b"]): d for d in results["differences"] if d["metric"] == "mean_rating"}
    parts = []
    for other in ranked[1:2] + ranked[2:][-1:]:  # the runner-up, then the worst
        d, sign = (
            (diffs[(best, other)], 1.0) if (best, other) in diffs else (diffs[(other, best)], -1.0)
        )
        low, high = sorted((sign * d["low"], sign * d["high"]))
        verdict = "" if d["distinguishable"] else ", not distinguishable"
        parts.append(
            f"{sign * d['mean']:+.2f} [{low:+.2f}, {high:+.2f}] stars over {other}{verdict}"
        )
    return line + ("; paired: " + "; ".join(parts) if parts else "") + "."
