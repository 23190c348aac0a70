"""Run folders of ``persona-gym train-agent`` and the SB3 algorithms they hold.

A run folder holds ``run.json`` (settings, timings), ``model.zip``, ``checkpoints/`` and the
monitor logs (see :mod:`agents.train`); training writes it, :class:`agents.policies.SB3Policy`
reads it back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = [
    "ALGO_NAMES",
    "FEATURES_FILE",
    "POLICY_NAMES",
    "SHIPPED_AGENT",
    "algorithm",
    "latest_checkpoint",
    "read_run",
    "ship_agent",
]

ALGO_NAMES = ("ppo", "dqn", "maskable-ppo")
POLICY_NAMES = ("mlp", "items")
FEATURES_FILE = "features.npz"  # the collaborative features of an ``items`` policy
# the trained agent shipped with the package (``make agent`` retrains it; the policy name "agent")
SHIPPED_AGENT = Path(__file__).parent / "shipped" / "PersonaML100K-v0"
SHIPPED_FILES = ("model.zip", "run.json", FEATURES_FILE, "eval.csv", "learning_curve.png")


def algorithm(name: str) -> Any:
    """The SB3 class of an algorithm name (imported here to keep ``persona-gym --help`` fast)."""
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import DQN, PPO

    classes = {"ppo": PPO, "dqn": DQN, "maskable-ppo": MaskablePPO}
    if name not in classes:
        raise ValueError(f"unknown algorithm {name!r}; choose from {list(ALGO_NAMES)}")
    return classes[name]


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run folder, with a clear error when it is not one."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {run_dir} is not a run folder of `persona-gym train-agent`"
        )
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        from persona_gym.errors import ConfigError

        raise ConfigError(
            f"{path} is not valid JSON ({err}); start a new run instead of --resume"
        ) from err


def latest_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The newest ``checkpoints/model_{N}_steps.zip`` of a run and its step count ``N``."""
    found = []
    for path in (run_dir / "checkpoints").glob("model_*_steps.zip"):
        match = re.fullmatch(r"model_(\d+)_steps\.zip", path.name)
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        return None
    steps, path = max(found)
    return path, steps


def ship_agent(
    run_dir: str | Path, dest: str | Path = SHIPPED_AGENT, steps: int | None = None
) -> Path:
    """Copy a trained run into ``dest`` as the package's shipped agent: ``model.zip`` (or the
    checkpoint of ``steps`` env steps), its features, periodic evaluation and learning curve, and
    a ``run.json``, both without the training machine's paths. Replaces ``dest`` whole."""
    import shutil
    import tempfile

    from persona_gym.io import atomic_write_json

    run_dir, dest = Path(run_dir), Path(dest)
    run = read_run(run_dir)
    model = (
        run_dir / "model.zip"
        if steps is None
        else run_dir / "checkpoints" / f"model_{steps}_steps.zip"
    )
    if not model.is_file():
        raise FileNotFoundError(f"{model} not found: train the agent first (`make agent`)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        loaded = algorithm(run["algo"]).load(model, device="cpu")
        loaded.tensorboard_log = None  # a path of the training machine
        loaded.save(work / "model.zip")
        for name in SHIPPED_FILES[2:]:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, work / name)
        run["config"]["out"] = "runs/agents"
        if steps is not None:
            run["timesteps"] = steps
        atomic_write_json(work / "run.json", run)
        if dest.exists():
            shutil.rmtree(dest)
        work.chmod(0o755)  # mkdtemp makes 0700
        work.rename(dest)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return dest
