"""What ``persona-gym evaluate`` evaluates: the paper's Table 1, the configuration specs
(``VARIANT:MEMORIES[:wN][:kN]``) and the choice of test rows."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from persona_gym.simulator.prompt_config import PromptConfig

# The paper's Table 1 (arXiv 2509.09689; MovieLens-1M, Phi-3-Mini / LLaMA-3-8B, generation mode).
PAPER_TABLE: dict[int, dict] = {
    0: {
        "base": "LLaMA-3",
        "adapter": "-",
        "memories": "Ms",
        "rmse": 1.158,
        "mae": 0.847,
        "urr": 0.0,
    },
    1: {
        "base": "LLaMA-3",
        "adapter": "-",
        "memories": "Ms + Ml",
        "rmse": 1.221,
        "mae": 0.883,
        "urr": 0.0,
    },
    2: {
        "base": "LLaMA-3",
        "adapter": "-",
        "memories": "Ml",
        "rmse": 1.229,
        "mae": 0.888,
        "urr": 0.0,
    },
    3: {
        "base": "Phi-3-Mini",
        "adapter": "-",
        "memories": "Ms",
        "rmse": 1.203,
        "mae": 0.863,
        "urr": 0.0423,
    },
    4: {
        "base": "Phi-3-Mini",
        "adapter": "-",
        "memories": "Ms + Ml",
        "rmse": 1.315,
        "mae": 0.952,
        "urr": 0.0293,
    },
    5: {
        "base": "Phi-3-Mini",
        "adapter": "θsingle (max)",
        "memories": "Ms",
        "rmse": 1.312,
        "mae": 0.940,
        "urr": 0.0130,
    },
    6: {
        "base": "Phi-3-Mini",
        "adapter": "θsingle (min)",
        "memories": "Ms",
        "rmse": 1.180,
        "mae": 0.848,
        "urr": 0.0193,
    },
    7: {
        "base": "Phi-3-Mini",
        "adapter": "θsingle (max)",
        "memories": "Ms + Ml",
        "rmse": 1.150,
        "mae": 0.834,
        "urr": 0.0115,
    },
    8: {
        "base": "Phi-3-Mini",
        "adapter": "θsingle (min)",
        "memories": "Ms + Ml",
        "rmse": 1.337,
        "mae": 1.042,
        "urr": 0.0301,
    },
    9: {
        "base": "Phi-3-Mini",
        "adapter": "θpersona",
        "memories": "Ms",
        "rmse": 1.292,
        "mae": 0.937,
        "urr": 0.0229,
    },
    10: {
        "base": "Phi-3-Mini",
        "adapter": "θpersona",
        "memories": "Ms + Ml",
        "rmse": 1.171,
        "mae": 0.881,
        "urr": 0.0177,
    },
}

TABLE_CONFIGS = (
    "base:Ms",
    "base:Ms+Ml",
    "base:Ml",
    "single-max:Ms",
    "single-min:Ms",
    "single-max:Ms+Ml",
    "single-min:Ms+Ml",
    "persona:Ms",
    "persona:Ms+Ml",
)
EXTRA_CONFIGS = ("persona:Ms+Ml:w0", "persona:Ms+Ml:k2", "persona:Ms+Ml:k3")
DEFAULT_CONFIGS = TABLE_CONFIGS + EXTRA_CONFIGS

_PAPER_NO = {
    ("base", "Ms"): 3,
    ("base", "Ms+Ml"): 4,
    ("base", "Ml"): 2,
    ("single-max", "Ms"): 5,
    ("single-min", "Ms"): 6,
    ("single-max", "Ms+Ml"): 7,
    ("single-min", "Ms+Ml"): 8,
    ("persona", "Ms"): 9,
    ("persona", "Ms+Ml"): 10,
}
_ADAPTER_LABEL = {
    "base": "-",
    "persona": "θpersona",
    "single-max": "θsingle (max)",
    "single-min": "θsingle (min)",
    "user": "θuser",
}
_MEMORIES = {"Ms": (True, False), "Ms+Ml": (True, True), "Ml": (False, True)}


@dataclass(frozen=True)
class EvalConfig:
    """One evaluated configuration: which adapters rate, and what the prompt holds."""

    spec: str
    variant: str  # "base" | "persona" | "single-max" | "single-min" | "user" | an adapter name
    memories: str  # "Ms" | "Ms+Ml" | "Ml"
    window_size: int | None = None  # None: the training prompt's
    n_memories: int | None = None  # None: the training prompt's n_memories (or 1); used with Ml

    @property
    def paper_no(self) -> int | None:
        """The paper's row with the same adapter and memories (only for the Table 1 specs)."""
        if self.window_size is not None or self.n_memories is not None:
            return None
        return _PAPER_NO.get((self.variant, self.memories))

    @property
    def adapter_label(self) -> str:
        return _ADAPTER_LABEL.get(self.variant, self.variant)

    @property
    def memories_label(self) -> str:
        return self.memories.replace("+", " + ")

    def prompt(self, trained: PromptConfig) -> PromptConfig:
        """The PromptConfig of this configuration, from the training prompt ``trained``."""
        use_profile, use_ml = _MEMORIES[self.memories]
        k = self.n_memories if self.n_memories is not None else (trained.n_memories or 1)
        window = self.window_size if self.window_size is not None else trained.window_size
        return dataclasses.replace(
            trained, window_size=window, n_memories=k if use_ml else 0, use_profile=use_profile
        )


