"""The engine benchmark runs every mode end to end (tiny workload, random SmolLM2-shape weights)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "simulator.py"


def test_benchmark_measures_every_mode(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark_simulator", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "results.json"
    args = ["--shape", "tiny", "--ratings", "4", "--users", "4", "--personas", "2", "--per-request-ratings", "1",
            "--batch-size", "4", "--out", str(out)]
    assert module.main(args) == 0
    report = json.loads(out.read_text())
    assert set(report["modes"]) == set(module.MODES)
    for mode, result in report["modes"].items():
        assert result["ratings_per_s"] > 0, mode
    assert report["modes"]["compact"]["tokens_per_rating"] == 20 + 14
    assert report["modes"]["ranking"]["tokens_per_rating"] == 14 + 20 / 20  # the state is shared
    assert report["modes"]["prefix-cache"]["tokens_per_rating"] == 125
    assert report["matmul_peak_gflops"] > 0 and "compact" in capsys.readouterr().out
