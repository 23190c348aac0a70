"""A newcomer's first hour: no third-party progress bars in library calls unless asked, short
missing-simulator errors, help texts that say what the defaults do."""

from __future__ import annotations

import pytest

from persona_gym.quiet import PROGRESS_ENV, quiet_loading


def _load(folder: str) -> None:
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(folder)


def test_quiet_loading_hides_the_loading_bar_and_restores_it(tiny_base, capfd, monkeypatch):
    from transformers.utils import logging as hf_logging

    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    hf_logging.enable_progress_bar()
    with quiet_loading():
        _load(tiny_base)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # back as it was
    _load(tiny_base)
    assert "Loading weights" in capfd.readouterr().err  # the bar this silences


def test_quiet_loading_leaves_bars_on_when_asked_and_off_when_off(tiny_base, capfd, monkeypatch):
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    monkeypatch.setenv(PROGRESS_ENV, "1")
    with quiet_loading():
        _load(tiny_base)
    assert "Loading weights" in capfd.readouterr().err
    monkeypatch.delenv(PROGRESS_ENV)
    with quiet_loading(show=True):
        _load(tiny_base)
    assert "Loading weights" in capfd.readouterr().err
    hf_logging.disable_progress_bar()  # a caller that turned them off keeps them off
    hub_off = hub_utils.are_progress_bars_disabled()
    try:
        with quiet_loading():
            pass
        assert not hf_logging.is_progress_bar_enabled()
        assert hub_utils.are_progress_bars_disabled() == hub_off
    finally:
        hf_logging.enable_progress_bar()


def test_quiet_loading_restores_the_bars_after_an_error():
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()
    with pytest.raises(RuntimeError), quiet_loading():
        raise RuntimeError("load failed")
    assert hf_logging.is_progress_bar_enabled()


def test_a_missing_simulator_folder_is_one_short_line(tmp_path):
    from persona_gym.artifacts import MissingArtifactsError, resolve_artifacts

    with pytest.raises(MissingArtifactsError) as err:
        resolve_artifacts(tmp_path / "mine", dataset="ml-1m")
    text = str(err.value)
    assert "\n" not in text and len(text) <= 200 + len(str(tmp_path)), text
    assert f"`persona-gym build ml-1m --out {tmp_path / 'mine'}`" in text
    assert "manifest.json not found" in text and "stage" not in text


def test_personas_help_names_the_default_features(capsys):
    from persona_gym.cli import main
    from training.personas import PersonaConfig

    with pytest.raises(SystemExit):
        main(["personas", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"--features (default: {PersonaConfig.features}" in text
    assert "personas on their profile embeddings" not in text
    with pytest.raises(SystemExit):
        main(["--help"])
    listing = " ".join(capsys.readouterr().out.split())
    assert f"cluster users into personas (on --features, default: {PersonaConfig.features})" in (
        listing
    )


def test_quiet_loading_also_silences_the_gguf_conversion_bar():
    """transformers draws the GGUF conversion's bar with plain tqdm, outside its own switch."""
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    bar = gguf_utils.tqdm
    with quiet_loading():
        assert list(gguf_utils.tqdm(range(3), desc="converting")) == [0, 1, 2]
        assert gguf_utils.tqdm(range(1)).disable
    assert gguf_utils.tqdm is bar
