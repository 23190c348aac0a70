"""Run folders of ``persona-gym train-agent``, the shipped agent, and the SB3 algorithms.

A run folder holds ``run.json`` (settings, timings), ``model.zip``, ``checkpoints/`` and the
monitor logs (see :mod:`agents.train`); training writes it, :class:`agents.policies.SB3Policy`
reads it back. ``manifest.json`` records the sha256 of each file the run or :func:`ship_agent`
wrote (``run.json``, ``model.zip``, ``features.npz``, each checkpoint); loading checks them, so a
changed or truncated file is refused (a checkpoint: skipped for the newest intact one).
``run.json`` has a schema (:func:`check_run`): unknown fields, a missing ``config`` or an
``algo`` other than ``config.algo`` are refused.
"""

from __future__ import annotations

import json
import logging
import re
import typing
import zipfile
from pathlib import Path
from typing import Any

from persona_gym.errors import ConfigError

__all__ = [
    "ALGO_NAMES",
    "FEATURES_FILE",
    "MANIFEST_FILE",
    "POLICY_NAMES",
    "SHIPPED_AGENT",
    "algorithm",
    "check_run",
    "latest_checkpoint",
    "load_model",
    "read_run",
    "record_files",
    "ship_agent",
    "verify_files",
]

log = logging.getLogger(__name__)

ALGO_NAMES = ("ppo", "dqn", "maskable-ppo", "maskable-dqn")
POLICY_NAMES = ("mlp", "items")
FEATURES_FILE = "features.npz"  # the collaborative features of an ``items`` policy
MANIFEST_FILE = "manifest.json"  # {"files": {relative path: sha256}} of a run or shipped agent
# the trained agent shipped with the package (``make agent`` retrains it; the policy name "agent")
SHIPPED_AGENT = Path(__file__).parent / "shipped" / "PersonaML100K-v0"
SHIPPED_FILES = ("model.zip", "run.json", FEATURES_FILE, "eval.csv", "learning_curve.png")
# run.json's top-level fields: the settings, the algorithm, and what the finished run adds
RUN_FIELDS: dict[str, tuple[type, ...]] = {
    "config": (dict,),
    "algo": (str,),
    "timesteps": (int,),
    "train_seconds": (int, float),
    "env_steps_per_s": (int, float),
}
_SHA256 = re.compile(r"[0-9a-f]{64}")
RUN_FIX = "restore the file as `persona-gym train-agent` wrote it, or start a new run"
SHIPPED_FIX = (
    "restore agents/shipped from the package (`git checkout agents/shipped` in a clone, or "
    "reinstall persona-gym), or retrain it with `make agent`"
)


