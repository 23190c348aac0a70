"""Evaluation: hand-checked metrics, config specs, test selection, and the whole evaluate() path
on the tiny trained artifacts (with an injected test set: that fixture has no real split) and on
the protocol artifacts (the test set rebuilt from their ``split.json``)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest

from persona_gym.artifacts import rehash
from persona_gym.evaluation import metrics as M
from training.evaluate import (
    DEFAULT_CONFIGS,
    PAPER_TABLE,
    TABLE_CONFIGS,
    evaluate,
    parse_config,
    render_markdown,
    select_test,
)

# -- metrics ------------------------------------------------------------------------------------


def test_rmse_mae_urr_by_hand():
    pred = [3.0, 5.0, np.nan, 1.0]
    real = [4.0, 3.0, 5.0, 1.0]
    # finite rows: errors -1, 2, 0 -> MSE 5/3, MAE 1
    assert M.rmse(pred, real) == pytest.approx(math.sqrt(5 / 3))
    assert M.mae(pred, real) == pytest.approx(1.0)
    assert M.urr(pred) == pytest.approx(0.25)
    assert math.isnan(M.rmse([np.nan], [3.0])) and M.urr([]) == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        M.rmse([1, 2], [1])


def test_histograms():
    np.testing.assert_allclose(
        M.rating_histogram([1, 1.4, 2.5, 5, 7, np.nan]), [0.4, 0, 0.2, 0, 0.4]
    )
    probs = np.array([[1, 0, 0, 0, 0], [0, 0, 0.5, 0.5, 0]], float)
    np.testing.assert_allclose(M.mean_distribution(probs), [0.5, 0, 0.25, 0.25, 0])


def test_nll_and_ece_by_hand():
    probs = np.array(
        [
            [0.0, 0.0, 0.0, 0.2, 0.8],  # conf 0.8, argmax 5, real 5: correct
            [0.0, 0.0, 0.0, 0.2, 0.8],  # conf 0.8, argmax 5, real 4: wrong
            [0.0, 0.6, 0.4, 0.0, 0.0],  # conf 0.6, argmax 2, real 2: correct
        ]
    )
    real = [5, 4, 2]
    assert M.nll(probs, real) == pytest.approx(-(math.log(0.8) + math.log(0.2) + math.log(0.6)) / 3)
    # bin (0.7, 0.8]: conf 0.8, acc 0.5, weight 2/3; bin (0.5, 0.6]: conf 0.6, acc 1, weight 1/3
    assert M.expected_calibration_error(probs, real) == pytest.approx(2 / 3 * 0.3 + 1 / 3 * 0.4)
    table = M.reliability(probs, real)
    assert table["count"].tolist() == [0, 0, 0, 0, 0, 1, 0, 2, 0, 0]
    # a perfectly calibrated one-hot predictor: ECE 0, NLL 0
    onehot = np.eye(5)[[0, 4]]
    assert M.expected_calibration_error(onehot, [1, 5]) == 0 and M.nll(
        onehot, [1, 5]
    ) == pytest.approx(0)
    with pytest.raises(ValueError, match="1..5"):
        M.nll(onehot, [0, 5])


def test_ndcg_by_hand():
    users = [1, 1, 1, 2, 2]
    real = [3, 5, 1, 4, 4]
    perfect = M.ndcg_at_k(users, [3, 5, 1, 0, 0], real, k=10)
    assert perfect == pytest.approx(1.0)
    # user 1 reversed: order 1,3,5 -> gains 1,7,31 vs ideal 31,7,1; user 2 ties (equal gains) = 1
    d = 1 / np.log2([2, 3, 4])
    expected_u1 = (np.array([1, 7, 31]) @ d) / (np.array([31, 7, 1]) @ d)
    assert M.ndcg_at_k(users, [5, 3, 1, 0, 0], [1, 3, 5, 4, 4]) == pytest.approx(
        (expected_u1 + 1) / 2
    )
    # k cuts the list: only the top-1 counts
    assert M.ndcg_at_k([1, 1], [1, 2], [5, 1], k=1) == pytest.approx(1 / 31)
    # ties keep input order (no peeking at the real rating)
    assert M.ndcg_at_k([1, 1], [3, 3], [1, 5], k=1) == pytest.approx(1 / 31)
    floor = M.ndcg_random([1] * 20, np.r_[np.full(10, 1), np.full(10, 5)], k=10)
    assert 0.2 < floor < 1


def test_user_mean_correlation_and_report():
    users = [1, 1, 2, 2, 3]
    real = [5, 5, 1, 1, 3]
    assert M.user_mean_correlation(users, [4, 4, 2, 2, 3], real) == pytest.approx(1.0)
    assert M.user_mean_correlation(users, [2, 2, 4, 4, 3], real) == pytest.approx(-1.0)
    assert math.isnan(M.user_mean_correlation(users, [3, 3, 3, 3, 3], real))
    probs = np.eye(5)[[4, 3, 0, 1, 2]]
    report = M.fidelity_report(users, real, probs=probs, groups=[0, 0, 1, 1, 1])
    assert report["rmse"] == pytest.approx(math.sqrt(2 / 5))
    assert report["rmse_argmax"] == report["rmse"] and report["urr"] == 0
    assert report["per_group"][0]["n"] == 2 and report["per_group"][0]["rmse"] == pytest.approx(
        math.sqrt(0.5)
    )
    assert report["histogram_real"] == [0.4, 0, 0.2, 0, 0.4]


# -- configs and test selection ------------------------------------------------------------------


def test_parse_config_and_prompts():
    from persona_gym.simulator.prompts import PromptConfig

    trained = PromptConfig.paper(window_size=3, n_memories=1, use_profile=True, max_tokens=384)
    c = parse_config("persona:Ms+Ml")
    assert c.paper_no == 10 and c.adapter_label == "θpersona" and c.prompt(trained) == trained
    assert parse_config("base:Ml").prompt(trained) == PromptConfig.paper(
        window_size=3, n_memories=1, use_profile=False, max_tokens=384
    )
    assert parse_config("single-min:Ms").prompt(trained) == PromptConfig.paper(
        window_size=3, n_memories=0, use_profile=True, max_tokens=384
    )
    extra = parse_config("persona:Ms+Ml:w0:k3")
    assert extra.paper_no is None and extra.prompt(trained) == PromptConfig.paper(
        window_size=0, n_memories=3, use_profile=True, max_tokens=384
    )
    # k defaults to 1 (the paper's) when training used no memories
    assert (
        parse_config("base:Ms+Ml")
        .prompt(PromptConfig.paper(window_size=2, n_memories=0, use_profile=True, max_tokens=384))
        .n_memories
        == 1
    )
    for bad in ("persona", "persona:XY", "persona:Ms+Ml:z1", "persona:Ms:k2"):
        with pytest.raises(ValueError):
            parse_config(bad)
    assert {parse_config(s).paper_no for s in TABLE_CONFIGS} == {2, 3, 4, 5, 6, 7, 8, 9, 10}
    assert all(parse_config(s) for s in DEFAULT_CONFIGS) and PAPER_TABLE[10]["rmse"] == 1.171


def test_select_test_first_and_random():
    test = pd.DataFrame(
        {
            "user_id": [2, 1, 1, 1, 2],
            "item_id": [9, 3, 1, 2, 8],
            "item_index": [0, 1, 2, 3, 4],
            "rating": [1, 2, 3, 4, 5],
            "timestamp": [5, 30, 10, 20, 1],
        }
    )
    assert select_test(test)["item_id"].tolist() == [1, 2, 3, 8, 9]
    assert select_test(test)["gap"].tolist() == [0, 1, 2, 0, 1]  # earlier test rows of the user
    assert select_test(test, 2)["item_id"].tolist() == [1, 2, 8, 9]
    a = select_test(test, 2, "random", seed=3)
    assert a.equals(select_test(test, 2, "random", seed=3))
    assert a.groupby("user_id").size().tolist() == [2, 2]
    assert a.groupby("user_id")["timestamp"].apply(lambda s: s.is_monotonic_increasing).all()
    # a drawn row keeps its place among all the user's test rows
    for row in a.itertuples():
        assert row.gap == int(
            ((test.user_id == row.user_id) & (test.timestamp < row.timestamp)).sum()
        )


# -- end to end on the tiny artifacts ------------------------------------------------------------


def held_out_artifacts(src, dst, n_test: int = 2):
    """Copy the tiny artifacts and move each user's last ``n_test`` memories to a test set."""
    shutil.copytree(src, dst)
    memories = pd.read_parquet(dst / "memories.parquet").sort_values(["user_id", "timestamp"])
    last = memories.groupby("user_id").cumcount(ascending=False) < n_test
    memories[~last].to_parquet(dst / "memories.parquet", index=False)
    rehash(dst)  # a deliberate change of the artifacts: record it, or loading refuses the copy
    test = memories[last][["user_id", "item_id", "item_index", "rating", "timestamp"]]
    return dst, test.reset_index(drop=True)