def parse_config(spec: str) -> EvalConfig:
    """``VARIANT:MEMORIES[:wN][:kN]``, e.g. ``persona:Ms+Ml``, ``base:Ml``, ``persona:Ms+Ml:w0``."""
    parts = [p.strip() for p in spec.split(":")]
    if len(parts) < 2 or parts[1] not in _MEMORIES:
        raise ValueError(
            f"config {spec!r}: expected VARIANT:MEMORIES[:wN][:kN] with MEMORIES one of "
            f"{sorted(_MEMORIES)}, e.g. 'persona:Ms+Ml' or 'persona:Ms+Ml:w0'"
        )
    window = k = None
    for extra in parts[2:]:
        if len(extra) < 2 or extra[0] not in "wk" or not extra[1:].isdigit():
            raise ValueError(
                f"config {spec!r}: option {extra!r} is not wN (window) or kN (memories)"
            )
        if extra[0] == "w":
            window = int(extra[1:])
        else:
            k = int(extra[1:])
    if k is not None and parts[1] == "Ms":
        raise ValueError(f"config {spec!r}: kN (retrieved memories) needs Ml in MEMORIES")
    return EvalConfig(spec, parts[0], parts[1], window, k)


def select_test(
    test: pd.DataFrame, max_per_user: int | None = None, subsample: str = "first", seed: int = 0
) -> pd.DataFrame:
    """Each user's test rows in time order; with ``max_per_user``, the first N (``subsample=
    "first"``) or N drawn with ``seed`` (``"random"``), kept in time order. Column ``gap``: the
    user's test rows before each one (those between the evaluator's window and it)."""
    if subsample not in ("first", "random"):
        raise ValueError(f"subsample must be 'first' or 'random', got {subsample!r}")
    ordered = test.sort_values(["user_id", "timestamp", "item_id"], kind="stable").reset_index(
        drop=True
    )
    ordered["gap"] = ordered.groupby("user_id").cumcount()
    if max_per_user is None:
        return ordered
    if max_per_user < 1:
        raise ValueError(f"max_per_user must be >= 1, got {max_per_user}")
    if subsample == "first":
        return ordered.groupby("user_id", sort=True).head(max_per_user).reset_index(drop=True)
    rng = np.random.default_rng(seed)
    keys = rng.random(len(ordered))
    rank = pd.Series(keys).groupby(ordered["user_id"].to_numpy()).rank(method="first").to_numpy()
    return ordered[rank <= max_per_user].reset_index(drop=True)
