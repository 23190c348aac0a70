"""Evaluation, one package: of the simulated users (fidelity) and of policies.

* ``metrics`` (pure numpy): the fidelity metrics, the fidelity report, and the one NDCG
  (:func:`~persona_gym.evaluation.metrics.ndcg`, graded for fidelity, binary for policies);
* ``policy``: the policy evaluation's statistics (bootstrap intervals and their ranges,
  diversity, novelty, rank agreement) and ``policy_report`` its table, plot and files; the
  rollouts of ``persona-gym evaluate-policy``, which build the agents' policies, live in
  ``agents/evaluate.py``;
* ``baselines``: the collaborative-filtering models of the user model
  (:mod:`persona_gym.simulator.cf_models`, fitted on train + background) scored on the test split;
* ``configs`` (the paper's Table 1, the configuration specs, the choice of test rows),
  ``studies`` (first-3, prior alone, the simulator studies of ``fidelity``), ``sequential`` and
  ``sequential_study`` (the rolling-window study), ``report`` (report.md, results.json, plots):
  the parts of ``persona-gym evaluate``, whose command and model loading live in
  ``training/evaluate.py`` (:func:`training.evaluate.evaluate`, its ``FidelityEvalConfig``).
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
