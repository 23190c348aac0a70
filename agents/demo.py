"""``persona-gym demo``: the main job on the embedded default (ML-100k, SmolLM2-135M), offline.

1. loads the shipped ML-100k simulator (the first run regenerates its MovieLens-derived tables
   from the bundled dataset, about a minute);
2. trains a short MaskablePPO run on ``PersonaML100K-v0`` (``--ppo-steps`` env steps, 16 users
   stepped together);
3. evaluates the baselines (random, most-popular, item-mean, matrix factorisation) and the PPO
   policy in the simulator (``--episodes`` episodes, the same users for every policy) and on
   the logged test interactions (HR@10, NDCG@10, replay);
4. prints the comparison and writes ``report.md``, ``results.json`` and ``policies.png`` to
   ``--out`` (the PPO run folder, with its learning curve, goes to ``--out/agents``).

``persona-gym train-agent`` and ``persona-gym evaluate-policy`` do each part at any size.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from persona_gym.config_cli import plain


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the main job on the embedded default (offline)",
        description=plain(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the episodes and of PPO")
    parser.add_argument("--episodes", type=int, default=16, help="simulator episodes per policy")
    parser.add_argument("--ppo-steps", type=int, default=1024, help="MaskablePPO env steps (0 = skip)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="simulator dtype (bfloat16: faster on CPUs with AMX)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from agents.evaluate import PolicyEvalConfig, evaluate_policies, load_evaluation
    from agents.policies import SB3Policy, make_policy
    from agents.report import format_table, write_report
    from agents.train import AgentConfig, train_agent
    from persona_gym.data import load_dataset

    started = time.perf_counter()
    summary = load_dataset("ml-100k").summary()
    print(f"MovieLens-100k: {summary['n_users']} users, {summary['n_items']} items, "
          f"{summary['n_ratings']} ratings")
    core, ratings, test, n_users = load_evaluation("PersonaML100K-v0", args.dtype)
    print(f"simulator ready in {time.perf_counter() - started:.0f} s: {len(core.user_ids)} simulated "
          f"users, {core.n_items} movies, {len(test)} logged test interactions")

    policies = {name: make_policy(name, core, ratings, seed=args.seed)
                for name in ("random", "most-popular", "item-mean", "mf")}
    header = f"Main job: `PersonaML100K-v0` (shipped simulator, {args.dtype}), seed {args.seed}."
    if args.ppo_steps:
        print(f"training MaskablePPO for {args.ppo_steps} env steps ...")
        run_dir = train_agent(AgentConfig(algo="maskable-ppo", timesteps=args.ppo_steps, seed=args.seed,
                                          dtype=args.dtype, out=str(args.out / "agents")), progress=True)
        policies["maskable-ppo"] = SB3Policy.load(run_dir, name="maskable-ppo")
        header += (f" MaskablePPO: {args.ppo_steps} env steps, run folder `{run_dir}` "
                   f"([learning curve]({Path(run_dir).relative_to(args.out) / 'learning_curve.png'})).")
    print(f"evaluating {len(policies)} policies: {args.episodes} episodes each + logged data ...")
    results = evaluate_policies(core, policies, PolicyEvalConfig(episodes=args.episodes, seeds=(args.seed,)),
                                test, n_users)
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    report = write_report(results, args.out, header)
    print(format_table(results))
    print(f"report: {report}; total {results['wall_seconds']:.0f} s")
    return 0