def algorithm(name: str) -> Any:
    """The SB3 class of an algorithm name (imported here to keep ``persona-gym --help`` fast)."""
    from sb3_contrib import MaskablePPO
    from stable_baselines3 import DQN, PPO

    from agents.item_dqn import MaskableDQN

    classes = {"ppo": PPO, "dqn": DQN, "maskable-ppo": MaskablePPO, "maskable-dqn": MaskableDQN}
    if name not in classes:
        raise ValueError(f"unknown algorithm {name!r}; choose from {list(ALGO_NAMES)}")
    return classes[name]


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run folder, checked against its schema (:func:`check_run`)."""
    path = Path(run_dir) / "run.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {run_dir} is not a run folder of `persona-gym train-agent`"
        )
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); {RUN_FIX}") from err
    check_run(data, path)
    return data


def check_run(data: object, path: Path) -> None:
    """Refuse a ``run.json`` (read from ``path``) that ``train-agent`` would not write: unknown
    or mistyped fields, no ``config``, a config :class:`agents.train.AgentConfig` refuses, or an
    ``algo`` other than ``config.algo``. Config fields it lacks take their defaults."""
    import dataclasses

    from agents.train import AgentConfig

    if not isinstance(data, dict):
        raise ConfigError(f"{path} must be a JSON object, got {type(data).__name__}; {RUN_FIX}")
    for key, value in data.items():
        if key not in RUN_FIELDS:
            raise ConfigError(
                f"{path}: unknown field {key!r} (run.json holds {list(RUN_FIELDS)}); {RUN_FIX}"
            )
        _check_type(path, key, value, RUN_FIELDS[key])
    for key in ("config", "algo"):
        if key not in data:
            raise ConfigError(f"{path}: field {key!r} is missing; {RUN_FIX}")
    config = data["config"]
    hints = typing.get_type_hints(AgentConfig)
    for key, value in config.items():
        if key not in hints:
            known = [f.name for f in dataclasses.fields(AgentConfig)]
            raise ConfigError(
                f"{path}: unknown field config.{key} (AgentConfig has {known}); {RUN_FIX}"
            )
        kind = hints[key]
        _check_type(path, f"config.{key}", value, (int, float) if kind is float else (kind,))
    try:
        AgentConfig(**config)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{path}: config: {err}; {RUN_FIX}") from err
    if data["algo"] != config.get("algo", AgentConfig.algo):
        raise ConfigError(
            f"{path}: algo {data['algo']!r} differs from config.algo "
            f"{config.get('algo', AgentConfig.algo)!r}; {RUN_FIX}"
        )
    if data.get("timesteps", 0) < 0:
        raise ConfigError(f"{path}: timesteps must be >= 0, got {data['timesteps']}; {RUN_FIX}")


def _check_type(path: Path, key: str, value: object, kinds: tuple[type, ...]) -> None:
    origin = tuple(typing.get_origin(k) or k for k in kinds)
    if (isinstance(value, bool) and bool not in origin) or not isinstance(value, origin):
        names = " or ".join("object" if k is dict else k.__name__ for k in origin)
        raise ConfigError(
            f"{path}: {key!r} must be {'an' if names[0] in 'aeio' else 'a'} {names}, "
            f"got {value!r}; {RUN_FIX}"
        )


# -- manifests -----------------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict[str, str] | None:
    """The ``{relative path: sha256}`` of ``folder/manifest.json``; ``None`` when it has none."""
    path = folder / MANIFEST_FILE
    if not path.is_file():
        return None
    fix = SHIPPED_FIX if _is_shipped(folder) else RUN_FIX
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON ({err}); {fix}") from err
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        raise ConfigError(f"{path}: field 'files' (relative path -> sha256) is missing; {fix}")
    for name, digest in files.items():
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ConfigError(f"{path}: files.{name} {digest!r} is not a SHA-256; {fix}")
    return files


def record_files(folder: Path, *names: str) -> None:
    """Add (or update) the sha256 of ``folder/name`` for each name to ``folder/manifest.json``
    (written atomically)."""
    from persona_gym.assets import file_sha256
    from persona_gym.io import atomic_write_json

    files = dict(read_manifest(folder) or {})
    for name in names:
        files[name] = file_sha256(folder / name)
    atomic_write_json(folder / MANIFEST_FILE, {"files": dict(sorted(files.items()))})


def _is_shipped(folder: Path) -> bool:
    return folder.resolve() == SHIPPED_AGENT.resolve()


def file_problem(folder: Path, name: str, files: dict[str, str] | None) -> str | None:
    """Why ``folder/name`` differs from its manifest entry (``None``: it matches, or is not
    listed)."""
    from persona_gym.assets import file_sha256

    if files is None or name not in files or not (folder / name).is_file():
        return None
    if file_sha256(folder / name) != files[name]:
        return (
            f"sha256 differs from {folder / MANIFEST_FILE} "
            "(the file was truncated or changed after it was written)"
        )
    return None


def verify_files(folder: str | Path, names: typing.Iterable[str]) -> None:
    """Refuse, in one line, a file of ``names`` whose sha256 differs from ``folder``'s manifest.

    The shipped agent must have a manifest; a run folder without one (written by an older
    persona-gym) loads with a warning."""
    folder = Path(folder)
    files = read_manifest(folder)
    shipped = _is_shipped(folder)
    if files is None:
        if shipped:
            raise ConfigError(
                f"{folder / MANIFEST_FILE} is missing, so the shipped agent's files cannot be "
                f"verified; {SHIPPED_FIX}"
            )
        log.warning("%s has no %s: its files are not verified", folder, MANIFEST_FILE)
        return
    for name in names:
        problem = file_problem(folder, name, files)
        if problem is not None:
            raise ConfigError(f"{folder / name}: {problem}; {SHIPPED_FIX if shipped else RUN_FIX}")


def _zip_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable SB3 archive (``None``: it is)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if "data" not in archive.namelist():
                return "truncated, or not a model saved by stable-baselines3 (no 'data' entry)"
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"not a readable zip archive ({err})"
    return None if bad is None else f"corrupt entry {bad!r}"


def latest_checkpoint(run_dir: str | Path) -> tuple[Path, int] | None:
    """The newest intact ``checkpoints/model_{N}_steps.zip`` of a run and its step count ``N``.

    A checkpoint whose sha256 differs from the manifest, or (when the manifest does not list it)
    that is not a readable archive, is skipped with ONE warning line naming it; a run whose
    checkpoints are all broken is refused."""
    run_dir = Path(run_dir)
    found = []
    for path in (run_dir / "checkpoints").glob("model_*_steps.zip"):
        match = re.fullmatch(r"model_(\d+)_steps\.zip", path.name)
        if match:
            found.append((int(match.group(1)), path))
    if not found:
        return None
    files = read_manifest(run_dir)
    skipped: list[str] = []
    for steps, path in sorted(found, reverse=True):
        name = f"checkpoints/{path.name}"
        problem = file_problem(run_dir, name, files)
        if problem is None and (files is None or name not in files):
            problem = _zip_problem(path)
        if problem is None:
            if skipped:
                log.warning(
                    "skipped %s; the newest intact checkpoint is %s", "; ".join(skipped), path.name
                )
            return path, steps
        skipped.append(f"{path}: {problem}")
    raise ConfigError(
        f"no intact checkpoint in {run_dir / 'checkpoints'} ({'; '.join(skipped)}); delete the "
        "broken files to restart the run from step 0, or start a new run"
    )


def load_model(algo: str, path: Path, fix: str = RUN_FIX, **kwargs: Any) -> Any:
    """``algorithm(algo).load(path)`` on the CPU; a file that is not such a model (another
    algorithm, a truncated or foreign archive) is refused in one line naming it."""
    from persona_gym.errors import PersonaGymError

    try:
        return algorithm(algo).load(path, device="cpu", **kwargs)
    except PersonaGymError:
        raise
    except (
        zipfile.BadZipFile,
        AssertionError,
        KeyError,
        TypeError,
        ValueError,
        EOFError,
        RuntimeError,
        AttributeError,
    ) as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        if len(reason) > 300:
            reason = reason[:300] + "…"
        raise ConfigError(f"{path}: not a {algo} model that loads ({reason}); {fix}") from err


def ship_agent(
    run_dir: str | Path, dest: str | Path = SHIPPED_AGENT, steps: int | None = None
) -> Path:
    """Copy a trained run into ``dest`` as the package's shipped agent: ``model.zip`` (or the
    checkpoint of ``steps`` env steps), its features, periodic evaluation and learning curve, and
    a ``run.json``, both without the training machine's paths, and a ``manifest.json`` of their
    hashes (checked when the agent is loaded). The run's files are verified first. Replaces
    ``dest`` whole."""
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
    verify_files(run_dir, ["run.json", str(model.relative_to(run_dir)), FEATURES_FILE])
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        loaded = load_model(run["algo"], model)
        loaded.tensorboard_log = None  # a path of the training machine
        loaded.save(work / "model.zip")
        for name in SHIPPED_FILES[2:]:
            if (run_dir / name).is_file():
                shutil.copyfile(run_dir / name, work / name)
        run["config"]["out"] = "runs/agents"
        if steps is not None:
            run["timesteps"] = steps
        atomic_write_json(work / "run.json", run)
        record_files(work, *(name for name in SHIPPED_FILES if (work / name).is_file()))
        if dest.exists():
            shutil.rmtree(dest)
        work.chmod(0o755)  # mkdtemp makes 0700
        work.rename(dest)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return dest