@pytest.fixture(scope="module")
def held_out(trained_tiny_artifacts, tmp_path_factory):
    return held_out_artifacts(trained_tiny_artifacts, tmp_path_factory.mktemp("eval") / "art")


@pytest.fixture(scope="module")
def evaluated(held_out):
    root, test = held_out
    configs = ["base:Ms+Ml", "single-max:Ms", "single-min:Ms+Ml", "persona:Ms+Ml"]
    return (
        evaluate(root, configs, test=test, generation=True, generation_per_user=1, dtype="float32"),
        root,
        test,
    )


def test_evaluate_end_to_end(evaluated):
    results, root, test = evaluated
    by_spec = {c["spec"]: c for c in results["configs"]}
    assert by_spec["single-min:Ms+Ml"]["status"] == "skipped"  # the fixture has no single-min
    assert "single-min" in by_spec["single-min:Ms+Ml"]["reason"]
    persona = by_spec["persona:Ms+Ml"]
    assert persona["status"] == "ok" and not persona["prompt_differs_from_training"]
    assert by_spec["single-max:Ms"]["prompt_differs_from_training"]  # trained with Ml
    assert not by_spec["base:Ms+Ml"]["prompt_differs_from_training"]
    # the reported figures are those of the written predictions, by hand
    predictions = pd.read_parquet(root / "evaluation" / "predictions.parquet")
    real = predictions["rating"].to_numpy()
    probs = predictions[[f"p{r}:persona:Ms+Ml" for r in range(1, 6)]].to_numpy(np.float64)
    error = predictions["pred:persona:Ms+Ml"].to_numpy() - real
    e = persona["expected"]
    assert e["n"] == len(test) == 8 and e["urr"] == 0
    assert e["rmse"] == pytest.approx(math.sqrt(np.mean(error**2)))
    assert e["mae"] == pytest.approx(np.mean(np.abs(error)))
    assert e["nll"] == pytest.approx(
        -np.mean(np.log(probs[np.arange(8), real.astype(int) - 1])), rel=1e-5
    )
    assert e["ece"] == pytest.approx(M.expected_calibration_error(probs, real), rel=1e-5)
    assert set(e["per_group"]) == {0, 1}
    assert e["per_group"][0]["n"] == int((predictions["persona"] == 0).sum())
    gen = persona["generation"]
    from persona_gym.simulator.rating_model import parse_rating

    parsed = [parse_rating(text) for text in gen["examples"]]
    assert gen["n"] == len(gen["examples"]) == 4 and gen["urr"] == pytest.approx(
        np.mean(np.isnan(parsed))
    )
    assert set(results["baselines"]) >= {
        "global mean",
        "item mean",
        "user+item bias",
        "matrix factorisation",
    }
    # files: strict JSON, markdown in the paper layout, plots, predictions
    out = root / "evaluation"
    loaded = json.loads((out / "results.json").read_text(), parse_constant=lambda c: pytest.fail(c))
    assert loaded["configs"][0]["spec"] == "base:Ms+Ml"
    report = (out / "report.md").read_text()
    assert "| No. | Base Model | Adapter(s) | Memories Used | RMSE | MAE | URR |" in report
    assert (
        "(prompt differs from training)" in report
        and "1.171" in report
        and "matrix factorisation" in report
    )
    for name in ("histograms.png", "calibration.png", "persona_rmse.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert (
        len(predictions) == 8
        and "pred:persona:Ms+Ml" in predictions
        and "baseline:item mean" in predictions
    )
    # the CLI-facing renderer works on the written JSON too
    assert "beside the baselines" in render_markdown(results)
    # without baselines: no empty baselines table; one test row per user: no NDCG (always 1.0)
    bare = {**results, "baselines": {}, "data": {**results["data"], "max_test_per_user": 1}}
    text = render_markdown(bare)
    assert "beside the baselines" not in text and "NDCG@10 is not reported" in text
    assert "NDCG@10 is not reported" not in render_markdown(results)


