"""``persona-gym train-agent``: train PPO, DQN, MaskablePPO or MaskableDQN on a persona-gym env.

The policy learns from the simulated users' ratings (the reward) through
:class:`agents.sb3_env.SB3VecEnv`: ``--n-envs`` users are stepped together, one batched
rating-model call per step. A run folder ``OUT/{env}_{algo}_s{seed}_{time}`` receives:

* ``run.json``       the settings (and, at the end, timings);
* ``model.zip``      the final policy (``agents.policies.SB3Policy.load`` / ``evaluate-policy``);
* ``checkpoints/``   ``model_{N}_steps.zip`` every ``--checkpoint-every`` env steps;
* ``tb/``            TensorBoard logs (``tensorboard --logdir OUT``);
* ``monitor*.csv``   every finished episode's return and length; ``learning_curve.png``.

* ``manifest.json``  the sha256 of run.json, model.zip, features.npz and each checkpoint.

``--resume RUN_DIR`` continues a killed run from its newest intact checkpoint up to
``--timesteps``, with the settings recorded in its run.json (a different ``--artifacts``,
``--env-kwargs`` or setting is refused).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from agents.runs import (
    ALGO_NAMES,
    FEATURES_FILE,
    POLICY_NAMES,
    algorithm,
    latest_checkpoint,
    load_model,
    read_run,
    record_files,
    verify_files,
)
from persona_gym.config_cli import add_config_arguments, config_from_args, plain
from persona_gym.envs.config import add_env_kwargs_argument, parse_env_kwargs
from persona_gym.io import atomic_write_json
from persona_gym.registry import ENV_IDS, env_config_name
from persona_gym.simulator.rater import Rater

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

__all__ = ["AgentConfig", "learning_curve", "train_agent"]


@dataclass
class AgentConfig:
    """Settings of one training run (all recorded in ``run.json``).

    Attributes:
        env_id: registered environment id.
        algo: ``ppo``, ``dqn``, ``maskable-ppo`` (sb3-contrib; uses the env's action masks) or
            ``maskable-dqn`` (:class:`agents.item_dqn.MaskableDQN`: DQN within the masks, a
            Q-network that starts at MF's predicted ratings; ``items`` only).
        policy: ``mlp`` (SB3's ``MultiInputPolicy``: one output per item) or ``items``
            (items scored through their vectors with the MF baseline's collaborative features:
            :class:`agents.item_policy.ItemScoringPolicy` for ``maskable-ppo``,
            :class:`agents.item_dqn.ItemQPolicy` for ``maskable-dqn``).
        timesteps: total environment steps (summed over sub-environments); ``--resume``
            without ``--timesteps`` keeps the run's.
        n_envs: sub-environments stepped together (one batched simulator call per step).
        seed: seeds the algorithm (network init, sampling) and the environments.
        n_steps: PPO rollout length per sub-environment (a rollout is ``n_steps * n_envs``).
        batch_size: minibatch size (PPO) / replay batch (DQN).
        learning_rate: Adam learning rate.
        gamma: discount (episodes are short: 20 steps by default).
        ent_coef: PPO entropy bonus (keeps exploring a 1,682-item action space).
        cf_start: ``items`` with ``maskable-ppo`` only: the policy's starting weight on MF's
            predicted rating, in logits per star (0: a uniform start; 4: MF's top movie about
            e^2 times as likely as one it predicts half a star lower, so PPO starts near MF's
            ranking and refines it). ``maskable-dqn`` starts at MF's predictions.
        item_gain: ``items`` only: multiplies the policy's per-item corrections, so they learn
            that many times faster than the other weights (1: as before).
        checkpoint_every: env steps between checkpoints.
        eval_every: env steps between evaluations of the greedy policy (0 = none): the same
            ``eval_episodes`` users each time (seed ``EVAL_SEED``, apart from evaluate-policy's
            seeds), written to ``eval.csv``, TensorBoard (``eval/*``) and the learning curve.
        eval_episodes: episodes per periodic evaluation.
        dtype: the simulator's dtype (``bfloat16`` is faster on CPUs with AMX).
        out: parent folder of run folders.
        env_kwargs: other :class:`~persona_gym.envs.config.EnvConfig` fields, e.g.
            ``{"artifacts": "artifacts/ml100k"}`` for a simulator you trained.
    """

    env_id: str = "PersonaML100K-v0"
    algo: str = "maskable-ppo"
    policy: str = "mlp"
    timesteps: int = 20_000
    n_envs: int = 16
    seed: int = 0
    n_steps: int = 64
    batch_size: int = 256
    learning_rate: float = 3e-4
    gamma: float = 0.9
    ent_coef: float = 0.01
    cf_start: float = 0.0
    item_gain: float = 1.0
    checkpoint_every: int = 2048
    eval_every: int = 0
    eval_episodes: int = 32
    dtype: str = "auto"
    out: str = "runs/agents"
    env_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.algo not in ALGO_NAMES:
            raise ValueError(f"AgentConfig.algo={self.algo!r}; choose from {list(ALGO_NAMES)}")
        if self.eval_every < 0:
            raise ValueError(f"AgentConfig.eval_every must be >= 0, got {self.eval_every}")
        if self.policy not in POLICY_NAMES:
            raise ValueError(
                f"AgentConfig.policy={self.policy!r}; choose from {list(POLICY_NAMES)}"
            )
        for name, default in (("cf_start", 0.0), ("item_gain", 1.0)):
            if getattr(self, name) != default and self.policy != "items":
                raise ValueError(
                    f"AgentConfig.{name}={getattr(self, name)} needs policy='items', "
                    f"got {self.policy!r}"
                )
        if self.item_gain <= 0:
            raise ValueError(f"AgentConfig.item_gain must be > 0, got {self.item_gain}")
        if self.policy == "items" and self.algo not in ("maskable-ppo", "maskable-dqn"):
            raise ValueError(
                "AgentConfig.policy='items' needs algo='maskable-ppo' or 'maskable-dqn', "
                f"got {self.algo!r}"
            )
        if self.algo == "maskable-dqn" and self.policy != "items":
            raise ValueError(
                f"AgentConfig.algo='maskable-dqn' needs policy='items', got {self.policy!r}"
            )
        if self.cf_start and self.algo == "maskable-dqn":
            raise ValueError(
                "AgentConfig.cf_start is maskable-ppo's: maskable-dqn's Q-values start at MF's "
                "predicted ratings"
            )
        for name in (
            "timesteps",
            "n_envs",
            "n_steps",
            "batch_size",
            "checkpoint_every",
            "eval_episodes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"AgentConfig.{name} must be >= 1, got {getattr(self, name)}")

    def algo_kwargs(self) -> dict:
        common = dict(
            learning_rate=self.learning_rate,
            gamma=self.gamma,
            seed=self.seed,
            batch_size=self.batch_size,
            device="cpu",
            verbose=0,
        )
        if self.algo in ("dqn", "maskable-dqn"):
            kwargs = dict(
                common,
                buffer_size=50_000,
                learning_starts=min(1_000, self.timesteps // 10),
                train_freq=1,
                gradient_steps=1,
                target_update_interval=500,
                exploration_fraction=0.3,
                exploration_final_eps=0.05,
            )
            if self.algo == "maskable-dqn":
                # a replay batch per 8 new ratings (n_envs of them arrive per step) and a
                # lasting exploration: the values of MF's top movies differ by a tenth of a star
                # under a star of rating noise, so each needs many ratings (evaluation is greedy)
                kwargs.update(
                    gradient_steps=max(1, self.n_envs // 8),
                    exploration_fraction=0.5,
                    exploration_final_eps=0.2,
                )
            return kwargs
        return dict(common, n_steps=self.n_steps, n_epochs=10, ent_coef=self.ent_coef)


def train_agent(
    config: AgentConfig,
    resume: str | Path | None = None,
    progress: bool = True,
    rater: Rater | None = None,
    ratings: pd.DataFrame | None = None,
) -> Path:
    """Train and save a policy; returns the run folder (see module docstring). ``rater``
    replaces the env config's simulated users (e.g. a ``TableRater``); ``ratings`` the train +
    background ratings an ``items`` policy's collaborative features are fitted on (default:
    the artifacts' protocol split, as the MF baseline)."""
    from stable_baselines3.common.vec_env import VecMonitor

    from agents.sb3_env import SB3VecEnv

    start_steps = 0
    if resume is not None:
        run_dir = Path(resume)
        recorded = read_run(run_dir)["config"]
        verify_files(run_dir, ["run.json", FEATURES_FILE])
        config = AgentConfig(**{**recorded, "timesteps": config.timesteps})
        latest = latest_checkpoint(run_dir)
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = Path(config.out) / f"{config.env_id}_{config.algo}_s{config.seed}_{stamp}"
        run_dir.mkdir(parents=True, exist_ok=False)
        latest = None
    atomic_write_json(
        run_dir / "run.json", {"config": dataclasses.asdict(config), "algo": config.algo}
    )
    record_files(run_dir, "run.json")

    features = None
    if config.policy == "items":
        features = _features(config, rater, ratings, run_dir)
    env = SB3VecEnv(
        config.env_id,
        config.n_envs,
        features=features,
        dtype=config.dtype,
        **_with_rater(rater, config.env_kwargs),
    )
    algo = algorithm(config.algo)
    if latest is not None:
        path, start_steps = latest
        log.info("resuming %s from %s (%d steps)", run_dir, path.name, start_steps)
        monitored = VecMonitor(
            env, str(run_dir / f"monitor-{start_steps}.monitor.csv")
        )  # SB3 adds .monitor.csv otherwise
        model = load_model(config.algo, path, env=monitored)
    else:
        monitored = VecMonitor(env, str(run_dir / "monitor.csv"))
        policy: Any = "MultiInputPolicy"
        kwargs = config.algo_kwargs()
        if features is not None:
            from agents.item_dqn import ItemQPolicy
            from agents.item_policy import ItemScoringPolicy

            kwargs["policy_kwargs"] = {
                "item_side": features.item_side,
                "item_vectors": features.item_vectors,
                "item_embeddings": env.core.item_embeddings,
                "item_gain": config.item_gain,
            }
            if config.algo == "maskable-dqn":
                policy = ItemQPolicy
            else:
                policy = ItemScoringPolicy
                kwargs["policy_kwargs"]["cf_start"] = config.cf_start
        model = algo(policy, monitored, tensorboard_log=str(run_dir / "tb"), **kwargs)
    checkpoints = atomic_checkpoints(
        max(config.checkpoint_every // config.n_envs, 1), run_dir / "checkpoints"
    )
    started = time.perf_counter()
    remaining = max(config.timesteps - start_steps, 0)
    callbacks: list[Any] = [checkpoints]
    if not progress:
        callbacks.append(progress_lines(config.timesteps))
    if config.eval_every:
        callbacks.append(periodic_eval(env.core, features, config, run_dir))
    try:
        model.learn(
            total_timesteps=remaining,
            callback=callbacks,
            progress_bar=progress,
            reset_num_timesteps=latest is None,
            tb_log_name="run",
        )
    except KeyboardInterrupt:  # keep what was learnt: --resume continues from here
        path = run_dir / "checkpoints" / f"model_{model.num_timesteps}_steps.zip"
        tmp = path.with_suffix(".tmp.zip")
        path.parent.mkdir(exist_ok=True)
        model.save(tmp)
        tmp.replace(path)
        record_files(run_dir, f"checkpoints/{path.name}")
        log.warning("interrupted at %d env steps; saved %s", model.num_timesteps, path)
        env.close()
        raise
    seconds = time.perf_counter() - started
    tmp = run_dir / "model.tmp.zip"
    model.save(tmp)
    tmp.replace(run_dir / "model.zip")
    record_files(run_dir, "model.zip")
    learning_curve(run_dir)
    atomic_write_json(
        run_dir / "run.json",
        {
            "config": dataclasses.asdict(config),
            "algo": config.algo,
            "train_seconds": round(seconds, 1),
            "env_steps_per_s": round(remaining / max(seconds, 1e-9), 2),
            "timesteps": int(model.num_timesteps),
        },
    )
    record_files(run_dir, "run.json")
    env.close()
    return run_dir


def atomic_checkpoints(save_freq: int, folder: Path) -> Any:
    """SB3's ``CheckpointCallback`` (``model_{N}_steps.zip`` every ``save_freq`` calls), each
    file written under a temporary name, renamed and recorded in the run's manifest: a run
    killed while saving leaves no truncated checkpoint for ``--resume`` to pick as the latest."""
    from stable_baselines3.common.callbacks import CheckpointCallback

    class _Atomic(CheckpointCallback):
        def _on_step(self) -> bool:
            if self.n_calls % self.save_freq == 0:
                path = Path(self._checkpoint_path(extension="zip"))
                tmp = path.with_suffix(".tmp.zip")
                self.model.save(tmp)
                tmp.replace(path)
                record_files(folder.parent, f"{folder.name}/{path.name}")
            return True

    return _Atomic(save_freq=save_freq, save_path=str(folder), name_prefix="model")


def progress_lines(total: int, every: float = 0.05) -> Any:
    """An SB3 callback that logs a progress line at each ``every`` share of ``total`` env steps
    (steps, rate, time left, mean return of the last 50 episodes): the bar's content as lines a
    log file or CI keeps."""
    from stable_baselines3.common.callbacks import BaseCallback

    class _Lines(BaseCallback):
        def _on_training_start(self) -> None:
            self.started, self.first = time.perf_counter(), self.num_timesteps
            self.next_at = self.num_timesteps + max(int(total * every), 1)

        def _on_step(self) -> bool:
            if self.num_timesteps >= self.next_at or self.num_timesteps >= total:
                done = self.num_timesteps - self.first
                rate = done / max(time.perf_counter() - self.started, 1e-9)
                left = max(total - self.num_timesteps, 0) / max(rate, 1e-9)
                # SB3 creates the buffer in learn() before the first step
                assert self.model.ep_info_buffer is not None
                returns = [e["r"] for e in self.model.ep_info_buffer]
                mean = (
                    f", mean return {np.mean(returns):.2f} (last {len(returns)} episodes)"
                    if returns
                    else ""
                )
                log.info(
                    "step %d/%d (%.0f%%), %.1f env steps/s, %.0f s left%s",
                    self.num_timesteps,
                    total,
                    100 * self.num_timesteps / total,
                    rate,
                    left,
                    mean,
                )
                self.next_at = self.num_timesteps + max(int(total * every), 1)
            return True

    return _Lines()


EVAL_SEED = 1_000  # the periodic evaluation's users; evaluate-policy uses seeds 0, 1, 2, ...


def periodic_eval(core: Any, features: Any, config: AgentConfig, run_dir: Path) -> Any:
    """An SB3 callback: every ``eval_every`` env steps (and before the first update) it plays
    ``eval_episodes`` episodes of the greedy policy on the same users and logs their mean
    rating, return and churn (``eval.csv``, TensorBoard ``eval/*``).

    The greedy policy on fixed users is the learning curve to read: the training monitor's
    running mean mixes exploration with which episodes happen to end first."""
    from stable_baselines3.common.callbacks import BaseCallback

    from agents.evaluate import simulate
    from agents.policies import SB3Policy
    from persona_gym.envs.core import RecCore

    eval_core = RecCore(core.config, core.rater)  # its own episodes, the same simulated users
    path = run_dir / "eval.csv"

    class _Callback(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.next_at = 0

        def _evaluate(self) -> None:
            policy = SB3Policy(self.model, "agent", features)
            records = simulate(policy, eval_core, config.eval_episodes, EVAL_SEED)
            rating = float(np.mean([np.mean(r["expected"]) for r in records if r["expected"]]))
            ret = float(np.mean([r["return"] for r in records]))
            churn = float(np.mean([r["left"] for r in records]))
            steps = int(self.num_timesteps)
            for key, value in (("mean_rating", rating), ("return", ret), ("churn", churn)):
                self.logger.record(f"eval/{key}", value)
            new = not path.exists()
            with path.open("a") as f:  # one line per evaluation; a resumed run appends
                f.write("steps,mean_rating,return,churn\n" if new else "")
                f.write(f"{steps},{rating:.4f},{ret:.4f},{churn:.4f}\n")
            log.info(
                "eval at %d steps: mean rating %.3f, return %.2f, churn %.2f",
                steps,
                rating,
                ret,
                churn,
            )
            self.next_at = steps + config.eval_every

        def _on_training_start(self) -> None:
            if self.num_timesteps == 0:
                self._evaluate()
            else:
                self.next_at = self.num_timesteps + config.eval_every

        def _on_step(self) -> bool:
            if self.num_timesteps >= self.next_at:
                self._evaluate()
            return True

    return _Callback()


def _with_rater(rater: Rater | None, env_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The env's keyword arguments with ``rater`` among them when given (``env_kwargs`` may
    name one instead: ``--env-kwargs rater=prior``)."""
    return env_kwargs if rater is None else {**env_kwargs, "rater": rater}


def _features(
    config: AgentConfig, rater: Rater | None, ratings: pd.DataFrame | None, run_dir: Path
) -> Any:
    """The MF baseline's collaborative features of the env's users and items, saved in the run
    folder (``features.npz``) so evaluation reads the very vectors the agent trained with."""
    from agents.evaluate import load_evaluation
    from agents.item_policy import CFFeatures
    from persona_gym.envs import load_env_config
    from persona_gym.envs.core import RecCore

    path = run_dir / FEATURES_FILE
    if path.is_file():
        return CFFeatures.load(path)
    if ratings is None:
        core, ratings, _, _ = load_evaluation(
            config.env_id, config.dtype, **_with_rater(rater, config.env_kwargs)
        )
    else:
        core = RecCore(
            load_env_config(
                env_config_name(config.env_id), dtype=config.dtype, **config.env_kwargs
            ),
            rater,
        )
    features = CFFeatures.from_ratings(ratings, core.catalog, core.item_embeddings)
    features.save(path)
    record_files(run_dir, FEATURES_FILE)
    return features


def learning_curve(run_dir: str | Path, window: int = 50) -> Path | None:
    """Plot the training episodes' returns (rolling mean over ``window`` episodes) and, when the
    run has ``eval.csv``, the periodic evaluation's mean rating, against env steps."""
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
    evals = pd.read_csv(run_dir / "eval.csv") if (run_dir / "eval.csv").is_file() else None
    fig, axes = plt.subplots(
        1,
        2 if evals is not None else 1,
        figsize=(11 if evals is not None else 6, 3.5),
        squeeze=False,
    )
    ax = axes[0, 0]
    ax.plot(steps, episodes["r"], ".", alpha=0.2, markersize=3, label="episode return")
    ax.plot(steps, episodes["r"].rolling(window, min_periods=1).mean(), label=f"mean of {window}")
    ax.set_xlabel("environment steps")
    ax.set_ylabel("training return (sampled actions)")
    ax.legend()
    if evals is not None:
        ax = axes[0, 1]
        ax.plot(evals["steps"], evals["mean_rating"], "o-")
        ax.set_xlabel("environment steps")
        ax.set_ylabel("mean rating, greedy policy, fixed users")
    fig.suptitle(run_dir.name, fontsize=8)
    fig.tight_layout()
    path = run_dir / "learning_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def check_resume_flags(args: argparse.Namespace, run_dir: Path, recorded: AgentConfig) -> None:
    """Refuse ``--resume`` with a setting other than the run's recorded one (``--artifacts``,
    ``--env-kwargs``, or a flag given a value other than its default and the recorded one):
    the run continues with its recorded settings only; ``--timesteps`` may change."""
    from persona_gym.errors import ConfigError

    where = f"{run_dir / 'run.json'}"
    fix = "--resume continues a run with its recorded settings"
    if args.artifacts:
        before = recorded.env_kwargs.get("artifacts")
        if before is None or Path(before).resolve() != Path(args.artifacts).resolve():
            raise ConfigError(
                f"--artifacts {args.artifacts} differs from the artifacts recorded in {where} "
                f"({before if before is not None else 'the env config default'}); {fix}: "
                "drop --artifacts, or start a new run without --resume"
            )
    for key, value in parse_env_kwargs(args.env_kwargs).items():
        if recorded.env_kwargs.get(key, value) != value or key not in recorded.env_kwargs:
            raise ConfigError(
                f"--env-kwargs {key}={value} differs from the env settings recorded in {where} "
                f"({recorded.env_kwargs}); {fix}: drop --env-kwargs, or start a new run without "
                "--resume"
            )
    defaults = AgentConfig()
    for f in dataclasses.fields(AgentConfig):
        if f.name in ("timesteps", "env_kwargs") or not hasattr(args, f.name):
            continue
        value = getattr(args, f.name)
        if value != getattr(defaults, f.name) and value != getattr(recorded, f.name):
            flag = "--env" if f.name == "env_id" else f"--{f.name.replace('_', '-')}"
            raise ConfigError(
                f"{flag} {value} differs from the recorded {f.name} "
                f"{getattr(recorded, f.name)!r} in {where}; {fix}: drop {flag}, or start a new "
                "run without --resume"
            )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train-agent",
        help="train PPO / DQN / MaskablePPO on an environment",
        description=plain(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(
        parser,
        AgentConfig,
        skip=("env_kwargs",),
        flags={"env_id": "--env"},
        choices={
            "env_id": ENV_IDS,
            "algo": ALGO_NAMES,
            "policy": POLICY_NAMES,
            "dtype": ("auto", "float32", "bfloat16"),
        },
        defaults={"timesteps": None},
    )  # with --resume: the run's
    parser.add_argument(
        "--artifacts", help="simulator artifacts (default: the env config's, the shipped one)"
    )
    add_env_kwargs_argument(parser)
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue a run from its latest checkpoint (a Ctrl-C'd run folder too)",
    )
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: progress is logged as lines (also when stderr is not a terminal)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    env_kwargs = parse_env_kwargs(args.env_kwargs)
    if args.artifacts:
        env_kwargs["artifacts"] = args.artifacts
    extra: dict[str, Any] = {"env_kwargs": env_kwargs}
    if args.resume:
        recorded = AgentConfig(**read_run(args.resume)["config"])
        check_resume_flags(args, Path(args.resume), recorded)
        extra["env_kwargs"] = recorded.env_kwargs
        if args.timesteps is None:  # keep the length the run was started with
            extra["timesteps"] = recorded.timesteps
    config = config_from_args(AgentConfig, args, **extra)
    args.resume_hint = (
        f"continue with `persona-gym train-agent --resume {args.resume}`"
        if args.resume
        else f"continue with `persona-gym train-agent --resume RUN_DIR` (the run folder under {config.out})"
    )
    run_dir = train_agent(
        config, resume=args.resume, progress=not args.no_progress and sys.stderr.isatty()
    )
    info = read_run(run_dir)
    print(
        f"trained {info['algo']} for {info['timesteps']} steps in {info['train_seconds']:.0f} s "
        f"({info['env_steps_per_s']:.1f} env steps/s): {run_dir}/model.zip"
    )
    return 0
