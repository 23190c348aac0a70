"""``persona-gym train-agent``: train PPO, DQN or MaskablePPO on a persona-gym environment.

The policy learns from the simulated users' ratings (the reward) through
:class:`agents.sb3_env.SB3VecEnv`: ``--n-envs`` users are stepped together, one batched
rating-model call per step. A run folder ``OUT/{env}_{algo}_s{seed}_{time}`` receives:

* ``run.json``       the settings (and, at the end, timings);
* ``model.zip``      the final policy (``agents.policies.SB3Policy.load`` / ``evaluate-policy``);
* ``checkpoints/``   ``model_{N}_steps.zip`` every ``--checkpoint-every`` env steps;
* ``tb/``            TensorBoard logs (``tensorboard --logdir OUT``);
* ``monitor*.csv``   every finished episode's return and length; ``learning_curve.png``.

``--resume RUN_DIR`` continues a killed run from its latest checkpoint up to ``--timesteps``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from agents.runs import ALGO_NAMES, algorithm, latest_checkpoint, read_run
from persona_gym.config_cli import add_config_arguments, config_from_args
from persona_gym.io import atomic_write_json
from persona_gym.rater import Rater
from persona_gym.registry import ENV_IDS

log = logging.getLogger(__name__)

__all__ = ["AgentConfig", "learning_curve", "train_agent"]


@dataclass
class AgentConfig:
    """Settings of one training run (all recorded in ``run.json``).

    Attributes:
        env_id: registered environment id.
        algo: ``ppo``, ``dqn`` or ``maskable-ppo`` (sb3-contrib; uses the env's action masks).
        timesteps: total environment steps (summed over sub-environments); ``--resume``
            without ``--timesteps`` keeps the run's.
        n_envs: sub-environments stepped together (one batched simulator call per step).
        seed: seeds the algorithm (network init, sampling) and the environments.
        n_steps: PPO rollout length per sub-environment (a rollout is ``n_steps * n_envs``).
        batch_size: minibatch size (PPO) / replay batch (DQN).
        learning_rate: Adam learning rate.
        gamma: discount (episodes are short: 20 steps by default).
        ent_coef: PPO entropy bonus (keeps exploring a 1,682-item action space).
        checkpoint_every: env steps between checkpoints.
        dtype: the simulator's dtype (``bfloat16`` is faster on CPUs with AMX).
        out: parent folder of run folders.
        env_kwargs: other :class:`~persona_gym.envs.config.EnvConfig` fields, e.g.
            ``{"artifacts": "artifacts/ml100k"}`` for a simulator you trained.
    """

    env_id: str = "PersonaML100K-v0"
    algo: str = "maskable-ppo"
    timesteps: int = 20_000
    n_envs: int = 16
    seed: int = 0
    n_steps: int = 64
    batch_size: int = 256
    learning_rate: float = 3e-4
    gamma: float = 0.9
    ent_coef: float = 0.01
    checkpoint_every: int = 2048
    dtype: str = "auto"
    out: str = "runs/agents"
    env_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.algo not in ALGO_NAMES:
            raise ValueError(f"AgentConfig.algo={self.algo!r}; choose from {list(ALGO_NAMES)}")
        for name in ("timesteps", "n_envs", "n_steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"AgentConfig.{name} must be >= 1, got {getattr(self, name)}")

    def algo_kwargs(self) -> dict:
        common = dict(learning_rate=self.learning_rate, gamma=self.gamma, seed=self.seed,
                      batch_size=self.batch_size, device="cpu", verbose=0)
        if self.algo == "dqn":
            return dict(common, buffer_size=50_000, learning_starts=min(1_000, self.timesteps // 10),
                        train_freq=1, gradient_steps=1, target_update_interval=500,
                        exploration_fraction=0.3, exploration_final_eps=0.05)
        return dict(common, n_steps=self.n_steps, n_epochs=10, ent_coef=self.ent_coef)


def train_agent(config: AgentConfig, resume: str | Path | None = None, progress: bool = True,
                rater: Rater | None = None) -> Path:
    """Train and save a policy; returns the run folder (see module docstring). ``rater``
    replaces the env config's simulated users (e.g. a ``TableRater``)."""
    from stable_baselines3.common.callbacks import CheckpointCallback
    from stable_baselines3.common.vec_env import VecMonitor

    from agents.sb3_env import SB3VecEnv

    start_steps = 0
    if resume is not None:
        run_dir = Path(resume)
        recorded = read_run(run_dir)["config"]
        config = AgentConfig(**{**recorded, "timesteps": config.timesteps})
        latest = latest_checkpoint(run_dir)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(config.out) / f"{config.env_id}_{config.algo}_s{config.seed}_{stamp}"
        run_dir.mkdir(parents=True, exist_ok=False)
        latest = None
    atomic_write_json(run_dir / "run.json", {"config": dataclasses.asdict(config), "algo": config.algo})

    env = SB3VecEnv(config.env_id, config.n_envs, rater=rater, dtype=config.dtype, **config.env_kwargs)
    algo = algorithm(config.algo)
    if latest is not None:
        path, start_steps = latest
        log.info("resuming %s from %s (%d steps)", run_dir, path.name, start_steps)
        monitored = VecMonitor(env, str(run_dir / f"monitor-{start_steps}.csv"))
        model = algo.load(path, env=monitored, device="cpu")
    else:
        monitored = VecMonitor(env, str(run_dir / "monitor.csv"))
        model = algo("MultiInputPolicy", monitored, tensorboard_log=str(run_dir / "tb"),
                     **config.algo_kwargs())
    checkpoints = CheckpointCallback(save_freq=max(config.checkpoint_every // config.n_envs, 1),
                                     save_path=str(run_dir / "checkpoints"), name_prefix="model")
    started = time.perf_counter()
    remaining = max(config.timesteps - start_steps, 0)
    model.learn(total_timesteps=remaining, callback=checkpoints, progress_bar=progress,
                reset_num_timesteps=latest is None, tb_log_name="run")
    seconds = time.perf_counter() - started
    tmp = run_dir / "model.tmp.zip"
    model.save(tmp)
    tmp.replace(run_dir / "model.zip")
    learning_curve(run_dir)
    atomic_write_json(run_dir / "run.json", {
        "config": dataclasses.asdict(config), "algo": config.algo,
        "train_seconds": round(seconds, 1), "env_steps_per_s": round(remaining / max(seconds, 1e-9), 2),
        "timesteps": int(model.num_timesteps),
    })
    env.close()
    return run_dir


def learning_curve(run_dir: str | Path, window: int = 50) -> Path | None:
    """Plot episode returns (rolling mean over ``window`` episodes) against env steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    run_dir = Path(run_dir)
    frames = [pd.read_csv(p, skiprows=1) for p in sorted(run_dir.glob("monitor*.csv"))]
    frames = [f for f in frames if len(f)]
    if not frames:
        return None
    episodes = pd.concat(frames, ignore_index=True)
    steps = episodes["l"].cumsum()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, episodes["r"], ".", alpha=0.2, markersize=3, label="episode return")
    ax.plot(steps, episodes["r"].rolling(window, min_periods=1).mean(), label=f"mean of {window}")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("return")
    ax.set_title(run_dir.name, fontsize=8)
    ax.legend()
    fig.tight_layout()
    path = run_dir / "learning_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train-agent", help="train PPO / DQN / MaskablePPO on an environment",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, AgentConfig, skip=("env_kwargs",), flags={"env_id": "--env"},
                         choices={"env_id": ENV_IDS, "algo": ALGO_NAMES,
                                  "dtype": ("auto", "float32", "bfloat16")},
                         defaults={"timesteps": None})  # with --resume: the run's
    parser.add_argument("--artifacts", help="simulator artifacts (default: the env config's, the shipped one)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its latest checkpoint")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    extra: dict[str, Any] = {"env_kwargs": {"artifacts": args.artifacts} if args.artifacts else {}}
    if args.timesteps is None and args.resume:  # keep the length the run was started with
        extra["timesteps"] = read_run(args.resume)["config"]["timesteps"]
    config = config_from_args(AgentConfig, args, **extra)
    run_dir = train_agent(config, resume=args.resume, progress=not args.no_progress)
    info = read_run(run_dir)
    print(f"trained {info['algo']} for {info['timesteps']} steps in {info['train_seconds']:.0f} s "
          f"({info['env_steps_per_s']:.1f} env steps/s): {run_dir}/model.zip")
    return 0