def test_predictions_do_not_read_test_ratings(held_out, evaluated):
    """Perturbing the test ratings changes the errors but no prediction and no prompt."""
    root, test = held_out
    first = pd.read_parquet(root / "evaluation" / "predictions.parquet")
    flipped = test.assign(rating=6 - test["rating"])
    again = evaluate(root, ["persona:Ms+Ml"], test=flipped, write=False, dtype="float32")
    persona = again["configs"][0]["expected"]
    assert persona["rmse"] != evaluated[0]["configs"][3]["expected"]["rmse"]
    from training.evaluate import SharedModels, parse_config as parse  # noqa: I001
    from persona_gym.artifacts import load_artifacts

    art = load_artifacts(root)
    models = SharedModels(art, None, "cpu", "float32")
    config = parse("persona:Ms+Ml")
    sim = models.simulator(config, config.prompt(art.prompt_config))
    rows = select_test(test)
    windows = [sim.history(int(u))[-art.prompt_config.window_size :] for u in rows["user_id"]]
    probs = sim.rate(rows["user_id"].tolist(), rows["item_index"].tolist(), windows)
    np.testing.assert_allclose(probs @ np.arange(1, 6), first["pred:persona:Ms+Ml"], atol=1e-5)
    # windows are training interactions only
    test_pairs = set(zip(test["user_id"], test["item_index"], strict=True))
    assert not any(
        (u, x.item_index) in test_pairs
        for u, w in zip(rows["user_id"], windows, strict=True)
        for x in w
    )


