"""``persona-gym evaluate-policy`` for a newcomer: the policy names checked before anything
loads (and no empty ``--out`` left behind), a progress line per policy and seed on stderr,
intervals inside each metric's range, a rank agreement only with enough policies."""

from __future__ import annotations

import pandas as pd
import pytest

from agents.evaluate import PolicyEvalConfig, evaluate_policies, simulate, summarize_episodes
from agents.policies import RandomPolicy, make_policy
from persona_gym.evaluation.policy import METRIC_BOUNDS, MIN_AGREEMENT_POLICIES, bootstrap_ci
from tests.test_reliability_cli import assert_one_line, run


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if evaluate-policy starts loading a simulator."""

    def started(*args, **kwargs):
        raise AssertionError("evaluate-policy loaded the simulator before checking the names")

    monkeypatch.setattr("agents.evaluate.load_evaluation", started)


def test_a_misspelt_policy_is_refused_before_loading_and_leaves_no_out(
    capsys, tmp_path, no_loading
):
    out = tmp_path / "nested" / "eval"
    line = assert_one_line(
        run(capsys, "evaluate-policy", "--policies", "random", "item-maen", "--out", out),
        "evaluate-policy",
        "'item-maen'",
        "random, most-popular, item-mean, mf, window-greedy, simulator-greedy, agent",
        "persona-gym train-agent",
    )
    assert len(line) < 250
    assert not out.exists() and not (tmp_path / "nested").exists()


def test_run_folders_and_model_files_pass_the_name_check(tmp_path):
    from agents.evaluate import check_policy_names
    from persona_gym.errors import ConfigError

    (tmp_path / "run").mkdir()
    (tmp_path / "model.zip").write_bytes(b"")
    check_policy_names(["random", "agent", str(tmp_path / "run"), str(tmp_path / "model.zip")])
    with pytest.raises(ConfigError, match="unknown policy 'nope'"):
        check_policy_names(["mf", "nope"])


def test_a_failed_load_removes_the_out_folder_it_made(capsys, tmp_path, monkeypatch):
    from persona_gym.errors import ConfigError

    def broken(*args, **kwargs):
        raise ConfigError("no simulator here")

    monkeypatch.setattr("agents.evaluate.load_evaluation", broken)
    out, kept = tmp_path / "eval", tmp_path / "kept"
    kept.mkdir()
    code, _, err = run(capsys, "evaluate-policy", "--policies", "random", "--out", out)
    assert code == 2 and "no simulator here" in err and not out.exists()
    assert run(capsys, "evaluate-policy", "--policies", "random", "--out", kept)[0] == 2
    assert kept.is_dir()  # a folder the user made stays


def _logged_test(core) -> pd.DataFrame:
    users = core.user_ids
    return pd.DataFrame(
        {
            "user_id": users * 2,
            "item_index": [0] * len(users) + [3] * len(users),
            "rating": [5.0] * len(users) + [2.0] * len(users),
            "timestamp": [1] * len(users) + [2] * len(users),
        }
    )


def test_one_progress_line_per_policy_and_seed_on_stderr(
    capsys, tmp_path, monkeypatch, core, ratings
):
    monkeypatch.setattr(
        "agents.evaluate.load_evaluation",
        lambda *args, **kwargs: (core, ratings, _logged_test(core), 4),
    )
    code, out, err = run(
        capsys,
        "evaluate-policy",
        "--policies",
        "random",
        "most-popular",
        "--episodes",
        "2",
        "--seeds",
        "0",
        "1",
        "--n-envs",
        "2",
        "--out",
        tmp_path / "eval",
    )
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.startswith("evaluate-policy: ")]
    seeds = [line for line in lines if " seed " in line]
    assert [line.split(":")[1].strip() for line in seeds] == [
        "random seed 0",
        "random seed 1",
        "most-popular seed 0",
        "most-popular seed 1",
    ]
    assert all("2 episodes, mean rating " in line for line in seeds)
    assert lines[0].startswith("evaluate-policy: loading the PersonaML100K-v0 simulator")
    assert sum("logged test interactions of" in line for line in lines) == 2
    assert "evaluate-policy:" not in out  # progress on stderr, the table on stdout
    assert (tmp_path / "eval" / "report.md").exists()


def test_progress_is_optional_and_called_per_seed(core):
    lines: list[str] = []
    config = PolicyEvalConfig(episodes=2, seeds=(0, 1, 2), n_envs=2)
    evaluate_policies(core, {"random": RandomPolicy(0)}, config, None, 4, progress=lines.append)
    assert [line.split(":")[0] for line in lines] == [f"random seed {s}" for s in (0, 1, 2)]
    assert evaluate_policies(core, {"random": RandomPolicy(0)}, config, None, 4)["policies"]


def test_the_bootstrap_interval_is_clipped_to_the_statistics_range():
    # the share of distinct units a resample holds: 1 on all units, about 0.63 on a resample,
    # so the bias shift carries the percentile interval above 1
    def share(idx):
        return len(set(idx.tolist())) / 50

    value, low, high = bootstrap_ci(50, share, seed=0)
    assert value == 1.0 and high > 1.0  # the unclipped interval leaves the range
    value, low, high = bootstrap_ci(50, share, seed=0, bounds=(0.0, 1.0))
    assert value == 1.0 and high == 1.0 and 0.0 <= low <= value


def test_every_reported_interval_lies_in_its_metrics_range(core, ratings):
    policies = {n: make_policy(n, core, ratings) for n in ("random", "most-popular", "mf")}
    config = PolicyEvalConfig(episodes=4, seeds=(0, 1), n_envs=2, k=2)
    results = evaluate_policies(core, policies, config, _logged_test(core), n_users=4)
    checked = 0
    for entry in results["policies"].values():
        for section in ("simulator", "logged"):
            for metric, ci in entry.get(section, {}).items():
                if metric in METRIC_BOUNDS and isinstance(ci, dict):
                    low, high = METRIC_BOUNDS[metric]
                    assert low <= ci["low"] <= ci["mean"] <= ci["high"] <= high, (metric, ci)
                    checked += 1
    assert checked >= 3 * 7
    for d in results["differences"]:
        if d["metric"] == "mean_rating":
            assert -4.0 <= d["low"] <= d["high"] <= 4.0


def test_summaries_of_an_all_high_share_stay_at_most_one(core):
    records = [r for s in range(3) for r in simulate(RandomPolicy(0), core, 4, s, 2)]
    for r in records:  # every sampled rating a 5: the share of ratings >= 4 is exactly 1
        r["sampled"] = [5] * len(r["sampled"])
    summary = summarize_episodes(records, core, 4)
    assert summary["share_ge4"]["high"] <= 1.0 and summary["churn"]["high"] <= 1.0
    assert summary["coverage"]["high"] <= 1.0


def test_agreement_needs_at_least_four_policies(core):
    test = _logged_test(core)
    base = {f"random-{i}": RandomPolicy(i) for i in range(MIN_AGREEMENT_POLICIES)}
    config = PolicyEvalConfig(episodes=2, n_envs=2, k=2)
    with_four = evaluate_policies(core, base, config, test, n_users=4)
    assert with_four["agreement"]["mean_rating_vs_ndcg"]["n_policies"] == MIN_AGREEMENT_POLICIES
    for n in (2, 3):
        fewer = evaluate_policies(core, dict(list(base.items())[:n]), config, test, n_users=4)
        assert "agreement" not in fewer
        from persona_gym.evaluation.policy_report import format_table

        assert f"({n} here)" in format_table(fewer) and "Kendall" not in format_table(fewer)
