"""What artifacts record of their dataset (``RatingsDataset.source``) finds the same files from
any working folder: a known name stays a name, a folder becomes its absolute path (issue 20)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from persona_gym.catalog import ItemCatalog
from persona_gym.data import load_dataset, load_ml1m, protocol_split
from persona_gym.data.protocol import read_split_record, rebuild_split
from persona_gym.distill import DataDistiller, write_artifacts
from tests.data.test_movielens import write_ml1m
from tests.envs.test_ml1m import write_ml1m_folder


def test_a_folder_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    write_ml1m(tmp_path / "ml1m")
    monkeypatch.chdir(tmp_path)
    dataset = load_dataset("ml1m")
    assert dataset.name == "ml1m" and dataset.source == str(tmp_path.resolve() / "ml1m")
    assert load_ml1m(Path("ml1m")).source == dataset.source  # the loaders themselves too


def test_a_known_name_stays_a_name(tmp_path, monkeypatch):
    assert load_dataset("ml-100k").source == "ml-100k"  # the bundled copy
    write_ml1m(tmp_path / "data" / "ml-1m")
    monkeypatch.setenv("PERSONA_GYM_DATA_DIR", str(tmp_path / "data"))
    assert load_dataset("ml-1m").source == "ml-1m"  # the data folder: found by name again
    # another data folder than the default is not found by name later: its path is recorded
    other = tmp_path / "elsewhere"
    write_ml1m(other / "ml-1m")
    assert load_dataset("ml-1m", data_dir=other).source == str((other / "ml-1m").resolve())


def test_split_json_rebuilds_the_split_from_another_folder(tmp_path, monkeypatch):
    write_ml1m_folder(tmp_path / "work" / "ml1m")
    monkeypatch.chdir(tmp_path / "work")
    dataset = load_dataset("ml1m")  # relative, as `distill --dataset ml1m` gets it
    split = protocol_split(dataset, n_users=3, seed=0)
    catalog = ItemCatalog.from_frames(dataset.items, split.item_stats())
    result = DataDistiller().distill(dataset, split, catalog)
    embeddings = np.zeros((len(catalog), 4), np.float32)
    write_artifacts(tmp_path / "art", dataset, split, catalog, result, embeddings, {})

    info = read_split_record(tmp_path / "art")
    assert info["dataset"] == str((tmp_path / "work" / "ml1m").resolve())
    monkeypatch.chdir(tmp_path)  # "ml1m" does not exist here
    again, rebuilt = rebuild_split(info)
    assert list(rebuilt.user_ids) == list(split.user_ids)
    assert again.ratings.equals(dataset.ratings)


def test_a_record_that_no_longer_resolves_says_why_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = {"n_users": 3, "seed": 0}
    where = tmp_path / "art" / "split.json"
    # what distill recorded before: the folder's name only
    with pytest.raises(
        FileNotFoundError,
        match=r"records the dataset 'ml1m', a folder relative.*"
        r"run this command from the folder.*persona-gym build",
    ):
        rebuild_split({"dataset": "ml1m", "params": params}, where)
    gone = str(tmp_path / "moved" / "ml1m")
    with pytest.raises(
        FileNotFoundError,
        match=r"records the dataset folder .*ml1m, which is gone: "
        r"put the MovieLens files back there",
    ):
        rebuild_split({"dataset": gone, "params": params}, where)
    # a known name keeps its own message (the fetch command)
    monkeypatch.setenv("PERSONA_GYM_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="persona-gym data fetch ml-1m"):
        rebuild_split({"dataset": "ml-1m", "params": params}, where)


def test_the_shipped_simulator_records_a_name():
    from persona_gym.registry import simulator_dir

    info = json.loads((simulator_dir("ml-100k") / "split.json").read_text())
    assert info["dataset"] == "ml-100k"
