"""The protocol split an artifacts directory was distilled from, rebuilt from ``split.json``.

``split.json`` records the dataset and the :func:`~persona_gym.data.splits.protocol_split`
parameters, never ratings (MovieLens may not be redistributed). The dataset is its
``RatingsDataset.source``: a known name (``ml-100k``, ``ml-1m``: the data folder or the bundled
copy, as the shipped simulator records it) or the absolute path of the folder it was read
from, so that the split is found again from any working folder. :func:`rebuild_split` reruns
the split from the local dataset; :func:`logged_data` also checks that it is the split the
artifacts hold and returns the simulated users' held-out test interactions with the
train/background ratings, for every evaluation on logged data.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from persona_gym.data.movielens import RatingsDataset, load_dataset
from persona_gym.data.splits import Split, protocol_split

if TYPE_CHECKING:
    from persona_gym.artifacts import Artifacts

__all__ = ["USER_GROUPS", "EvalData", "logged_data", "read_split_record", "rebuild_split"]


@dataclass
class EvalData:
    """What an evaluation on logged data reads: test interactions, and train/background."""

    test: pd.DataFrame  # user_id, item_id, item_index, rating, timestamp
    train: pd.DataFrame  # user_id, item_id, rating, timestamp (the selected users' training part)
    background: pd.DataFrame  # other users' ratings (may be empty)
    source: str


def read_split_record(root: str | Path) -> dict[str, Any]:
    """``split.json`` of an artifacts directory, checked to name a dataset and parameters."""
    path = Path(root) / "split.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: the artifacts were not written by `persona-gym "
            "distill`; pass the test interactions to evaluate(test=...) instead"
        )
    info = json.loads(path.read_text())
    if "params" not in info or "dataset" not in info:
        raise ValueError(
            f"{path} lacks 'dataset'/'params' (written by an older distill?); re-run "
            "`persona-gym distill` or pass evaluate(test=...)"
        )
    return info


def rebuild_split(
    info: dict[str, Any], where: str | Path = "split.json"
) -> tuple[RatingsDataset, Split]:
    """The dataset and protocol split a ``split.json`` record names, from the local dataset
    (``where``: the record's path, for the error messages)."""
    dataset = _recorded_dataset(str(info["dataset"]), where)
    return dataset, protocol_split(dataset, **info["params"])


def _recorded_dataset(source: str, where: str | Path) -> RatingsDataset:
    """The dataset ``split.json`` records, or an error saying why it is not found and the fix."""
    from persona_gym.data.download import KNOWN_DATASETS

    try:
        return load_dataset(source)
    except FileNotFoundError as error:
        if source in KNOWN_DATASETS or Path(source).expanduser().exists():
            raise  # the message names the fetch command, or what the folder lacks
        rebuild = (
            "or rebuild the artifacts from where the files are now (`persona-gym build FOLDER "
            "--out DIR --force`)"
        )
        if Path(source).is_absolute():
            raise FileNotFoundError(
                f"{where} records the dataset folder {source}, which is gone: put the MovieLens files "
                f"back there, {rebuild}"
            ) from error
        raise FileNotFoundError(
            f"{where} records the dataset {source!r}, a folder relative to where the artifacts were "
            f"distilled (distill recorded only the folder's name before it recorded absolute paths): "
            f"run this command from the folder that holds {source!r}, {rebuild}"
        ) from error


USER_GROUPS = ("training", "others")


def logged_data(artifacts: Artifacts, users: str = "training") -> EvalData:
    """Rebuild the protocol split recorded in ``split.json`` and check it matches the artifacts.

    ``users``: whose held-out interactions are the test set: ``"training"``, the protocol users
    the adapters were trained on, or ``"others"``, the other simulated users of an ``all_users``
    split (``persona-gym distill --all-users``), whom the adapters never saw.
    """
    if users not in USER_GROUPS:
        raise ValueError(f"users must be one of {USER_GROUPS}, got {users!r}")
    path = Path(artifacts.root) / "split.json"
    info = read_split_record(artifacts.root)
    _, split = rebuild_split(info, path)
    recorded = [int(u) for u in info.get("user_ids", [])]
    if recorded != [int(u) for u in split.user_ids]:
        diff = sorted(set(recorded) ^ {int(u) for u in split.user_ids})
        raise ValueError(
            f"{path}: the rebuilt {info['dataset']} split ({info['params']}) selects other users "
            f"than the artifacts record ({len(diff)} differ, e.g. {diff[:5]}): the dataset files or "
            "the split code changed since `persona-gym distill`; re-distil and retrain"
        )
    if users == "others" and split.other_test is None:
        raise ValueError(
            f"{path}: the split simulates no other users; distil with --all-users "
            "(`persona-gym build DATASET --all-users`) to evaluate users the adapters never saw"
        )
    simulated = set(artifacts.user_ids)
    memories = artifacts.memories
    train = split.simulated_train()
    train_mine = train[train["user_id"].isin(simulated)]
    logged = set(zip(memories["user_id"], memories["item_id"], memories["rating"], strict=True))
    expected = set(
        zip(train_mine["user_id"], train_mine["item_id"], train_mine["rating"], strict=True)
    )
    if logged != expected:
        raise ValueError(
            f"{artifacts.root}/memories.parquet does not hold exactly the training interactions of "
            f"the rebuilt split ({len(logged ^ expected)} differ): re-run `persona-gym distill`"
        )
    held = split.test if users == "training" or split.other_test is None else split.other_test
    test = held[held["user_id"].isin(simulated)].copy()
    test["item_index"] = artifacts.catalog.indices_of(test["item_id"])
    source = f"{info['dataset']} protocol split {info['params']}" + (
        ", other users" if users == "others" else ""
    )
    return EvalData(test, split.train, split.background, source)
