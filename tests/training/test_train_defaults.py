"""``persona-gym train --artifacts DIR`` with its defaults builds the shipped recipe (the sequence
user model), and ``--preset paper`` the paper's configuration with the block trainer (issue 35).

The default run trains on a directory as ``distill`` and ``personas`` leave it (no manifest), on
the tiny random base model; every other setting is the default: the tiny protocol users are
short enough for them. Its manifest's prompt and ``training.sequence`` are compared field by
field with the shipped recipe and with the shipped simulator's manifest.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from persona_gym.cli import main
from persona_gym.prompt_config import PromptConfig
from persona_gym.registry import SHIPPED_DIR
from training.sequence_training import SequenceTrainConfig

# The shipped simulator's recipe, written out: what the defaults must build.
SHIPPED_PROMPT = {
    "window_size": 3,
    "n_memories": 0,
    "use_profile": False,
    "max_tokens": 384,
    "crowd_cue": False,
    "item_tokens": False,
    "cf_cue": True,
    "surprise_cue": False,
    "cf_items": False,
    "cf_prior": True,
    "persona_taste": 0.75,
    "layout": "sequence",
    "history": 32,
}
SHIPPED_SEQUENCE = {
    "history": 32,
    "window": 3,
    "chunk": 64,
    "min_context": 24,
    "rank": 16,
    "alpha": 32,
    "dropout": 0.05,
    "learning_rate": 3e-4,
    "epochs": 2,
    "batch": 8,
    "mse_weight": 0.1,
    "val_per_user": 5,
    "eval_every": 8,
    "seed": 0,
}
# What this test gives beside --artifacts: the tiny base model only. No field of the prompt or
# of SequenceTrainConfig is overridden (a size knob added here must be listed and skipped below).
OVERRIDDEN: tuple[str, ...] = ()
SHIPPED_MANIFEST = SHIPPED_DIR / "ml100k" / "manifest.json"


def _fresh_copy(protocol_artifacts: Path, to: Path) -> Path:
    """The protocol artifacts as ``distill`` and ``personas`` wrote them: tables,
    collaborative.npz, personas.json, split.json; no manifest, adapters or caches."""
    shutil.copytree(
        protocol_artifacts,
        to,
        ignore=shutil.ignore_patterns("manifest.json", "adapters", "checkpoints", "cache"),
    )
    assert (to / "collaborative.npz").exists() and (to / "personas.json").exists()
    return to


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, protocol_artifacts, tiny_base) -> tuple[Path, str]:
    root = _fresh_copy(protocol_artifacts, tmp_path_factory.mktemp("defaults") / "art")
    argv = ["train", "--artifacts", str(root), "--base-model", tiny_base]
    assert main(argv) == 0
    return root, tiny_base


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _compare(recorded: dict, expected: dict, fields: list[str]) -> list[str]:
    """The fields (outside OVERRIDDEN) whose recorded value differs from the expected one."""
    return [
        f"{f}: {recorded.get(f)!r} != {expected.get(f)!r}"
        for f in fields
        if f not in OVERRIDDEN and recorded.get(f) != expected.get(f)
    ]


PROMPT_FIELDS = [f.name for f in dataclasses.fields(PromptConfig)]
SEQUENCE_FIELDS = [f.name for f in dataclasses.fields(SequenceTrainConfig)]


def test_the_recipe_written_out_covers_every_field():
    assert sorted(SHIPPED_PROMPT) == sorted(PROMPT_FIELDS)
    assert sorted(SHIPPED_SEQUENCE) == sorted(SEQUENCE_FIELDS)


def test_train_with_defaults_builds_the_shipped_recipe(default_run):
    root, tiny_base = default_run
    manifest = _manifest(root)
    assert _compare(manifest["prompt"], SHIPPED_PROMPT, PROMPT_FIELDS) == []
    assert _compare(manifest["training"]["sequence"], SHIPPED_SEQUENCE, SEQUENCE_FIELDS) == []
    assert manifest["training"]["base_model"] == tiny_base
    # one persona adapter per persona, on the protocol users; the manifest loads and verifies
    personas = json.loads((root / "personas.json").read_text())["k"]
    assert sorted(manifest["adapters"]) == [f"persona-{p}" for p in range(personas)]
    assert manifest["metrics"]["run"]["training_users"] == 4
    from persona_gym.artifacts import load_artifacts

    loaded = load_artifacts(root)
    assert loaded.prompt_config == PromptConfig(**SHIPPED_PROMPT)
    assert main(["artifacts", "verify", str(root)]) == 0


def test_train_with_defaults_matches_the_shipped_manifest(default_run):
    shipped = json.loads(SHIPPED_MANIFEST.read_text())
    if shipped["prompt"].get("layout") != "sequence":
        pytest.skip(f"{SHIPPED_MANIFEST} is still the block simulator (no sequence recipe)")
    manifest = _manifest(default_run[0])
    assert _compare(manifest["prompt"], shipped["prompt"], PROMPT_FIELDS) == []
    assert (
        _compare(manifest["training"]["sequence"], shipped["training"]["sequence"], SEQUENCE_FIELDS)
        == []
    )


def test_the_same_command_again_resumes_and_another_config_is_refused(default_run, capsys):
    root, tiny_base = default_run
    before = _manifest(root)["metrics"]["adapters"]
    assert main(["train", "--artifacts", str(root), "--base-model", tiny_base]) == 0
    assert _manifest(root)["metrics"]["adapters"] == before  # nothing trained again
    capsys.readouterr()
    argv = ["train", "--artifacts", str(root), "--base-model", tiny_base, "--epochs", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err


def _parse(*argv: str):
    import argparse

    from training.train import add_parser

    parser = argparse.ArgumentParser(prog="persona-gym")
    add_parser(parser.add_subparsers())
    return parser.parse_args(["train", "--artifacts", "x", *argv])


def test_the_cli_defaults_are_the_configs_defaults():
    from training.sequence_training import PERSONA_TASTE
    from training.train import TrainConfig, paper_config, shipped_config

    assert shipped_config(_parse()) == (SequenceTrainConfig(), PERSONA_TASTE)
    assert paper_config(_parse("--preset", "paper")) == TrainConfig()


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--lora-layers", "2"], "--lora-layers"),
        (["--item-tokens", "--no-compile"], "--item-tokens, --no-compile"),
        (["--preset", "paper", "--chunk", "8"], "--chunk"),
    ],
)
def test_options_of_the_other_recipe_are_refused_in_one_line(argv, named, tmp_path, capsys):
    assert main(["train", "--artifacts", str(tmp_path / "art"), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"persona-gym train: error: {named}: ")
    assert not (tmp_path / "art").exists()


def test_preset_paper_still_trains_the_block_model(tmp_path, catalog, tiny_base, capsys):
    from persona_gym.artifacts import load_artifacts
    from tests.conftest import write_tiny_artifacts

    art = write_tiny_artifacts(tmp_path / "art", catalog)
    argv = ["train", "--artifacts", str(art), "--preset", "paper", "--base-model", tiny_base]
    argv += ["--variants", "persona", "--rank", "4", "--alpha", "8", "--lora-layers", "2"]
    argv += ["--epochs", "1", "--batch-size", "4", "--blocks-per-sequence", "2"]
    argv += ["--max-examples-per-user", "4", "--val-per-user", "1", "--window", "2"]
    argv += ["--max-tokens", "256", "--no-progress", "--no-compile"]
    assert main(argv) == 0, capsys.readouterr().err
    loaded = load_artifacts(art)
    assert set(loaded.adapter_dirs) == {"persona-0", "persona-1"}
    assert loaded.prompt_config.layout == "block" and loaded.prompt_config.use_profile
    training = loaded.manifest["training"]
    assert "sequence" not in training and training["lora_layers"] == 2
    assert training["learning_rate"] == 5e-4  # the paper preset's, not the shipped recipe's
