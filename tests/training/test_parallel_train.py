"""``persona-gym train --workers N``: adapters trained in worker processes come out as in one
process (weights, metrics, manifest), a killed parallel run resumes, bad values get one line."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file

from persona_gym.cli import main
from persona_gym.errors import ConfigError
from tests.conftest import trained_tiny_config
from training.train import train

ADAPTERS = ("persona-0", "persona-1", "single-max")
TIMINGS = ("train_seconds", "train_tokens_per_s")  # wall-clock figures, not results


def assert_same_adapters(root, reference) -> None:
    """The same tensors in every adapter (float noise allowed: the workers run fewer threads)."""
    for name in ADAPTERS:
        a, b = (
            load_file(r / "adapters" / name / "adapter_model.safetensors")
            for r in (root, reference)
        )
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)


def results(manifest: dict) -> dict:
    return {
        name: {k: v for k, v in m.items() if k not in TIMINGS}
        for name, m in manifest["metrics"]["adapters"].items()
    }


def assert_close_values(a, b, where: str = "metrics") -> None:
    """Equal structures, floats equal up to float noise."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for key in a:
            assert_close_values(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for n, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_close_values(x, y, f"{where}[{n}]")
    elif isinstance(a, float):
        assert b == pytest.approx(a, rel=1e-5, abs=1e-6), where
    else:
        assert a == b, where


def test_two_workers_train_the_one_process_adapters(
    artifacts, trained_tiny_artifacts, tiny_base, caplog
):
    """The fixture's run (3 adapters, one process) again in 2 workers: the same adapters, the
    same metrics (steps, validation histories, best RMSEs) in the same order, the same manifest;
    the workers' log records reach the parent's handlers."""
    with caplog.at_level(logging.INFO):
        manifest = train(artifacts, trained_tiny_config(tiny_base), progress=False, workers=2)
    assert "training 3 adapters in 2 worker processes" in caplog.text
    # the parent computed the frozen-layer activations; each worker reused them and said so
    assert caplog.text.count("reusing frozen-layer activations") == 2
    assert_same_adapters(artifacts, trained_tiny_artifacts)
    reference = json.loads((trained_tiny_artifacts / "manifest.json").read_text())
    assert list(manifest["metrics"]["adapters"]) == list(ADAPTERS)
    assert_close_values(results(manifest), results(reference))
    for key in ("adapters", "personas", "training", "prompt", "seeds", "tables_sha256"):
        assert manifest[key] == reference[key], key
    assert manifest["metrics"]["run"]["workers"] == 2
    (recorded,) = json.loads((artifacts / "checkpoints" / "metrics.json").read_text()).values()
    assert set(recorded) == set(ADAPTERS)  # the parent recorded each adapter as it came back


def test_killed_parallel_run_resumes_in_fewer_workers(
    tmp_path, trained_tiny_artifacts, tiny_base, caplog
):
    """A parallel run killed after persona-0 (recorded) and while persona-1 and single-max were
    being saved (their checkpoints written, no adapter, no manifest): rerun with 3 workers, it
    skips persona-0, resumes the two others in 2 workers (one per adapter) and ends with the
    one-process run's adapters."""
    art = shutil.copytree(trained_tiny_artifacts, tmp_path / "art")
    (art / "manifest.json").unlink()
    for name in ("persona-1", "single-max"):
        shutil.rmtree(art / "adapters" / name)
    metrics_path = art / "checkpoints" / "metrics.json"
    recorded = json.loads(metrics_path.read_text())
    digest = next(iter(recorded))
    metrics_path.write_text(json.dumps({digest: {"persona-0": recorded[digest]["persona-0"]}}))
    with caplog.at_level(logging.INFO):
        manifest = train(art, trained_tiny_config(tiny_base), progress=False, workers=3)
    assert "adapter persona-0: already trained, skipping" in caplog.text
    assert "--workers 3 but 2 adapters to train: 2 workers" in caplog.text
    for name in ("persona-1", "single-max"):  # relayed from the workers
        assert f"adapter {name}: resumed from" in caplog.text
    assert_same_adapters(art, trained_tiny_artifacts)
    reference = json.loads((trained_tiny_artifacts / "manifest.json").read_text())
    assert_close_values(results(manifest), results(reference))


def test_bad_worker_counts_get_one_line(artifacts, tiny_base, capsys):
    with pytest.raises(ConfigError, match=r"workers \(--workers\) must be >= 1, got 0"):
        train(artifacts, trained_tiny_config(tiny_base), progress=False, workers=0)
    code = main(
        [
            "train",
            "--artifacts",
            str(artifacts),
            "--preset",
            "paper",
            "--base-model",
            tiny_base,
            "--workers",
            "-1",
            "--no-progress",
            "--no-compile",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip() == "persona-gym train: error: workers (--workers) must be >= 1, got -1"
    assert not (artifacts / "checkpoints").exists()  # nothing was started
