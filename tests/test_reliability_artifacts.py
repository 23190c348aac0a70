"""Adversarial tests of the artifacts directory as a unit: tampered, stale, mixed or escaping
files fail on load with one line naming the file and the fix; stages refuse to mix runs; a killed
stage leaves the previous directory usable; the shipped cache is materialised once, under a lock.

All on the tiny trained artifacts (``trained_tiny_artifacts``), copied before any change.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

import persona_gym  # noqa: F401  (registers the env ids)
from persona_gym import artifacts as artifacts_module
from persona_gym import registry
from persona_gym.artifacts import ArtifactsError, load_artifacts, read_manifest
from persona_gym.artifacts import shipped as shipped_module  # what resolves a simulator name

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def art(tmp_path, trained_tiny_artifacts) -> Path:
    """A private copy of the tiny trained artifacts."""
    return Path(shutil.copytree(trained_tiny_artifacts, tmp_path / "art"))


def edit_manifest(root: Path, change) -> None:
    """Change manifest.json by hand (as a user with an editor would: the seal is not updated)."""
    manifest = json.loads((root / "manifest.json").read_text())
    change(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest, indent=2))


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message, message
    return message


def make_env(root: Path, **kwargs) -> gym.Env:
    return gym.make(
        "PersonaML100K-v0",
        artifacts=str(root),
        dataset="synthetic",
        mask_rated=False,
        leave_rule="threshold",
        leave_prob=0.0,
        obs_window=3,
        **kwargs,
    )


# -- tampering -----------------------------------------------------------------------------------
def test_intact_artifacts_load_and_verify(art):
    loaded = load_artifacts(art)
    assert loaded.manifest["schema_version"] == artifacts_module.SCHEMA_VERSION
    assert "adapters/persona-0/adapter_model.safetensors" in loaded.manifest["files"]
    assert "profiles.jsonl" in loaded.manifest["files"]


def test_random_bytes_in_an_adapter_fail_on_load(art):
    weights = art / "adapters" / "persona-1" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-300:-100] = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactsError) as err:
        load_artifacts(art)
    assert str(weights) in one_line(err) and "persona-gym train" in str(err.value)
    with pytest.raises(ArtifactsError, match="adapter_model.safetensors"):
        make_env(art)  # the environment refuses at creation


def test_edited_profile_fails_on_load(art):
    path = art / "profiles.jsonl"
    path.write_text(path.read_text().replace("likes thrillers", "likes comedies", 1))
    with pytest.raises(ArtifactsError) as err:
        load_artifacts(art)
    assert str(path) in one_line(err) and "persona-gym distill" in str(err.value)


def test_edited_tables_sha256_fails_on_load(art):
    edit_manifest(art, lambda m: m.update(tables_sha256="0" * 64))
    with pytest.raises(ArtifactsError) as err:
        load_artifacts(art)
    assert "manifest.json" in one_line(err) and "changed after it was written" in str(err.value)


def test_removed_base_model_hash_fails_even_after_a_rehash(art):
    edit_manifest(art, lambda m: m["base_model"].pop("sha256"))
    with pytest.raises(ArtifactsError, match="manifest.json"):
        load_artifacts(art)
    with pytest.raises(ArtifactsError) as err:  # a deliberate re-seal does not make it valid
        artifacts_module.rehash(art)
    assert "base_model.sha256 is missing" in one_line(err)


@pytest.mark.parametrize("version", [0, -1, "1", True, None])
def test_bad_schema_version_fails_on_load(art, version):
    edit_manifest(art, lambda m: m.update(schema_version=version))
    with pytest.raises(ArtifactsError) as err:
        load_artifacts(art)
    assert "schema_version" in one_line(err) and "manifest.json" in str(err.value)


def test_old_manifest_without_hashes_names_rehash(art):
    def to_v1(manifest):
        manifest.update(schema_version=1)
        del manifest["files"], manifest["manifest_sha256"]

    edit_manifest(art, to_v1)
    with pytest.raises(ArtifactsError, match="persona-gym artifacts rehash"):
        load_artifacts(art)
    artifacts_module.rehash(art)
    assert load_artifacts(art).manifest["schema_version"] == artifacts_module.SCHEMA_VERSION


def test_nan_item_embeddings_fail_on_load_even_after_a_rehash(art):
    path = art / "embeddings" / "items.npy"
    emb = np.load(path)
    emb[2, 3] = np.nan
    np.save(path, emb)
    with pytest.raises(ArtifactsError) as err:
        load_artifacts(art)
    assert str(path) in one_line(err)
    artifacts_module.rehash(art)
    with pytest.raises(ArtifactsError) as err:
        load_artifacts(art)
    assert "NaN or inf" in one_line(err) and "rows [2]" in str(err.value)


def test_unrecorded_file_in_an_adapter_folder_fails(art):
    (art / "adapters" / "persona-0" / "item_tokens.pt").write_bytes(b"not a projection")
    with pytest.raises(ArtifactsError) as err:
        load_artifacts(art)
    assert "item_tokens.pt is not recorded" in one_line(err)


def test_missing_recorded_file_fails(art):
    (art / "personas.json").unlink()
    with pytest.raises(ArtifactsError, match="personas.json"):
        load_artifacts(art)


@pytest.mark.parametrize("bad", ["../../x", "ABSOLUTE", "adapters/../../x", "C:\\x"])
def test_adapter_paths_must_stay_inside(tmp_path, trained_tiny_artifacts, bad):
    art = Path(shutil.copytree(trained_tiny_artifacts, tmp_path / "a" / "b" / "art"))
    if bad == "ABSOLUTE":
        bad = str(tmp_path / "absolute")
    if bad != "C:\\x":  # a real adapter there: only the path makes it wrong
        shutil.copytree(art / "adapters" / "persona-0", (art / bad).resolve(), dirs_exist_ok=True)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["adapters"]["persona-0"] = bad
    artifacts_module.seal_manifest(art, manifest)  # a consistent seal: the path itself is refused
    with pytest.raises(ArtifactsError) as err:
        read_manifest(art)
    message = one_line(err)
    assert repr(bad) in message and (
        "leaves the artifacts directory" in message or "outside" in message
    )
    with pytest.raises(ArtifactsError):
        artifacts_module.rehash(art)


def test_symlinked_adapter_folder_pointing_outside_is_refused(art, tmp_path):
    elsewhere = Path(shutil.move(art / "adapters" / "persona-0", tmp_path / "elsewhere"))
    (art / "adapters" / "persona-0").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ArtifactsError, match="outside"):
        load_artifacts(art)


def test_broken_json_files_name_the_file(art):
    (art / "personas.json").write_text("{ broken")
    artifacts_module.rehash(art)
    with pytest.raises(ArtifactsError) as err:
        load_artifacts(art)
    assert "personas.json is not valid JSON (line 1)" in one_line(err)
    (art / "manifest.json").write_text("[1, 2")
    with pytest.raises(ArtifactsError, match="manifest.json is not valid JSON"):
        load_artifacts(art)


# -- stale and mixed -----------------------------------------------------------------------------
def test_users_without_a_persona_fail_at_gym_make(art):
    path = art / "personas.json"
    personas = json.loads(path.read_text())
    del personas["assignment"]["3"]  # a personas.json from a run that did not know user 3
    path.write_text(json.dumps(personas))
    artifacts_module.rehash(art)
    with pytest.raises(ArtifactsError) as err:
        make_env(art)
    assert "assigns no persona to 1 of the 4 users" in one_line(err) and "[3]" in str(err.value)


def test_persona_without_adapter_fails_at_gym_make(art):
    edit = json.loads((art / "manifest.json").read_text())
    del edit["adapters"]["persona-1"]
    artifacts_module.seal_manifest(art, edit)
    with pytest.raises(ArtifactsError) as err:
        make_env(art)
    assert "no adapter ['persona-1']" in one_line(err) and "--variants persona" in str(err.value)


def test_user_variant_without_user_adapters_fails_at_gym_make(art):
    with pytest.raises(ArtifactsError) as err:
        make_env(art, variant="user")
    assert "variant='user'" in one_line(err) and "--variants user" in str(err.value)


def test_personas_refuse_to_overwrite_and_force_invalidates_downstream(art):
    from training.personas import PersonaConfig, run_personas_stage

    with pytest.raises(FileExistsError) as err:
        run_personas_stage(art, PersonaConfig(k=2, features="profile"))
    assert "--force" in one_line(err)
    assert (art / "manifest.json").exists()  # nothing was touched
    run_personas_stage(art, PersonaConfig(k=2, seed=1, features="profile"), force=True)
    assert (art / "personas.json").exists()
    assert not (art / "manifest.json").exists() and not (art / "adapters").exists()
    with pytest.raises(ArtifactsError) as err:  # one line: what is missing, the one command
        load_artifacts(art)
    assert str(art / "manifest.json") in one_line(err)
    assert f"`persona-gym build ml-100k --out {art}`" in str(err.value)


def test_train_refuses_another_config_and_resumes_the_same(art, caplog):
    import logging

    from training.train import TrainConfig, train

    recorded = json.loads((art / "manifest.json").read_text())["training"]
    names = set(TrainConfig.__dataclass_fields__)
    same = TrainConfig(**{k: v for k, v in recorded.items() if k in names})
    other = TrainConfig(**{**{k: v for k, v in recorded.items() if k in names}, "rank": 8})
    with pytest.raises(FileExistsError) as err:
        train(art, other, progress=False)
    assert "--force" in one_line(err) and (art / "adapters" / "persona-0").exists()
    with caplog.at_level(logging.INFO, logger="training.train"):
        train(art, same, progress=False)  # same config: nothing retrained, manifest still valid
    assert "already trained, skipping" in caplog.text
    load_artifacts(art)
    # a tampered adapter is not laundered into a new manifest by a resume
    weights = art / "adapters" / "persona-0" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    with pytest.raises(ArtifactsError, match="adapter_model.safetensors"):
        train(art, same, progress=False)


def test_forced_train_stage_removes_adapters_first(art):
    artifacts_module.prepare_stage(art, "train", force=True)
    assert not (art / "manifest.json").exists() and not (art / "adapters").exists()
    assert (art / "personas.json").exists() and (art / "profiles.jsonl").exists()


def test_staged_dir_refuses_and_replaces_whole(art, tmp_path):
    with pytest.raises(FileExistsError) as err:
        with artifacts_module.staged_dir(art):
            pass
    assert "--force" in one_line(err)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an artifacts directory"):
        with artifacts_module.staged_dir(foreign, force=True):
            pass
    with pytest.raises(RuntimeError), artifacts_module.staged_dir(art, force=True) as work:
        (work / "split.json").write_text("{}")
        raise RuntimeError("the build failed")
    load_artifacts(art)  # a failed build leaves the old directory as it was
    with artifacts_module.staged_dir(art, force=True) as work:
        (work / "split.json").write_text("{}")
    assert sorted(p.name for p in art.iterdir()) == ["split.json"]  # nothing of the old run left
    assert not (tmp_path / ".art.partial").exists()


def test_leftovers_of_killed_writes_are_ignored_then_removed(art):
    (art / ".memories.parquet.x1y2.tmp").write_bytes(b"")
    (art / "adapters" / ".persona-0-abc").mkdir()
    (art / "adapters" / ".persona-0-abc" / "adapter_model.safetensors").write_bytes(b"junk")
    load_artifacts(art)  # ignored by the loader
    artifacts_module.prepare_stage(art, "evaluate")
    assert not (art / ".memories.parquet.x1y2.tmp").exists()
    assert not (art / "adapters" / ".persona-0-abc").exists()


# -- hashing -------------------------------------------------------------------------------------
def test_hashes_are_computed_once_per_file_version(art, monkeypatch):
    from persona_gym import assets

    load_artifacts(art)
    calls = []
    real = assets.file_sha256
    monkeypatch.setattr(assets, "file_sha256", lambda path: calls.append(path) or real(path))
    load_artifacts(art)
    assert calls == []
    path = art / "split.json"
    path.write_text(path.read_text() + " ")
    with pytest.raises(ArtifactsError, match="split.json"):
        load_artifacts(art)
    assert calls == [path]


# -- the shipped simulator's cache -------------------------------------------------------------
@pytest.fixture
def shipped(tmp_path, art, monkeypatch) -> Path:
    """A package directory exported from the tiny artifacts; its tables are "regenerated" by
    copying them from the source (the real regeneration runs the data distiller on ML-100k)."""
    package = tmp_path / "package"
    artifacts_module.export_shippable(art, package / "ml100k")
    monkeypatch.setattr(registry, "SHIPPED_DIR", package)
    calls = []

    def regenerate(root: Path, split_info: dict) -> None:
        calls.append(root)
        for name in artifacts_module.TABLES:
            if (art / name).exists():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(art / name, root / name)

    monkeypatch.setattr(shipped_module, "_regenerate_tables", regenerate)
    monkeypatch.setattr(
        shipped_module,
        "tables_digest",
        lambda root: json.loads((art / "manifest.json").read_text())["tables_sha256"],
    )
    return package / "ml100k", calls


def test_shipped_cache_verifies_and_an_edited_table_fails(shipped, tmp_path):
    package, _ = shipped
    assert not (package / "profiles.jsonl").exists()
    root = artifacts_module.resolve_artifacts("ml-100k", cache=tmp_path / "cache")
    load_artifacts(root)
    path = root / "items.parquet"
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactsError) as err:
        load_artifacts(root)
    assert str(path) in one_line(err) and f"delete {root}" in str(err.value)


def test_tampered_shipped_adapter_fails_before_materialising(shipped, tmp_path):
    package, calls = shipped
    weights = package / "adapters" / "persona-0" / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" * 16 + weights.read_bytes()[16:])
    with pytest.raises(ArtifactsError) as err:
        artifacts_module.resolve_artifacts("ml-100k", cache=tmp_path / "cache")
    assert "reinstall persona-gym" in one_line(err) and calls == []


def test_two_processes_materialise_the_shipped_cache_once(shipped, tmp_path, monkeypatch):
    package, calls = shipped
    entered = threading.Semaphore(0)
    real_lock, real_regenerate = shipped_module.file_lock, shipped_module._regenerate_tables

    def counting_lock(path):
        entered.release()
        return real_lock(path)

    def slow_regenerate(root, split_info):
        for _ in range(2):  # wait until both callers have asked for the lock
            assert entered.acquire(timeout=30)
        real_regenerate(root, split_info)

    monkeypatch.setattr(shipped_module, "file_lock", counting_lock)
    monkeypatch.setattr(shipped_module, "_regenerate_tables", slow_regenerate)
    results: list[Path] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                artifacts_module.resolve_artifacts("ml-100k", cache=tmp_path / "cache")
            )
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 2 and results[0] == results[1]
    assert len(calls) == 1  # the second caller waited and reused the first one's copy
    load_artifacts(results[0])


# -- kills of a real subprocess ----------------------------------------------------------------
_KILLER = """
import os, signal, sys
import persona_gym.io as io
victim, real = sys.argv[1], io.atomic_write

