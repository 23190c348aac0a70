"""Adapter training on a tiny random Llama: variants, artifacts, resume after a kill."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from persona_gym.artifacts import SCHEMA_VERSION, load_artifacts
from persona_gym.simulator.prompts import PromptConfig
from tests.conftest import trained_tiny_config
from training import adapter_training as train_module
from training.train import TrainConfig, train


def config(base: str, **overrides) -> TrainConfig:
    values = dict(
        base_model=base,
        rank=4,
        alpha=8,
        lora_layers=2,
        epochs=2,
        batch_examples=4,
        blocks_per_sequence=2,
        max_examples_per_user=0,
        val_per_user=1,
        eval_every=2,
        patience=100,
        checkpoint_every=2,
        learning_rate=1e-2,
        prompt=PromptConfig.paper(window_size=2, n_memories=1, max_tokens=256),
    )
    values.update(overrides)
    return TrainConfig(**values)


def adapter_weights(root, name):
    return load_file(root / "adapters" / name / "adapter_model.safetensors")


def test_train_writes_every_variant_and_a_loadable_manifest(
    tmp_path, trained_tiny_artifacts, tiny_base, caplog
):
    """Adding single-min to the trained fixture (persona, single-max): a loadable manifest of
    every variant; the adapters trained before are skipped and kept bit for bit, the frozen-layer
    activations reused."""
    art = shutil.copytree(trained_tiny_artifacts, tmp_path / "art")
    before = {name: adapter_weights(art, name) for name in ("persona-0", "persona-1", "single-max")}
    with caplog.at_level(logging.INFO, logger="training.train"):
        manifest = train(
            art,
            trained_tiny_config(tiny_base, variants=("persona", "single-max", "single-min")),
            progress=False,
        )
    for name in before:
        assert f"adapter {name}: already trained, skipping" in caplog.text
    assert "adapter single-min: already trained" not in caplog.text
    assert "reusing frozen-layer activations" in caplog.text
    assert set(manifest["adapters"]) == {"persona-0", "persona-1", "single-max", "single-min"}
    for name, weights in before.items():
        after = adapter_weights(art, name)
        for key in weights:
            torch.testing.assert_close(weights[key], after[key], rtol=0, atol=0)
    loaded = load_artifacts(art)
    assert loaded.adapter_of(3) == "persona-1"
    for name, folder in loaded.adapter_dirs.items():
        assert (folder / "adapter_config.json").exists(), name
        cfg = json.loads((folder / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and cfg["layers_to_transform"] == [2, 3]
    metrics = manifest["metrics"]["adapters"]
    # 4 users x 6 interactions, 1 validation each -> 5 training examples per user
    assert (
        metrics["persona-0"]["train_examples"] == 10 and metrics["persona-0"]["val_examples"] == 2
    )
    assert (
        metrics["single-max"]["train_examples"] == 10 and metrics["single-min"]["val_examples"] == 4
    )
    # the best validation RMSE is one of the evaluations', the lowest up to the 1e-4 it must improve by
    rmses = [h["rmse"] for h in metrics["single-min"]["history"]]
    best = metrics["single-min"]["best_val_rmse"]
    assert len(rmses) == 2 and best in rmses and best <= min(rmses) + 1e-4
    assert manifest["versions"]["torch"] and manifest["schema_version"] == SCHEMA_VERSION


def test_training_changes_the_lora_weights_and_lowers_the_loss(artifacts, tiny_base):
    manifest = train(
        artifacts, config(tiny_base, variants=("single-max",), epochs=6), progress=False
    )
    history = manifest["metrics"]["adapters"]["single-max"]["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    weights = adapter_weights(artifacts, "single-max")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())


def test_same_seed_same_adapters(artifacts, trained_tiny_artifacts, tiny_base):
    """The fixture's settings on the same tables train its persona adapters again, bit for bit."""
    train(artifacts, trained_tiny_config(tiny_base, variants=("persona",)), progress=False)
    for name in ("persona-0", "persona-1"):
        a, b = adapter_weights(artifacts, name), adapter_weights(trained_tiny_artifacts, name)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_killed_run_resumes_to_the_same_result(tmp_path, artifacts, tiny_base, monkeypatch, caplog):
    """Interrupted in its 6th step (after the checkpoint of step 4), a run resumes there and ends
    with the uninterrupted run's adapter and item projection, bit for bit up to float noise
    (``test_kill_resume.py``: a SIGKILLed ``persona-gym train`` on text prompts)."""
    other = tmp_path / "other"
    shutil.copytree(artifacts, other)
    prompt = PromptConfig.paper(window_size=2, n_memories=1, max_tokens=256, item_tokens=True)
    cfg = config(tiny_base, variants=("single-max",), epochs=3, prompt=prompt)
    train(artifacts, cfg, progress=False)

    real_loss, calls = train_module._loss, {"n": 0}

    def dying_loss(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt("simulated kill")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train_module, "_loss", dying_loss)
    with pytest.raises(KeyboardInterrupt):
        train(other, cfg, progress=False)
    assert (other / "checkpoints" / "single-max.pt").exists()
    assert not (other / "adapters" / "single-max").exists()
    monkeypatch.setattr(train_module, "_loss", real_loss)
    with caplog.at_level(logging.INFO, logger="training.adapter_training"):
        train(other, cfg, progress=False)
    assert "resumed from" in caplog.text and "at step 4" in caplog.text
    a, b = adapter_weights(artifacts, "single-max"), adapter_weights(other, "single-max")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    a, b = (
        torch.load(root / "adapters" / "single-max" / "item_tokens.pt", weights_only=True)
        for root in (artifacts, other)
    )  # the item projection resumes too
    torch.testing.assert_close(a["weight"], b["weight"], rtol=1e-5, atol=1e-6)
    assert a["weight"].abs().sum() > 0


