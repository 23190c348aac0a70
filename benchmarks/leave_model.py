"""Fit the leave model on ML-100k's training data and print its held-out calibration.

Training data: the protocol split's train part plus the background users (everything but the
test part); held out: the protocol split's test part. Writes ``benchmarks/leave/calibration.json``
and, with ``--ship``, the model the environment's ``leave_rule="model"`` uses by default
(``persona_gym/default_artifacts/leave_model.json``).

    python benchmarks/leave_model.py [--gap 3600] [--ship]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from persona_gym.data import load_dataset, protocol_split
from persona_gym.io import atomic_write_json
from persona_gym.leave import DEFAULT_GAP_SECONDS, SHIPPED_LEAVE_MODEL, calibration, fit_leave_model

HERE = Path(__file__).parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--gap",
        type=float,
        default=DEFAULT_GAP_SECONDS,
        help="session gap in seconds (default: one hour)",
    )
    parser.add_argument("--bins", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ship", action="store_true", help="also write the shipped model")
    parser.add_argument("--out", type=Path, default=HERE / "leave" / "calibration.json")
    args = parser.parse_args()

    split = protocol_split(load_dataset("ml-100k"))
    train = pd.concat([split.train, split.background], ignore_index=True)
    model = fit_leave_model(
        train,
        gap=args.gap,
        seed=args.seed,
        metadata={"data": "ml-100k protocol split train + background", "split_seed": split.seed},
    )
    table = calibration(model, split.test, n_bins=args.bins)
    atomic_write_json(
        args.out, {"model": model.to_dict(), "held_out": "ml-100k protocol split test", **table}
    )
    if args.ship:
        model.save(SHIPPED_LEAVE_MODEL)

    print(f"leave model (gap {args.gap:.0f} s): intercept {model.intercept:+.4f}")
    for name, coef in zip(model.features, model.coefficients, strict=True):
        print(f"  {name:24s} {coef:+.4f}")
    print(
        f"held-out: {table['n']} ratings, leave rate {table['leave_rate']:.4f}, "
        f"mean predicted {table['mean_predicted']:.4f}"
    )
    print(f"{'bin (predicted range)':>22s} {'predicted':>10s} {'observed':>10s} {'count':>7s}")
    for b in table["bins"]:
        print(
            f"{b['lo']:.4f}-{b['hi']:.4f}   {b['mean_predicted']:10.4f} {b['observed']:10.4f} "
            f"{b['count']:7d}"
        )
    print(f"Brier {table['brier']:.5f} (base rate {table['base_rate_brier']:.5f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
