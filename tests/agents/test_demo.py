"""``persona-gym demo``'s answer line and the size of its default job (the run itself is in
``tests/test_cli_runs.py``)."""

from __future__ import annotations

import argparse

from agents import demo


def _results(ratings: dict[str, float], differences: list[tuple[str, str, float, float, float]]):
    policies = {
        name: {"simulator": {"mean_rating": {"mean": m, "low": m - 0.1, "high": m + 0.1}}}
        for name, m in ratings.items()
    }
    diffs = [
        {
            "a": a,
            "b": b,
            "metric": metric,
            "mean": mean,
            "low": low,
            "high": high,
            "distinguishable": low > 0 or high < 0,
        }
        for a, b, mean, low, high in differences
        for metric in ("mean_rating", "return")
    ]
    return {"policies": policies, "differences": diffs}


def test_best_policy_names_the_best_and_its_paired_gaps_to_the_runner_up_and_the_worst():
    results = _results(
        {"random": 3.2, "most-popular": 3.7, "mf": 4.4, "agent": 4.3},
        [
            ("random", "most-popular", -0.5, -0.7, -0.3),
            ("random", "mf", -1.2, -1.4, -1.0),
            ("random", "agent", -1.1, -1.3, -0.9),
            ("most-popular", "mf", -0.7, -0.9, -0.5),
            ("most-popular", "agent", -0.6, -0.8, -0.4),
            ("mf", "agent", 0.1, -0.02, 0.2),
        ],
    )
    assert demo.best_policy(results) == (
        "Best in the simulator: mf, mean rating 4.40 [4.30, 4.50]; paired: "
        "+0.10 [-0.02, +0.20] stars over agent, not distinguishable; "
        "+1.20 [+1.00, +1.40] stars over random."
    )


def test_best_policy_with_two_policies_names_the_other_once():
    results = _results({"a": 3.0, "b": 4.0}, [("a", "b", -1.0, -1.2, -0.8)])
    assert demo.best_policy(results) == (
        "Best in the simulator: b, mean rating 4.00 [3.90, 4.10]; paired: "
        "+1.00 [+0.80, +1.20] stars over a."
    )


def test_the_default_job_stays_small():
    """Nearly all of the demo's time is the simulated users rating, one rating per env step:
    at most (policies x episodes + training steps + the short run's two greedy evaluations) x
    the 20-step horizon. The budget behind these defaults: benchmarks/README.md (``make demo``)."""
    parser = argparse.ArgumentParser()
    demo.add_parser(parser.add_subparsers())
    args = parser.parse_args(["demo"])
    horizon = 20
    policies = len(demo.BASELINES) + 2  # the shipped agent and the short run
    ratings = (
        policies * args.episodes * horizon + args.train_steps + 2 * demo.TRAIN_EVAL_USERS * horizon
    )
    assert ratings <= 2500, ratings
    assert {"random", "most-popular", "mf"} <= set(demo.BASELINES)
