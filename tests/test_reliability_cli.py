"""Adversarial tests of every ``persona-gym`` command: an ordinary error (missing path, bad
argument, refused overwrite, broken file, permission problem, failed backend, ids beyond int64)
prints ONE line on stderr naming the file, field or value and the fix, and exits with 2; a
traceback only with ``-v``. Late failures happen before any work. In-process, on tiny inputs."""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import pytest

from persona_gym.cli import main
from tests.conftest import write_tiny_artifacts
from tests.test_cli import write_ml1m

LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) ")


def run(capsys, *argv: str) -> tuple[int, str, str]:
    """``persona-gym ARGV`` in-process: (exit code, stdout, stderr without log lines)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse, or a bare SystemExit of an older version
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, "\n".join(line for line in err.splitlines() if not LOG_LINE.match(line))


def assert_one_line(result: tuple[int, str, str], command: str, *words: str) -> str:
    code, _, err = result
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"persona-gym {command}: error: "), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.fixture
def trained(tmp_path, trained_tiny_artifacts) -> Path:
    return Path(shutil.copytree(trained_tiny_artifacts, tmp_path / "trained"))


@pytest.fixture
def ml1m(tmp_path) -> Path:
    return write_ml1m(tmp_path / "ml1m")


# -- distill -------------------------------------------------------------------------------------
def test_distill_missing_dataset(capsys, tmp_path):
    result = run(capsys, "distill", "--dataset", tmp_path / "nowhere", "--out", tmp_path / "out")
    assert_one_line(result, "distill", str(tmp_path / "nowhere"), "existing folder")
    assert not list(tmp_path.iterdir())  # no trace left


@pytest.mark.parametrize("flag", ["--n-users", "--max-users"])
def test_distill_needs_users(capsys, tmp_path, ml1m, flag):
    result = run(capsys, "distill", "--dataset", ml1m, "--out", tmp_path / "out", flag, "0")
    assert_one_line(result, "distill", f"{flag} must be >= 1")
    assert not (tmp_path / "out").exists()


def test_distill_refuses_a_trained_directory(capsys, trained, ml1m):
    before = (trained / "manifest.json").read_bytes()
    result = run(
        capsys,
        "distill",
        "--dataset",
        ml1m,
        "--out",
        trained,
        "--n-users",
        "4",
        "--seed",
        "1",
        "--no-progress",
    )
    assert_one_line(result, "distill", str(trained), "--force")
    assert (trained / "manifest.json").read_bytes() == before


def test_distill_openai_needs_its_endpoint(capsys, tmp_path, ml1m):
    result = run(
        capsys, "distill", "--dataset", ml1m, "--out", tmp_path / "out", "--backend", "openai"
    )
    assert_one_line(result, "distill", "--base-url")


def test_distill_backend_failure_is_one_line_without_the_key(capsys, tmp_path, ml1m, monkeypatch):
    from tests.distill.test_distill import ScriptedServer

    monkeypatch.setattr("training.chat.time.sleep", lambda s: None)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-live-0123456789abcdef")
    echo = json.dumps(
        {
            "error": "overloaded",
            "request": {"headers": {"Authorization": "Bearer sk-live-0123456789abcdef"}},
            "pad": "x" * 2000,
        }
    )
    with ScriptedServer([(503, echo)] * 4) as server:
        result = run(
            capsys,
            "distill",
            "--dataset",
            ml1m,
            "--out",
            tmp_path / "out",
            "--n-users",
            "4",
            "--max-users",
            "1",
            "--backend",
            "openai",
            "--base-url",
            server.base_url,
            "--model",
            "m",
            "--no-progress",
        )
    line = assert_one_line(
        result, "distill", server.base_url, "failed after 4 attempts", "HTTP 503"
    )
    assert "sk-live" not in line and "0123456789abcdef" not in line and len(line) < 700


# -- personas ------------------------------------------------------------------------------------
def test_personas_missing_artifacts(capsys, tmp_path):
    assert_one_line(
        run(capsys, "personas", "--artifacts", tmp_path / "nowhere"),
        "personas",
        "profiles.jsonl",
        "persona-gym distill",
    )


def test_personas_bad_k(capsys, tmp_path, catalog):
    art = write_tiny_artifacts(tmp_path / "art", catalog)
    assert_one_line(
        run(capsys, "personas", "--artifacts", art, "--k", "-1"), "personas", "--k must be >= 0"
    )


def test_personas_broken_profiles_line(capsys, tmp_path, catalog):
    art = write_tiny_artifacts(tmp_path / "art", catalog)
    lines = (art / "profiles.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]
    (art / "profiles.jsonl").write_text("\n".join(lines) + "\n")
    assert_one_line(
        run(capsys, "personas", "--artifacts", art, "--k", "2"),
        "personas",
        "profiles.jsonl line 2",
        "persona-gym distill",
    )


def test_personas_refuse_to_overwrite(capsys, tmp_path, catalog):
    art = write_tiny_artifacts(tmp_path / "art", catalog)
    assert_one_line(
        run(capsys, "personas", "--artifacts", art, "--k", "2"),
        "personas",
        "personas.json exists",
        "--force",
    )


# -- train / evaluate ------------------------------------------------------------------------------
def test_train_missing_artifacts(capsys, tmp_path):
    assert_one_line(
        run(capsys, "train", "--artifacts", tmp_path / "nowhere"), "train", "persona-gym distill"
    )


def test_train_refuses_another_config(capsys, trained, tiny_base):
    result = run(
        capsys,
        "train",
        "--artifacts",
        trained,
        "--base-model",
        tiny_base,
        "--rank",
        "8",
    )
    assert_one_line(result, "train", "--force")


def test_evaluate_missing_artifacts(capsys, tmp_path):
    assert_one_line(
        run(capsys, "evaluate", "--artifacts", tmp_path / "nowhere"),
        "evaluate",
        str(tmp_path / "nowhere" / "manifest.json"),
        f"`persona-gym build ml-100k --out {tmp_path / 'nowhere'}`",
    )


def test_evaluate_broken_manifest(capsys, trained):
    (trained / "manifest.json").write_text('{"schema_version": 2,')
    assert_one_line(
        run(capsys, "evaluate", "--artifacts", trained),
        "evaluate",
        "manifest.json is not valid JSON",
    )


def test_evaluate_broken_adapter_config(capsys, trained):
    from persona_gym.artifacts import rehash

    (trained / "adapters" / "persona-0" / "adapter_config.json").write_text('{"r": 4')
    rehash(trained)  # even a deliberate change must not reach peft's parser
    assert_one_line(
        run(capsys, "evaluate", "--artifacts", trained),
        "evaluate",
        "adapter_config.json is not valid JSON",
    )


def test_evaluate_broken_adapter_weights(capsys, trained):
    from persona_gym.artifacts import rehash

    (trained / "adapters" / "persona-1" / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    rehash(trained)
    assert_one_line(
        run(capsys, "evaluate", "--artifacts", trained),
        "evaluate",
        "adapter_model.safetensors is not a readable safetensors file",
    )


def test_evaluate_tampered_adapter(capsys, trained):
    weights = trained / "adapters" / "persona-1" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\x7f\x7f\x7f\x7f")
    assert_one_line(
        run(capsys, "evaluate", "--artifacts", trained), "evaluate", str(weights), "does not match"
    )


# -- agents --------------------------------------------------------------------------------------
def test_train_agent_missing_run(capsys, tmp_path):
    assert_one_line(
        run(capsys, "train-agent", "--resume", tmp_path / "nowhere"),
        "train-agent",
        "run.json not found",
    )


def test_train_agent_resume_keeps_the_recorded_length(capsys, tmp_path, monkeypatch):
    import dataclasses

    from agents import train as agent_train

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recorded = dataclasses.asdict(agent_train.AgentConfig(timesteps=1234, algo="ppo"))
    (run_dir / "run.json").write_text(
        json.dumps(
            {
                "config": recorded,
                "algo": "ppo",
                "timesteps": 1234,
                "train_seconds": 1.0,
                "env_steps_per_s": 1.0,
            }
        )
    )
    seen = {}

    def fake_train_agent(config, resume=None, progress=True):
        seen["timesteps"], seen["resume"] = config.timesteps, resume
        return Path(resume)

    monkeypatch.setattr(agent_train, "train_agent", fake_train_agent)
    assert run(capsys, "train-agent", "--resume", run_dir, "--no-progress")[0] == 0
    assert seen == {"timesteps": 1234, "resume": str(run_dir)}
    assert run(capsys, "train-agent", "--resume", run_dir, "--timesteps", "2000")[0] == 0
    assert seen["timesteps"] == 2000


@pytest.fixture
def no_evaluation_work(monkeypatch):
    """Fail the test if evaluate-policy starts loading a simulator."""

    def started(*args, **kwargs):
        raise AssertionError("evaluate-policy started work before checking its arguments")

    monkeypatch.setattr("agents.evaluate.load_evaluation", started)


def test_evaluate_policy_out_is_a_file(capsys, tmp_path, no_evaluation_work):
    out = tmp_path / "results.json"
    out.write_text("{}")
    assert_one_line(
        run(capsys, "evaluate-policy", "--out", out), "evaluate-policy", str(out), "is a file"
    )


@pytest.mark.parametrize(
    ("flag", "value"), [("--episodes", "0"), ("--k", "0"), ("--n-envs", "0"), ("--episodes", "-3")]
)
def test_evaluate_policy_bad_numbers_fail_before_work(
    capsys, tmp_path, no_evaluation_work, flag, value
):
    result = run(capsys, "evaluate-policy", "--out", tmp_path / "out", flag, value)
    assert_one_line(result, "evaluate-policy", f"({flag}) must be >= 1", value)


# -- data ----------------------------------------------------------------------------------------
def test_data_info_unreadable_file(capsys, ml1m, monkeypatch):
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "ratings.dat":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    assert_one_line(
        run(capsys, "data", "info", "--dataset", ml1m, "--n-users", "3"),
        "data info",
        "Permission denied",
        str(ml1m / "ratings.dat"),
    )


def test_data_info_ids_beyond_int64(capsys, ml1m):
    lines = (ml1m / "ratings.dat").read_text(encoding="latin-1").splitlines()
    lines[4] = "99999999999999999999::1::5::1000000"
    (ml1m / "ratings.dat").write_text("\n".join(lines) + "\n", encoding="latin-1")
    assert_one_line(
        run(capsys, "data", "info", "--dataset", ml1m, "--n-users", "3"),
        "data info",
        "ratings.dat, line 5",
        "beyond the 64-bit integer range",
    )


@pytest.mark.parametrize("name", ["ratings.dat", "movies.dat", "users.dat"])
def test_data_info_accepts_a_byte_order_mark_in_every_file(capsys, ml1m, name):
    (ml1m / name).write_bytes(b"\xef\xbb\xbf" + (ml1m / name).read_bytes())
    code, out, err = run(capsys, "data", "info", "--dataset", ml1m, "--n-users", "3", "--json")
    assert code == 0, err
    assert json.loads(out)["dataset"]["n_users"] == 6


# -- verbosity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_prints_the_traceback(capsys, tmp_path, where):
    argv = ["train", "--artifacts", str(tmp_path / "nowhere")]
    argv = ["-v", *argv] if where == "before" else [*argv, "-v"]
    code, _, err = run(capsys, *argv)
    assert code == 2 and "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1].startswith("persona-gym train: error: ")
