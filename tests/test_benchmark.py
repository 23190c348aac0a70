"""The engine benchmark runs every mode end to end (tiny workload, random SmolLM2-shape weights)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "simulator.py"


def test_benchmark_measures_every_mode(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_simulator", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "results.json"
    args = [
        "--shape",
        "tiny",
        "--ratings",
        "4",
        "--users",
        "4",
        "--personas",
        "2",
        "--per-request-ratings",
        "1",
        "--batch-size",
        "4",
        "--out",
        str(out),
    ]
    assert module.main(args) == 0
    report = json.loads(out.read_text())
    assert set(report["modes"]) == set(module.MODES)
    for mode, result in report[
        "modes"
    ].items():  # each rate is its mode's rating count over its time
        n = 1 if mode in module.PER_REQUEST else 4 * (20 if mode.startswith("ranking") else 1)
        assert result["ratings_per_s"] * result["seconds"] == pytest.approx(n), mode
    assert report["modes"]["compact"]["tokens_per_rating"] == 20 + 14
    assert report["modes"]["ranking"]["tokens_per_rating"] == 14 + 20 / 20  # the state is shared
    assert report["modes"]["prefix-cache"]["tokens_per_rating"] == 125
    assert "compact" in capsys.readouterr().out
