"""``persona-gym demo``: the main job on the embedded default (ML-100k, SmolLM2-135M), offline.

1. loads the shipped ML-100k simulator (the first run regenerates its MovieLens-derived tables
   from the bundled dataset, once);
2. trains a short item-scoring MaskablePPO run (``--train-steps`` env steps, 16 users stepped
   together) and prints its greedy policy's mean rating on the same 16 users before, during and
   after training: the agent learns to rank by what the simulated users rate highly;
3. evaluates the baselines (random, most-popular, item-mean, matrix factorisation), the agent
   shipped with the package (trained by ``make agent``, ``benchmarks/rl/``) and the short run in
   the simulator (``--episodes`` episodes, the same users for every policy, paired differences)
   and on the logged test interactions (HR@10, NDCG@10, replay);
4. prints the comparison and writes ``report.md``, ``results.json`` and ``policies.png`` to
   ``--out`` (the short run's folder, with its learning curve, goes to ``--out/agents``).

Ctrl-C stops it with one line; a rerun starts over (a fresh run folder).
``persona-gym train-agent`` and ``persona-gym evaluate-policy`` do each part at any size.
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
        "--episodes", type=int, default=32, help="simulator episodes per policy (default: 32)"
    )
    parser.add_argument(
        "--train-steps",
        type=int,
        default=1024,
        help="env steps of the short training run; 0 skips it (default: 1024)",
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
    from agents.report import format_table, write_report
    from agents.train import AgentConfig, train_agent
    from persona_gym.data import load_dataset

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
    print(
        f"simulator ready in {time.perf_counter() - started:.0f} s: {len(core.user_ids)} simulated "
        f"users, {core.n_items} movies, {len(test)} logged test interactions",
        flush=True,
    )

    names = ["random", "most-popular", "item-mean", "mf"] + ([] if args.artifacts else ["agent"])
    policies = {name: make_policy(name, core, ratings, seed=args.seed) for name in names}
    if args.artifacts is None:
        header = (
            f"Main job: `PersonaML100K-v0` (shipped simulator, {args.dtype}), seed {args.seed}; `agent` is "
            "the item-scoring MaskablePPO agent shipped with the package (`make agent`, benchmarks/rl/)."
        )
    else:
        header = f"Main job on the simulator `{args.artifacts}` ({args.dtype}), seed {args.seed}."
    if args.train_steps:
        half = max(args.train_steps // 2, 1)
        print(
            f"training an item-scoring MaskablePPO for {args.train_steps} env steps "
            f"(greedy evaluation on 16 fixed users every {half}) ...",
            flush=True,
        )
        run_dir = train_agent(
            AgentConfig(
                policy="items",
                timesteps=args.train_steps,
                seed=args.seed,
                n_envs=16,
                n_steps=32,
                dtype=args.dtype,
                eval_every=half,
                eval_episodes=16,
                checkpoint_every=args.train_steps,
                out=str(args.out / "agents"),
                env_kwargs=overrides,
            ),
            progress=sys.stderr.isatty(),
            ratings=ratings,
        )
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
    results = evaluate_policies(core, policies, evaluation, test, n_users)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    report = write_report(results, args.out, header)
    print(format_table(results))
    print(f"report: {report}; total {results['wall_seconds']:.0f} s")
    return 0