def test_bad_config_values_are_named():
    with pytest.raises(ValueError, match="TrainConfig.variants: unknown"):
        TrainConfig(variants=("everyone",))
    with pytest.raises(ValueError, match="TrainConfig.rank must be >= 1"):
        TrainConfig(rank=0)
    with pytest.raises(ValueError, match="TrainConfig.dropout"):
        TrainConfig(dropout=1.5)


def test_missing_distill_outputs_name_the_command(tmp_path, tiny_base):
    from persona_gym.artifacts import ArtifactsError

    with pytest.raises(ArtifactsError, match="persona-gym distill"):
        train(tmp_path, config(tiny_base), progress=False)


@pytest.mark.integration
def test_shipped_artifacts_regenerate_their_tables(tmp_path, protocol_artifacts, monkeypatch):
    """A shipped simulator carries no MovieLens tables; they are rebuilt identically on first
    use (from the dataset its ``split.json`` records), once: a second resolve rewrites nothing."""
    import warnings

    from persona_gym import registry
    from persona_gym.artifacts import export_shippable, rehash, resolve_artifacts
    from persona_gym.artifacts import shipped as shipped_module

    shipped = tmp_path / "package" / "ml100k"
    export_shippable(protocol_artifacts, shipped)
    assert not (shipped / "memories.parquet").exists() and not (shipped / "profiles.jsonl").exists()
    monkeypatch.setattr(registry, "SHIPPED_DIR", shipped.parent)
    import persona_gym.simulator.collaborative as collaborative

    original = collaborative.load_collaborative(protocol_artifacts / "collaborative.npz")
    assert json.loads((shipped / "collaborative.json").read_text()) == original.params
    with warnings.catch_warnings(), monkeypatch.context() as patch:
        warnings.simplefilter("error")  # a digest mismatch would warn
        # the shipped parameters: the collaborative model is refitted without its tuning
        patch.setattr(collaborative, "tune", lambda *a, **k: pytest.fail("tuned again"))
        root = resolve_artifacts("ml-100k", cache=tmp_path / "cache")
    assert (root / "memories.parquet").exists()
    again = collaborative.load_collaborative(root / "collaborative.npz")
    np.testing.assert_array_equal(again.logged_predictions, original.logged_predictions)
    np.testing.assert_array_equal(again.knn, original.knn)
    loaded = load_artifacts(root)
    assert (
        loaded.user_ids
        == json.loads((protocol_artifacts / "split.json").read_text())["distilled_user_ids"]
    )
    files = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}

    def regenerate(*args):
        raise AssertionError("the tables were regenerated again")

    with monkeypatch.context() as patch:
        patch.setattr(shipped_module, "_regenerate_tables", regenerate)
        assert (
            resolve_artifacts("ml-100k", cache=tmp_path / "cache") == root
        )  # the second call reuses it
    assert {
        p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()
    } == files
    # a package update with retrained adapters (a new manifest) gets its own copy, not the stale one
    manifest = json.loads((shipped / "manifest.json").read_text())
    (shipped / "manifest.json").write_text(json.dumps({**manifest, "note": "retrained"}))
    rehash(shipped)  # what export_shippable does for a retrained simulator
    updated = resolve_artifacts("ml-100k", cache=tmp_path / "cache")
    assert (
        updated != root
        and json.loads((updated / "manifest.json").read_text())["note"] == "retrained"
    )
