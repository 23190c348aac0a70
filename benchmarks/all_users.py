"""Fidelity of an ``--all-users`` simulator for the adapters' training users and for the users
they never saw, side by side, as a Markdown table.

Reads the two reports ``persona-gym build DATASET --all-users`` (its evaluate stage) writes:
``DIR/evaluation/results.json`` (the protocol users) and ``DIR/evaluation/others/results.json``
(the other simulated users). Run from the repository root::

    python benchmarks/all_users.py artifacts/ml100k-all
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

SIMULATOR = "persona:Ms+Ml"
BASELINES = (
    "matrix factorisation",
    "item kNN",
    "user+item bias",
    "item mean",
    "collaborative prior alone (no SLM)",
)


def _f(value: float | None, spec: str = ".3f") -> str:
    """``value`` formatted, ``-`` where the report has none (too few rows per user)."""
    return "-" if value is None else format(value, spec)


def _rows(results: dict) -> dict[str, str]:
    """The figures of one report, formatted, keyed by row label."""
    config = next(c for c in results["configs"] if c["spec"] == SIMULATOR)
    sim = config["expected"]
    studies = results.get("studies", {})
    specificity = studies.get("persona_specificity", {})
    memory = studies.get("memory", {})
    landscape = studies.get("landscape", {}).get("simulator", {})
    rows = {
        "users / rated test interactions": f"{results['data']['n_users']} / {sim['n']}",
        f"simulator ({SIMULATOR}) RMSE / MAE / NLL": f"{sim['rmse']:.4f} / {sim['mae']:.4f} / {sim['nll']:.3f}",
    }
    for name in BASELINES:
        if name in results["baselines"]:
            rows[f"{name} RMSE"] = f"{results['baselines'][name]['evaluated_rows']['rmse']:.4f}"
    within = sim["within_user"]
    rows["within-user Pearson / Spearman"] = f"{_f(within['pearson'])} / {_f(within['spearman'])}"
    mf_within = (
        results["baselines"]
        .get("matrix factorisation", {})
        .get("evaluated_rows", {})
        .get("within_user")
    )
    if mf_within:
        rows["within-user Pearson, MF"] = _f(mf_within["pearson"])
    rows["within-user std, predicted / real"] = (
        f"{_f(within['std_pred'])} / {_f(within['std_real'])}"
    )
    if specificity:
        rows["own persona adapter best (RMSE / NLL; chance)"] = (
            f"{specificity['own_best_share']:.0%} / {specificity['own_best_share_nll']:.0%}; "
            f"{specificity['chance']:.0%}"
        )
        rows["RMSE own / other adapters"] = (
            f"{specificity['own_rmse']:.4f} / {specificity['other_rmse']:.4f}"
        )
    if memory:
        rows["memory slope, simulated / real"] = (
            f"{memory['simulated_slope']:.3f} / {memory['real_slope']:.3f}"
        )
    if landscape:
        rows["reward landscape: within-user std, top-10 minus mean"] = (
            f"{landscape['within_user_std']:.3f}, {landscape['top_minus_mean']:.3f}"
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "artifacts", type=Path, help="artifacts built with `persona-gym build ... --all-users`"
    )
    args = parser.parse_args()
    paths = [
        args.artifacts / "evaluation" / "results.json",
        args.artifacts / "evaluation" / "others" / "results.json",
    ]
    for path in paths:
        if not path.exists():
            raise SystemExit(
                f"{path} not found: build with `persona-gym build DATASET --all-users --out "
                f"{args.artifacts}` (its evaluate stage writes both reports)"
            )
    training, others = (_rows(json.loads(p.read_text())) for p in paths)
    print("| | adapters' training users | users the adapters never saw |")
    print("|---|---|---|")
    for label, value in training.items():
        print(f"| {label} | {value} | {others.get(label, '-')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
