"""YAML configurations of the registered environments (``envs_config/<name>.yaml``).

Each file holds the fields of :class:`persona_gym.envs.config.EnvConfig`; the registered ids
name a file (``PersonaML100K-v0`` → ``ml100k``, ``PersonaML1M-v0`` → ``ml1m``). Parsing and
validation live in :mod:`persona_gym.envs.config`; this package only finds and reads the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).resolve().parent

__all__ = ["CONFIG_DIR", "available", "config_path", "read_config"]


def available() -> list[str]:
    """Names of the bundled configurations (file stems), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """The YAML file of a bundled config name (``"ml100k"``) or of a path to a ``.yaml`` file."""
    text = str(name_or_path)
    if text.endswith((".yaml", ".yml")) or "/" in text or "\\" in text:
        path = Path(text).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"environment config file {path} does not exist")
        return path
    path = CONFIG_DIR / f"{text}.yaml"
    if not path.is_file():
        raise FileNotFoundError(
            f"no environment config named {text!r}; bundled configs: {available()} "
            "(or pass the path of a .yaml file)"
        )
    return path


def read_config(name_or_path: str | Path) -> tuple[dict[str, Any], Path]:
    """The mapping stored in a config file (``yaml.safe_load``) and the file's path."""
    from persona_gym.errors import ConfigError

    path = config_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(
            f"{path}{where}: not valid YAML ({getattr(err, 'problem', None) or err}); "
            "fix the file (one `field: value` per line)"
        ) from err
    if data is None:
        raise ConfigError(
            f"{path} is empty: write the EnvConfig fields that differ from the "
            "defaults (e.g. `artifacts: path/to/artifacts`), or use a bundled config "
            f"{available()}"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping of EnvConfig fields, got {type(data).__name__}"
        )
    return data, path
