"""Real kills of the resumable stages: the real ``persona-gym`` command runs in a subprocess on
the tiny fixtures, is SIGKILLed as soon as its first checkpoint file exists, and the same
command (``train``) or ``train-agent --resume`` continues from that checkpoint to the end."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import write_tiny_artifacts

REPO = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "persona_gym.cli"]


def run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*COMMAND, *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


def kill_when(argv: list[str], ready: Callable[[], Path | None], timeout: float = 300) -> Path:
    """Start ``persona-gym ARGV``, SIGKILL it once ``ready()`` returns a path (polled every
    10 ms), and return that path. Fails if the command ends first."""
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: the child never blocks on it
        process = subprocess.Popen(
            [*COMMAND, *argv], cwd=REPO, stdout=subprocess.DEVNULL, stderr=log
        )
        deadline = time.monotonic() + timeout
        try:
            while (found := ready()) is None:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(
                        f"no checkpoint before the command ended (status {process.returncode}) "
                        f"or the timeout: {log.read()[-2000:]}"
                    )
                time.sleep(0.01)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == -signal.SIGKILL
    return found


def _snapshot(paths: list[Path]) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}


def test_train_killed_resumes_from_its_checkpoint(tmp_path, catalog, tiny_base):
    """``persona-gym train`` killed after its first checkpoint: the rerun logs the step it
    resumed at (the checkpoint's), trains only the remaining steps to the configured total and
    writes a loadable adapter and manifest."""
    import torch

    from persona_gym.artifacts import load_artifacts

    art = write_tiny_artifacts(tmp_path / "art", catalog)
    # single-max: 10 training examples (the larger persona's), one per step: 40 steps in 4 epochs
    argv = [
        "train",
        "--artifacts",
        str(art),
        "--preset",
        "paper",
        "--base-model",
        tiny_base,
        "--variants",
        "single-max",
        "--rank",
        "4",
        "--alpha",
        "8",
        "--lora-layers",
        "2",
        "--epochs",
        "4",
        "--batch-size",
        "1",
        "--blocks-per-sequence",
        "1",
        "--max-examples-per-user",
        "0",
        "--val-per-user",
        "1",
        "--window",
        "2",
        "--memories",
        "1",
        "--max-tokens",
        "256",
        "--eval-every",
        "1000",
        "--patience",
        "1000",
        "--checkpoint-every",
        "2",
        "--no-progress",
        "--no-compile",
    ]
    checkpoint = art / "checkpoints" / "single-max.pt"
    kill_when(argv, lambda: checkpoint if checkpoint.exists() else None)
    assert not (art / "adapters" / "single-max").exists() and not (art / "manifest.json").exists()
    at = torch.load(checkpoint, weights_only=False)["state"]["step"]
    assert at % 2 == 0 and 2 <= at < 40

    done = run(argv)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"adapter single-max: resumed from {checkpoint} at step {at}" in done.stderr
    loaded = load_artifacts(art)
    metrics = loaded.manifest["metrics"]["adapters"]["single-max"]
    assert metrics["steps"] == 40 and metrics["train_examples"] == 10
    assert (art / "adapters" / "single-max" / "adapter_model.safetensors").is_file()


def test_train_agent_killed_resumes_from_its_latest_checkpoint(tmp_path, trained_tiny_artifacts):
    """``persona-gym train-agent`` killed after its first checkpoint: ``--resume`` loads that
    checkpoint (its log line, a monitor file named after its step count), keeps the checkpoints
    written before the kill as they are, adds only later ones and ends at the run's length."""
    from agents.policies import SB3Policy
    from agents.runs import latest_checkpoint, read_run

    out = tmp_path / "runs"
    argv = [
        "train-agent",
        "--artifacts",
        str(trained_tiny_artifacts),
        "--env-kwargs",
        "dataset=synthetic",
        "mask_rated=false",
        "leave_rule=threshold",
        "leave_prob=0",
        "obs_window=3",
        "--dtype",
        "float32",
        "--timesteps",
        "64",
        "--n-envs",
        "2",
        "--n-steps",
        "4",
        "--batch-size",
        "4",
        "--checkpoint-every",
        "8",
        "--out",
        str(out),
        "--no-progress",
    ]

    def first_checkpoint() -> Path | None:
        found = list(out.glob("*/checkpoints/model_*_steps.zip"))
        return found[0] if found else None

    kill_when(argv, first_checkpoint)
    (run_dir,) = out.iterdir()
    before = sorted((run_dir / "checkpoints").glob("model_*_steps.zip"))
    _, at = latest_checkpoint(run_dir)
    assert 8 <= at < 64 and not (run_dir / "model.zip").exists()
    kept = _snapshot(before)

    done = run(["train-agent", "--resume", str(run_dir), "--no-progress"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming {run_dir} from model_{at}_steps.zip ({at} steps)" in done.stderr
    assert (
        read_run(run_dir)["timesteps"] == 64 and (run_dir / f"monitor-{at}.monitor.csv").is_file()
    )
    after = sorted((run_dir / "checkpoints").glob("model_*_steps.zip"))
    assert _snapshot([p for p in after if p in before]) == kept  # nothing before the kill redone
    steps = sorted(int(p.name.split("_")[1]) for p in after if p not in before)
    assert steps == list(range(at + 8, 65, 8))
    assert not list((run_dir / "checkpoints").glob("*.tmp.zip"))
    SB3Policy.load(run_dir)