def dying_write(path, write):
    if path.name == victim:  # killed in the middle of writing this file
        (path.parent / f".{path.name}.killed.tmp").write_bytes(b"")
        os.kill(os.getpid(), signal.SIGKILL)
    return real(path, write)

io.atomic_write = dying_write
from persona_gym.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _run_killed(tmp_path: Path, victim: str, *argv: str) -> subprocess.CompletedProcess:
    """``persona-gym ARGV`` in a subprocess that SIGKILLs itself while writing file ``victim``."""
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    return subprocess.run(
        [sys.executable, str(script), victim, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_distill_killed_after_its_first_table_leaves_the_old_artifacts_usable(art, tmp_path):
    from tests.test_cli import write_ml1m

    data = write_ml1m(tmp_path / "ml1m")
    before = {p: p.read_bytes() for p in art.rglob("*") if p.is_file()}
    argv = [
        "distill",
        "--dataset",
        str(data),
        "--out",
        str(art),
        "--n-users",
        "4",
        "--force",
        "--no-progress",
    ]
    killed = _run_killed(tmp_path, "profiles.jsonl", *argv)  # after items.parquet was written
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert {p: p.read_bytes() for p in art.rglob("*") if p.is_file()} == before
    load_artifacts(art)  # the old simulator is intact and still verifies
    assert (tmp_path / ".art.partial" / "items.parquet").exists()  # the killed build, aside
    from persona_gym.cli import main

    assert main(argv) == 0  # the rerun (in this process: the kill was the subprocess's)
    assert not (tmp_path / ".art.partial").exists()
    assert (art / "profiles.jsonl").exists() and not (art / "manifest.json").exists()
    assert not (art / "adapters").exists()  # the old run's adapters went with its tables
    assert not list(art.rglob("*.tmp"))


def test_train_killed_mid_run_leaves_nothing_loadable_then_completes(art, tmp_path):
    recorded = json.loads((art / "manifest.json").read_text())["training"]
    script = tmp_path / "train_killed.py"
    script.write_text(f"""
import json, os, signal, sys
from training import adapter_training as a, train as t
kill = int(sys.argv[1])
real, count = a._loss, [0]
def dying(*args, **kw):
    count[0] += 1
    if count[0] == kill:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kw)
a._loss = dying
recorded = json.loads({json.dumps(json.dumps(recorded))})
names = set(t.TrainConfig.__dataclass_fields__)
config = t.TrainConfig(**{{**{{k: v for k, v in recorded.items() if k in names}}, "rank": 8}})
t.train({str(art)!r}, config, progress=False, force=True)
""")
    killed = subprocess.run(
        [sys.executable, str(script), "3"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    with pytest.raises(ArtifactsError, match="manifest.json not found"):
        load_artifacts(art)  # never a manifest over half-replaced adapters
    from training.train import TrainConfig, train

    names = set(TrainConfig.__dataclass_fields__)  # the rerun, in this process
    train(
        art,
        TrainConfig(**{**{k: v for k, v in recorded.items() if k in names}, "rank": 8}),
        progress=False,
        force=True,
    )
    loaded = load_artifacts(art)
    assert loaded.manifest["training"]["rank"] == 8
