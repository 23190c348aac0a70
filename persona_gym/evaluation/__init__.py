"""Evaluation of simulated users: fidelity metrics and collaborative-filtering baselines.

``metrics`` (pure numpy) is reusable outside the simulator evaluation, e.g. for offline policy
evaluation; ``baselines`` scores the collaborative-filtering models of the user model
(:mod:`persona_gym.simulator.cf_models`, numpy, fitted on train + background) on the test split.
The ``persona-gym evaluate`` command lives in ``training/evaluate.py``.
"""

from persona_gym.evaluation.baselines import run_baselines
from persona_gym.evaluation.metrics import (
    expected_calibration_error,
    fidelity_report,
    mae,
    ndcg_at_k,
    nll,
    rmse,
    urr,
    user_mean_correlation,
)

__all__ = [
    "expected_calibration_error",
    "fidelity_report",
    "mae",
    "ndcg_at_k",
    "nll",
    "rmse",
    "run_baselines",
    "urr",
    "user_mean_correlation",
]