def test_leaking_test_set_is_refused(trained_tiny_artifacts):
    memories = pd.read_parquet(trained_tiny_artifacts / "memories.parquet")
    leaked = memories.head(2)[["user_id", "item_id", "item_index", "rating", "timestamp"]]
    with pytest.raises(ValueError, match="leak"):
        evaluate(trained_tiny_artifacts, ["base:Ms"], test=leaked, write=False, baselines=False)


def test_evaluate_reads_the_test_set_through_split_json(protocol_artifacts):
    """Without an injected test set, ``evaluate()`` rebuilds the protocol split ``split.json``
    records (here: an ML-1M-format folder, 4 of its 6 users) and scores every test interaction
    of the simulated users against it; the baselines fit on the split's train + background."""
    from persona_gym.data import load_dataset
    from persona_gym.data.splits import protocol_split

    info = json.loads((protocol_artifacts / "split.json").read_text())
    split = protocol_split(load_dataset(info["dataset"]), **info["params"])
    test = split.test[split.test["user_id"].isin(info["distilled_user_ids"])]
    results = evaluate(
        protocol_artifacts,
        ["persona:Ms"],
        max_test_per_user=2,
        write=False,
        dtype="float32",
        studies=False,
    )
    data = results["data"]
    assert data["source"] == f"{info['dataset']} protocol split {info['params']}"
    assert (data["n_users"], data["n_test_total"], data["n_evaluated"]) == (4, len(test), 8)
    assert results["configs"][0]["status"] == "ok" and results["configs"][0]["expected"]["n"] == 8
    fit_on = pd.concat([split.train, split.background])["rating"]
    assert len(split.background) and fit_on.size == len(split.train) + len(split.background)
    full_test = results["baselines"]["global mean"]["full_test"]
    assert full_test["n"] == len(test)
    assert full_test["rmse"] == pytest.approx(
        math.sqrt(((test["rating"] - fit_on.mean()) ** 2).mean())
    )


def test_other_users_need_an_all_users_split_and_samples_are_seeded(protocol_artifacts):
    from persona_gym.artifacts import load_artifacts
    from persona_gym.data.protocol import logged_data
    from training.evaluate import sample_users

    with pytest.raises(ValueError, match="simulates no other users; distil with --all-users"):
        logged_data(load_artifacts(protocol_artifacts), "others")
    with pytest.raises(ValueError, match="users must be one of"):
        logged_data(load_artifacts(protocol_artifacts), "everyone")
    ids = [7, 3, 3, 9, 1, 7, 5]
    assert sample_users(ids, 10, seed=0).tolist() == [1, 3, 5, 7, 9]  # fewer than asked: all
    picked = sample_users(ids, 3, seed=0)
    assert len(picked) == 3 and set(picked) <= {1, 3, 5, 7, 9} and list(picked) == sorted(picked)
    assert np.array_equal(picked, sample_users(ids, 3, seed=0))
    assert len({tuple(sample_users(ids, 3, seed=s)) for s in range(10)}) > 1
    with pytest.raises(ValueError, match="max_users must be >= 1"):
        sample_users(ids, 0, seed=0)


def test_split_json_mismatch_is_named(held_out, tmp_path):
    from persona_gym.artifacts import load_artifacts
    from persona_gym.data.protocol import logged_data

    root, _ = held_out
    copy = tmp_path / "art"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("evaluation"))
    (copy / "split.json").write_text(
        json.dumps(
            {
                "dataset": "ml-100k",
                "params": {
                    "n_users": 4,
                    "min_interactions": 100,
                    "max_interactions": 200,
                    "train_fraction": 0.6,
                    "seed": 0,
                },
                "user_ids": [0, 1, 2, 3],
            }
        )
    )
    rehash(copy)
    with pytest.raises(ValueError, match="selects other users"):
        logged_data(load_artifacts(copy))


def test_cli_parser():
    import argparse

    from training.evaluate import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "evaluate",
            "--artifacts",
            "x",
            "--configs",
            "persona:Ms+Ml",
            "base:Ms",
            "--max-test-per-user",
            "10",
            "--generation",
        ]
    )
    assert args.configs == ["persona:Ms+Ml", "base:Ms"] and args.max_test_per_user == 10
    assert args.generation and args.func.__name__ == "run_evaluate" and args.subsample == "first"
