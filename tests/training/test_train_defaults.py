"""``persona-gym train --artifacts DIR`` with its defaults (``--preset sequence``) builds the shipped
simulator's recipe, the sequence user model; ``--preset block`` trains the earlier item-token
simulator and ``--preset paper`` the paper's configuration, both with the block trainer (issue 35).

The default run trains on a directory as ``distill`` and ``personas`` leave it (no manifest), on
the tiny random base model; every other setting is the default (the tiny protocol users are few
and short enough for them), so its manifest's ``training`` and ``prompt`` are compared field by
field with the shipped PersonaML100K-v0 manifest's.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from persona_gym.cli import main
from persona_gym.registry import SHIPPED_DIR
from persona_gym.simulator.prompt_config import PromptConfig
from training.sequence_training import SequenceTrainConfig
from training.train import TrainConfig

SHIPPED_MANIFEST = SHIPPED_DIR / "ml100k" / "manifest.json"
# What the default run gives beside --artifacts: the tiny base model (--base-model). No size knob
# is overridden; a field a tiny test must shrink is listed here and left out of the comparison.
OVERRIDDEN: tuple[str, ...] = ("base_model",)

# The shipped recipe (the sequence user model, train's default preset), written out.
SEQUENCE_PROMPT = {
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
SEQUENCE_CONFIG = {
    "history": 32,
    "window": 3,
    "targets_per_user": 32,
    "rank": 16,
    "alpha": 32,
    "dropout": 0.05,
    "learning_rate": 3e-4,
    "token_learning_rate": 3e-3,
    "epochs": 2,
    "batch": 4,
    "mse_weight": 0.1,
    "val_per_user": 5,
    "val_share": 0.25,
    "other_users": True,
    "eval_every": 16,
    "seed": 0,
}

PROMPT_FIELDS = [f.name for f in dataclasses.fields(PromptConfig)]
SEQUENCE_FIELDS = [f.name for f in dataclasses.fields(SequenceTrainConfig)]


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


def _manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _as_loaded(prompt: dict) -> dict:
    """A manifest's prompt as the artifacts load it (fields it lacks take their defaults)."""
    return dataclasses.asdict(PromptConfig.of_manifest(prompt))


def _compare(recorded: dict, expected: dict, fields: list[str]) -> list[str]:
    """The fields (outside OVERRIDDEN) whose recorded value differs from the expected one."""
    return [
        f"{f}: {recorded.get(f)!r} != {expected.get(f)!r}"
        for f in fields
        if f not in OVERRIDDEN and recorded.get(f) != expected.get(f)
    ]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, protocol_artifacts, tiny_base) -> tuple[Path, str]:
    root = _fresh_copy(protocol_artifacts, tmp_path_factory.mktemp("defaults") / "art")
    assert main(["train", "--artifacts", str(root), "--base-model", tiny_base]) == 0
    return root, tiny_base


def test_train_with_defaults_matches_the_shipped_manifest(default_run):
    root, tiny_base = default_run
    shipped, manifest = json.loads(SHIPPED_MANIFEST.read_text()), _manifest(root)
    training, expected = manifest["training"], shipped["training"]
    assert sorted(training) == sorted(expected) == ["base_model", "sequence"]
    assert training["base_model"] == tiny_base
    # every field of the shipped training config and prompt, and the recipe written out above
    assert _compare(training["sequence"], expected["sequence"], SEQUENCE_FIELDS) == []
    assert _compare(training["sequence"], SEQUENCE_CONFIG, SEQUENCE_FIELDS) == []
    assert _compare(manifest["prompt"], _as_loaded(shipped["prompt"]), PROMPT_FIELDS) == []
    assert _compare(manifest["prompt"], SEQUENCE_PROMPT, PROMPT_FIELDS) == []
    # the shipped recipe: one sequence adapter per persona, on the protocol users
    personas = json.loads((root / "personas.json").read_text())["k"]
    assert sorted(manifest["adapters"]) == [f"persona-{p}" for p in range(personas)]
    assert manifest["metrics"]["run"]["training_users"] == 4
    for name in manifest["adapters"]:  # peft records the base model's folder: its name only
        config = json.loads((root / "adapters" / name / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == Path(tiny_base).name
    from persona_gym.artifacts import load_artifacts

    loaded = load_artifacts(root)
    assert loaded.prompt_config == PromptConfig(**_as_loaded(shipped["prompt"]))
    assert main(["artifacts", "verify", str(root)]) == 0


def test_the_same_command_again_resumes_and_another_config_is_refused(default_run, capsys):
    root, tiny_base = default_run
    before = _manifest(root)["metrics"]["adapters"]
    argv = ["train", "--artifacts", str(root), "--base-model", tiny_base]
    assert main(argv) == 0
    assert _manifest(root)["metrics"]["adapters"] == before  # nothing trained again
    capsys.readouterr()
    assert main([*argv, "--rank", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--force" in err


def _parse(*argv: str):
    import argparse

    from training.train import add_parser

    parser = argparse.ArgumentParser(prog="persona-gym")
    add_parser(parser.add_subparsers())
    return parser.parse_args(["train", "--artifacts", "x", *argv])


def test_the_presets_are_their_configs():
    from training.sequence_training import PERSONA_TASTE
    from training.train import block_config, block_train_config, sequence_config

    assert sequence_config(_parse()) == (SequenceTrainConfig(), PERSONA_TASTE)
    assert sequence_config(_parse("--preset", "sequence")) == (SequenceTrainConfig(), PERSONA_TASTE)
    assert block_config(_parse("--preset", "block")) == block_train_config()
    assert block_config(_parse("--preset", "paper")) == TrainConfig()
    # the block preset's cues can be turned off one by one
    no_surprise = block_config(_parse("--preset", "block", "--no-surprise-cue")).prompt
    assert not no_surprise.surprise_cue and no_surprise.item_tokens and no_surprise.cf_prior


def test_the_sequence_recipe_written_out_covers_every_field():
    assert sorted(SEQUENCE_PROMPT) == sorted(PROMPT_FIELDS)
    assert sorted(SEQUENCE_CONFIG) == sorted(SEQUENCE_FIELDS)
    assert dataclasses.asdict(SequenceTrainConfig()) == SEQUENCE_CONFIG


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--preset", "block", "--targets-per-user", "8"], "--targets-per-user"),
        (["--lora-layers", "2"], "--lora-layers"),
        (["--preset", "paper", "--history", "8"], "--history"),
        (["--preset", "sequence", "--lora-layers", "2"], "--lora-layers"),
        (
            ["--preset", "sequence", "--item-tokens", "--no-compile"],
            "--[no-]item-tokens, --no-compile",
        ),
    ],
)
def test_options_of_the_other_trainer_are_refused_in_one_line(argv, named, tmp_path, capsys):
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
    assert not loaded.prompt_config.item_tokens and not loaded.prompt_config.cf_cue
    training = loaded.manifest["training"]
    assert "sequence" not in training and training["lora_layers"] == 2
    assert training["learning_rate"] == 5e-4 and training["prompt"]["persona_taste"] == 0.0
