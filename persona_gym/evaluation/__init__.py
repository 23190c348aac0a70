"""Evaluation of simulated users: fidelity metrics and collaborative-filtering baselines.

``metrics`` (pure numpy) and ``baselines`` (numpy CF models fitted on train + background) are
reusable outside the simulator evaluation, e.g. for offline policy evaluation. The
``persona-gym evaluate`` command lives in ``training/evaluate.py``.
"""

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
from persona_gym.simulator.cf_models import (
    BiasedMF,
    BiasModel,
    GlobalMean,
    ItemMean,
    run_baselines,
    validation_split,
)

__all__ = [
    "BiasModel",
    "BiasedMF",
    "GlobalMean",
    "ItemMean",
    "expected_calibration_error",
    "fidelity_report",
    "mae",
    "ndcg_at_k",
    "nll",
    "rmse",
    "run_baselines",
    "urr",
    "user_mean_correlation",
    "validation_split",
]
