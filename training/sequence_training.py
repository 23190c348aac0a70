"""Train the sequence user model's persona adapters (:mod:`persona_gym.simulator.sequence`).

Each persona adapter (LoRA on every layer, its soft tokens and its collaborative prior) reads
its users' logged rating sequences in the simulator's layout: a static prefix of ``history``
events, then blocks of ``window`` events and a target whose rating is read at its item token.
Each epoch draws each user's prefix end anew and up to ``targets_per_user`` targets after it, so
the gap between the prefix and the window ranges from none to the whole training part, as it
does for a late test rating or deep in an episode (a model trained only on contiguous context
learns to trust a prefix that is stale by then). The last ``val_per_user`` ratings of each user
are the validation slice (never trained on), scored in the simulator's layout for a first test
rating; it chooses the step to keep (the lowest validation RMSE: the adapters overfit within a
few epochs). The prior alone is scored on the same slice, so what the SLM adds is measured while
it trains.

``persona-gym train --artifacts DIR --preset sequence`` (with :class:`SequenceTrainConfig` and
:func:`sequence_prompt`) reads what ``persona-gym distill`` and ``persona-gym personas`` wrote
into DIR and writes the adapters and the manifest. The model was measured and is not shipped:
the shipped simulator is the block trainer's (``persona-gym train``'s default preset).
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from persona_gym.artifacts import (
    ArtifactsError,
    load_personas,
    load_tables,
    prepare_stage,
    tables_digest,
    training_users,
    write_manifest,
)
from persona_gym.artifacts.manifest import MANIFEST
from persona_gym.assets import DEFAULT_SLM, model_source, resolve_model
from persona_gym.catalog import ItemCatalog
from persona_gym.errors import ConfigError
from persona_gym.ratings import RATING_VALUES
from persona_gym.simulator.collaborative import (
    CF_FILE,
    CollaborativeModel,
    gained,
    load_collaborative,
    persona_tastes,
    taste_axes,
)
from persona_gym.simulator.prompt_config import PromptConfig
from persona_gym.simulator.rating_prior import RatingPrior, fit_rating_prior
from persona_gym.simulator.sequence import (
    SequenceLM,
    SequenceTokens,
    UserSequence,
    item_features,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceTrainConfig:
    """How the persona adapters of the sequence user model are trained.

    Attributes:
        history: logged events in a user's static prefix (the simulator's layout).
        window: events after the prefix that a step shows (``k``).
        targets_per_user: target events per user and epoch, read after a prefix drawn anew
            each epoch (:func:`_examples`).
        rank, alpha, dropout: the LoRA adapters (every linear layer of every block).
        learning_rate: AdamW, linear warm-up over the first 10% of steps, then constant.
        epochs: passes over the training users (early stopping keeps the best step).
        batch: users per optimiser step.
        mse_weight: weight of the squared error of the expected rating beside the NLL.
        val_per_user: each user's last ratings held out as the validation slice.
        other_users: also train each adapter on the dataset's other users (those the simulator
            does not simulate) nearest its persona's taste, with out-of-fold collaborative
            predictions (:func:`other_users`); the validation slice stays the simulated users'.
        eval_every: optimiser steps between validation passes.
        seed: shuffling and initialisation.
    """

    history: int = 32
    window: int = 3
    targets_per_user: int = 32
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    learning_rate: float = 3e-4
    epochs: int = 3
    batch: int = 4
    mse_weight: float = 0.1
    val_per_user: int = 5
    other_users: bool = False
    eval_every: int = 5
    seed: int = 0


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


PERSONA_TASTE = 0.75  # the shipped share of a user's collaborative taste their persona owns


@dataclass
class SequenceInputs:
    """What the trainer reads from a directory written by ``persona-gym distill`` and
    ``persona-gym personas`` (no manifest needed): the logged ratings, the item features, the
    collaborative model, the personas, the collaborative taste each training user is
    predicted with (their own moved toward their persona's, ``PromptConfig.persona_taste``),
    and the protocol split's other users' ratings and training share (what the collaborative
    model was fitted with beside the logged ratings; none for artifacts without a recorded
    protocol split)."""

    memories: pd.DataFrame
    item_embeddings: np.ndarray
    collaborative: CollaborativeModel
    user_persona: dict[int, int]
    users: list[int]  # the adapters' training users (the protocol users of split.json)
    tastes: dict[int, np.ndarray | None]
    catalog: ItemCatalog
    background: pd.DataFrame  # user_id, item_id, rating, timestamp of the other users
    train_fraction: float  # the protocol's share of each user's ratings before their test part

    @classmethod
    def load(cls, root: str | Path, persona_taste: float = PERSONA_TASTE) -> SequenceInputs:
        from persona_gym.data.protocol import read_split_record, rebuild_split

        root = Path(root)
        catalog, profiles, memories, item_embeddings = load_tables(root)
        if not (root / CF_FILE).exists():
            raise ArtifactsError(
                f"{root / CF_FILE} not found: the sequence user model reads the collaborative "
                f"model; re-run `persona-gym distill --out {root} --force` with this version"
            )
        collaborative = load_collaborative(root / CF_FILE)
        user_persona = load_personas(root)
        users = [u for u in training_users(root, profiles) if u in user_persona]
        tastes: dict[int, np.ndarray | None] = dict.fromkeys(users)
        if persona_taste:
            means = persona_tastes(collaborative, user_persona, users)
            axes = taste_axes(means)
            tastes = {
                u: collaborative.taste_of(u, means[user_persona[u]], persona_taste, axes)
                for u in users
            }
        record = (
            json.loads((root / "split.json").read_text()) if (root / "split.json").exists() else {}
        )
        background = memories.iloc[:0][list(RATING_COLUMNS)]
        if "params" in record:
            _, split = rebuild_split(read_split_record(root), root / "split.json")
            background = split.background[list(RATING_COLUMNS)]
        train_fraction = float(record.get("params", {}).get("train_fraction", TRAIN_FRACTION))
        return cls(
            memories,
            item_embeddings,
            collaborative,
            user_persona,
            users,
            tastes,
            catalog,
            background.reset_index(drop=True),
            train_fraction,
        )

    def personas(self) -> dict[str, list[int]]:
        """``{adapter name: its training users}``, one adapter per persona."""
        out: dict[str, list[int]] = {}
        for user in self.users:
            out.setdefault(f"persona-{self.user_persona[user]}", []).append(user)
        return {name: sorted(out[name]) for name in sorted(out)}


RATING_COLUMNS = ("user_id", "item_id", "rating", "timestamp")
TRAIN_FRACTION = 0.6  # for artifacts whose split.json records none


@dataclass(frozen=True)
class TrainingSequence:
    """One user's ratings as the trainer reads them: early ratings with the predictions a
    logged rating gets at simulation time (the collaborative model fitted with it out of fold),
    late ones (from ``boundary`` on) with the predictions a test rating gets (a model fitted
    without the user's late ratings: stale by the time they were given)."""

    seq: UserSequence
    boundary: int
    persona: int


def training_sequences(
    inputs: SequenceInputs,
    other_users: bool,
    persona_taste: float = PERSONA_TASTE,
    seed: int = 0,
    folds: int = 5,
) -> dict[int, TrainingSequence]:
    """The training users' sequences (and the other users' with ``other_users``), split as the
    protocol splits a simulated user: the first ``train_fraction`` of each user's ratings early,
    the rest late.

    What a simulated user's test rating is compared with (its collaborative prediction) comes
    from a model that never saw that user's later ratings, so the residuals of a test period
    drift and carry over from one rating to the next far more than the residuals of ratings
    predicted out of fold within one period do. The late ratings reproduce this: each is
    predicted by the collaborative blend refitted (with its recorded parameters) on everything
    but the late ratings of its user's fold of users (``folds`` seeded folds). Early ratings of
    the simulated users keep their logged out-of-fold predictions; early ratings of the other
    users get the same (random folds of their ratings, the model refitted without each). Every
    prediction then moves with the user's persona taste and the model's gain, as
    :meth:`CollaborativeModel.predict` moves a logged one. Another user's persona is the one
    whose taste is nearest theirs along the axes that separate the personas.
    """
    from persona_gym.simulator.cf_models import BiasedMF, ItemKNN

    cf = inputs.collaborative
    w = float(cf.params["blend"])
    mf_params = {k: v for k, v in cf.params["mf"].items() if k != "seed"}

    def refit(fit_on: pd.DataFrame, rows: pd.DataFrame) -> np.ndarray:
        pairs = rows["user_id"], rows["item_id"]
        mf = BiasedMF(**mf_params, seed=seed).fit(fit_on).predict(*pairs)
        knn = ItemKNN(**cf.params["knn"]).fit(fit_on).predict(*pairs)
        return np.clip((1.0 - w) * mf + w * knn, 1.0, 5.0)

    train = inputs.memories[list(RATING_COLUMNS)]
    everyone = pd.concat([train.assign(simulated=True), inputs.background.assign(simulated=False)])
    everyone = everyone.assign(item_index=inputs.catalog.indices_of(everyone["item_id"]))
    everyone = everyone.sort_values(["user_id", "timestamp", "item_index"], kind="stable")
    everyone = everyone.reset_index(drop=True)
    position = everyone.groupby("user_id").cumcount().to_numpy()
    count = everyone.groupby("user_id")["item_id"].transform("size").to_numpy()
    boundary = np.rint(inputs.train_fraction * count).astype(np.int64)
    late = position >= boundary
    read = everyone["simulated"].to_numpy(bool) | other_users
    read = read & (cf.user_rows(everyone["user_id"]) >= 0)
    blend = np.full(len(everyone), np.nan)
    rng = np.random.default_rng([seed, folds])
    users = everyone["user_id"].unique()
    user_fold = dict(zip(users, rng.integers(0, folds, len(users)), strict=True))
    fold_of_user = everyone["user_id"].map(user_fold).to_numpy()
    for f in range(folds):
        held = late & (fold_of_user == f)
        if (held & read).any():
            blend[held & read] = refit(everyone[~held], everyone[held & read])
    row_fold = rng.integers(0, folds, len(everyone))
    other_early = read & ~late & ~everyone["simulated"].to_numpy()
    for f in range(folds):
        held = other_early & (row_fold == f)
        if held.any():
            blend[held] = refit(everyone[~held], everyone[held])

    means = persona_tastes(cf, inputs.user_persona, inputs.users)
    axes = taste_axes(means)
    personas = sorted(means)
    centres = np.stack([means[p] for p in personas]) @ axes.T if len(axes) else None
    gain = float(cf.params.get("gain", 1.0))
    out = {}
    for user, rows in everyone[read].groupby("user_id").indices.items():
        index = np.flatnonzero(read)[rows]
        items = everyone["item_index"].to_numpy()[index]
        row = int(cf.user_rows([user])[0])
        own = cf.user_factors[row]
        if user in inputs.user_persona:
            persona = inputs.user_persona[int(user)]
            taste = inputs.tastes.get(int(user))
        else:
            nearest = ((own @ axes.T - centres) ** 2).sum(1) if centres is not None else [0]
            persona = personas[int(np.argmin(nearest))]
            taste = cf.taste_of(int(user), means[persona], persona_taste, axes)
        level = np.full(len(items), cf.mu + cf.user_bias[row])
        shift = 0.0 if taste is None else (1.0 - w) * (cf.item_factors[items] @ (taste - own))
        predicted = gained(level, blend[index] + shift, gain)
        if user in inputs.user_persona:  # early: their logged out-of-fold predictions
            early = ~late[index]
            predicted[early] = cf.predict([user] * int(early.sum()), items[early], taste)
        ratings = everyone["rating"].to_numpy(np.float32)[index]
        out[int(user)] = TrainingSequence(
            UserSequence(items, ratings, predicted.astype(np.float32)),
            int(boundary[index[0]]),
            persona,
        )
    return out


def _slice(seq: UserSequence, start: int, end: int) -> UserSequence:
    return UserSequence(seq.items[start:end], seq.ratings[start:end], seq.predictions[start:end])


@dataclass
class BlockExample:
    """One user's static prefix and the blocks read after it, laid out as the simulator does:
    ``[head] prefix | block`` for each block, every block on the same prefix (its own copy of
    the prefix's keys/values) at the positions that follow it. A block is ``window`` events and
    a target event, ``2 window + 1`` tokens (the target's rating token is not shown); its
    last ``targets`` events are read (their ratings at their item tokens)."""

    prefix: UserSequence
    blocks: list[UserSequence]
    targets: list[int]


def _examples(
    users: dict[int, TrainingSequence], config: SequenceTrainConfig, rng: np.random.Generator
) -> list[BlockExample]:
    """This epoch's training examples, each user's late ratings read as a simulated user's test
    ratings are: the prefix is the ``history`` events before the last ``window`` early ones,
    a block the ``window`` events before a late target (up to ``targets_per_user`` of them
    drawn), so the gap between prefix and window runs from none to the whole late part. The
    late events of a window are read too; a simulated user's last ``val_per_user`` ratings are
    left out (the validation slice)."""
    k = config.window
    out = []
    for user in users.values():
        seq, b = user.seq, user.boundary
        n = len(seq) - config.val_per_user
        if b - k < 1 or n <= b:
            continue
        targets = np.arange(b, n)
        if len(targets) > config.targets_per_user:
            targets = np.sort(rng.choice(targets, config.targets_per_user, replace=False))
        prefix = _slice(seq, max(0, b - k - config.history), b - k)
        blocks = [_slice(seq, int(t) - k, int(t) + 1) for t in targets]
        out.append(BlockExample(prefix, blocks, [min(k + 1, int(t) - b + 1) for t in targets]))
    return out


def _val_examples(
    users: dict[int, TrainingSequence], config: SequenceTrainConfig
) -> list[BlockExample]:
    """Each simulated user's last ``val_per_user`` ratings, read as their :func:`_examples`
    late ratings are (the target alone)."""
    k = config.window
    out = []
    for user in users.values():
        seq, b = user.seq, user.boundary
        first = len(seq) - config.val_per_user
        start = max(0, min(b, first) - k)
        prefix = _slice(seq, max(0, start - config.history), start)
        blocks = [_slice(seq, max(0, t - k), t + 1) for t in range(first, len(seq))]
        out.append(BlockExample(prefix, blocks, [1] * len(blocks)))
    return out


def block_logits(
    lm: SequenceLM, tokens: SequenceTokens, examples: list[BlockExample]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rating logits of the target events of ``examples``' blocks, with their 1..5 ratings and
    collaborative predictions: each prefix runs once, then its blocks on copies of its
    keys/values (as :meth:`SequenceRatingModel.score_logits` does)."""
    from transformers import DynamicCache

    head = lm.head
    groups: dict[tuple[int, int, int], list[tuple[int, UserSequence]]] = {}
    for i, ex in enumerate(examples):
        for block, targets in zip(ex.blocks, ex.targets, strict=True):
            groups.setdefault((len(ex.prefix), len(block), targets), []).append((i, block))
    logits, ratings, predictions = [], [], []
    for (_, length, targets), group in groups.items():
        owners = sorted({i for i, _ in group})
        prefixes = torch.stack(
            [torch.cat([head, examples[i].prefix.embed(tokens)]) for i in owners]
        )
        cache = lm.body(inputs_embeds=prefixes, use_cache=True).cache
        row_of = {i: row for row, i in enumerate(owners)}
        index = torch.tensor([row_of[i] for i, _ in group])
        layers = [(layer.keys[index], layer.values[index]) for layer in cache.layers]
        blocks = [block for _, block in group]
        embeds = torch.stack([block.embed(tokens)[:-1] for block in blocks])
        start = prefixes.shape[1]
        positions = torch.arange(start, start + embeds.shape[1])[None].expand(len(blocks), -1)
        hidden = lm.body(
            inputs_embeds=embeds, cache=DynamicCache(layers), position_ids=positions
        ).last_hidden_state
        events = list(range(length - targets, length))
        logits.append(lm.logits(hidden[:, [2 * j for j in events]]).reshape(-1, 5))
        ratings.append(
            torch.from_numpy(np.rint(np.stack([b.ratings[events] for b in blocks])))
            .long()
            .reshape(-1)
        )
        predictions.append(
            torch.from_numpy(np.stack([b.predictions[events] for b in blocks])).reshape(-1)
        )
    return torch.cat(logits), torch.cat(ratings), torch.cat(predictions)


def _with_prior(prior: RatingPrior, logits: torch.Tensor, predictions: torch.Tensor):
    return prior(logits, predictions, torch.zeros_like(predictions))


def _scores(logits: torch.Tensor, ratings: torch.Tensor) -> dict[str, float]:
    probs = logits.softmax(-1)
    expected = probs @ torch.as_tensor(RATING_VALUES, dtype=torch.float32)
    nll = torch.nn.functional.cross_entropy(logits, ratings - 1)
    rmse = ((expected - ratings.float()) ** 2).mean().sqrt()
    return {"nll": float(nll), "rmse": float(rmse), "n": len(ratings)}


def train_sequence_adapter(
    name: str,
    inputs: SequenceInputs,
    users: list[int],
    sequences: dict[int, TrainingSequence],
    base: torch.nn.Module,
    tokenizer,
    config: SequenceTrainConfig,
    out: Path,
    persona_taste: float = PERSONA_TASTE,
    base_model: dict | None = None,
) -> dict:
    """Train one persona adapter on its ``users`` and the other users of its persona in
    ``sequences`` (:func:`training_sequences`); save it under ``out / name``
    (``persona_taste`` and the ``base_model``'s identity are recorded with it: a rerun reuses
    it only for the same ones)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    persona = inputs.user_persona[users[0]]
    trained_on = {u: seq for u, seq in sequences.items() if seq.persona == persona}
    simulated = {u: trained_on[u] for u in users if u in trained_on}
    val = _val_examples(simulated, config)
    n_train = len(_examples(trained_on, config, np.random.default_rng(config.seed)))
    if not n_train or not val:
        raise ConfigError(
            f"{name}: no training example: its {len(users)} users have no rating after the "
            f"first {inputs.train_fraction:.0%} of theirs but the last val_per_user = "
            f"{config.val_per_user}; lower --val-per-user"
        )
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=TARGETS,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora, adapter_name=name)
    lm = SequenceLM(model, tokenizer)
    features = item_features(inputs.item_embeddings, inputs.collaborative, inputs.catalog.genres)
    tokens = SequenceTokens.initial(features, lm, tokenizer)
    # the prior starts fitted to every rating it may train on, then trains with the adapter
    fit_on = [u.seq for u in simulated.values()]
    end = -config.val_per_user or None
    ratings_fit = np.concatenate([np.rint(seq.ratings[config.window : end]) for seq in fit_on])
    preds_fit = np.concatenate([seq.predictions[config.window : end] for seq in fit_on])
    prior = fit_rating_prior(preds_fit, np.zeros_like(preds_fit), ratings_fit.astype(np.int64))
    prior.memory.requires_grad_(False)  # no window term: the window is the SLM's

    params = [p for p in model.parameters() if p.requires_grad]
    params += list(tokens.parameters()) + [prior.log_precision, prior.bias]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    per_epoch = int(np.ceil(n_train / config.batch))
    steps = config.epochs * per_epoch
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))

    def validate() -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            logits, ratings, predictions = block_logits(lm, tokens, val)
            return _scores(_with_prior(prior, logits, predictions), ratings)

    with torch.no_grad():
        val_ratings = torch.tensor(
            [int(round(float(b.ratings[-1]))) for e in val for b in e.blocks]
        )
        val_preds = torch.tensor([float(b.predictions[-1]) for e in val for b in e.blocks])
        prior_only = _scores(
            _with_prior(prior, torch.zeros(len(val_ratings), 5), val_preds), val_ratings
        )
    log.info(
        "%s: %d training users (%d of them other users), %d val ratings; prior alone %s",
        name,
        len(trained_on),
        len(trained_on) - len(simulated),
        len(val_ratings),
        prior_only,
    )
    best = validate()
    best_state = _snapshot(model, tokens, prior)
    history = [{"step": 0, **best}]
    started = time.perf_counter()
    step = 0
    for epoch in range(config.epochs):
        train = _examples(trained_on, config, rng)
        order = rng.permutation(len(train))
        for first in range(0, len(order), config.batch):
            model.train()
            batch = [train[i] for i in order[first : first + config.batch]]
            logits, ratings, predictions = block_logits(lm, tokens, batch)
            logits = _with_prior(prior, logits, predictions)
            expected = logits.softmax(-1) @ torch.as_tensor(RATING_VALUES, dtype=torch.float32)
            loss = torch.nn.functional.cross_entropy(logits, ratings - 1)
            loss = loss + config.mse_weight * ((expected - ratings.float()) ** 2).mean()
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            log.debug("%s step %d: loss %.4f", name, step, float(loss.detach()))
            if step % config.eval_every == 0 or step == steps:
                scores = validate()
                history.append({"step": step, "loss": float(loss.detach()), **scores})
                log.info(
                    "%s step %d/%d (epoch %d): loss %.4f val %s (%.0f s)",
                    name,
                    step,
                    steps,
                    epoch,
                    float(loss.detach()),
                    scores,
                    time.perf_counter() - started,
                )
                if scores["rmse"] < best["rmse"]:
                    best, best_state = scores, _snapshot(model, tokens, prior)
    _restore(model, tokens, prior, best_state)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), selected_adapters=[name])
    tokens.save(folder)
    prior.save(folder)
    metrics = {
        "config": asdict(config),
        "persona_taste": persona_taste,
        "base_model": base_model,
        "best": best,
        "prior_alone": prior_only,
        "history": history,
        "steps": step,
        "seconds": time.perf_counter() - started,
        "training_users": len(trained_on),
        "other_users": len(trained_on) - len(simulated),
    }
    (folder / "training.json").write_text(json.dumps(metrics, indent=1))
    model.unload()
    return metrics


def _snapshot(model, tokens, prior) -> dict:
    lora = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    return {
        "lora": lora,
        "tokens": {k: v.clone() for k, v in tokens.state_dict().items()},
        "prior": {k: v.detach().clone() for k, v in prior.state_dict().items()},
    }


def _restore(model, tokens, prior, state: dict) -> None:
    model.load_state_dict(state["lora"], strict=False)
    tokens.load_state_dict(state["tokens"])
    prior.load_state_dict(state["prior"])


SEQUENCE_PROMPT: dict[str, Any] = {
    "n_memories": 0,
    "use_profile": False,
    "crowd_cue": False,
    "item_tokens": False,
    "cf_cue": True,
    "surprise_cue": False,
    "cf_items": False,
    "cf_prior": True,
    "layout": "sequence",
}


def sequence_prompt(
    config: SequenceTrainConfig, persona_taste: float = PERSONA_TASTE
) -> PromptConfig:
    """The prompt config of artifacts trained with ``config``: the sequence layout (its
    ``history`` and ``window``), the collaborative cue and prior, ``persona_taste``."""
    return PromptConfig(
        **SEQUENCE_PROMPT,
        window_size=config.window,
        history=config.history,
        persona_taste=persona_taste,
    )


def _same_run(root: Path, config: SequenceTrainConfig, prompt: PromptConfig, base: dict) -> bool:
    """Whether ``root``'s manifest records sequence adapters of this config, prompt and base."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        return (
            manifest["training"].get("sequence") == asdict(config)
            and manifest["prompt"] == asdict(prompt)
            and manifest["base_model"] == base
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def install_adapters(
    root: Path,
    trained: Path,
    config: SequenceTrainConfig,
    metrics: dict,
    prompt: PromptConfig,
    base_model: str,
    run: dict | None = None,
) -> dict:
    """Make the adapters trained under ``trained`` (one folder per name in ``metrics``) the
    artifacts' adapters and write the manifest (as ``persona-gym train`` does: base model,
    dataset, protocol, tables, seeds, personas, adapters, the sequence prompt, this training's
    config and its metrics); return it."""
    adapters = {}
    for name in sorted(metrics):
        target = root / "adapters" / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(trained / name, target)
        adapters[name] = f"adapters/{name}"
    if (root / "adapters").is_dir():
        for folder in (root / "adapters").iterdir():
            if folder.is_dir() and folder.name not in metrics:
                shutil.rmtree(folder)
    split_path = root / "split.json"
    split_info = json.loads(split_path.read_text()) if split_path.exists() else {}
    personas: dict[str, list[int]] = defaultdict(list)
    for user, p in sorted(load_personas(root).items()):
        personas[str(p)].append(user)
    manifest = {
        "base_model": model_source(resolve_model(base_model)),
        "dataset": split_info.get(
            "dataset", split_info.get("params", {}).get("dataset", "unknown")
        ),
        "protocol": split_info,
        "tables_sha256": tables_digest(root),
        "seeds": {"training": config.seed},
        "personas": dict(personas),
        "adapters": adapters,
        "prompt": asdict(prompt),
        "training": {"base_model": base_model, "sequence": asdict(config)},
        "metrics": {"adapters": metrics, **({"run": run} if run is not None else {})},
    }
    return write_manifest(root, manifest)


def train_sequence(
    root: str | Path,
    config: SequenceTrainConfig | None = None,
    base_model: str | None = None,
    persona_taste: float = PERSONA_TASTE,
    force: bool = False,
) -> dict[str, dict]:
    """Train every persona adapter of the directory ``root`` (written by ``persona-gym
    distill`` and ``persona-gym personas``) on its training users, then install them and write
    the manifest (:func:`install_adapters`). A directory with adapters of another run is
    refused unless ``force``, which deletes them (and the evaluation) first. Resumable: a
    persona whose adapter was already trained with this config, taste share and base model
    (under ``root/cache/sequence``) is not trained again."""
    from persona_gym.assets import load_causal_lm

    root = Path(root)
    config = config or SequenceTrainConfig()
    name = base_model or DEFAULT_SLM
    prompt = sequence_prompt(config, persona_taste)
    started = time.perf_counter()
    same_run = (root / MANIFEST).exists() and _same_run(
        root, config, prompt, model_source(resolve_model(name))
    )
    prepare_stage(root, "train", force=force, same_run=same_run)
    inputs = SequenceInputs.load(root, persona_taste)
    sequences = training_sequences(inputs, config.other_users, persona_taste, config.seed)
    base_id = model_source(resolve_model(name))
    base, tokenizer = load_causal_lm(name)
    for p in base.parameters():
        p.requires_grad_(False)
    staging = root / "cache" / "sequence"
    results = {}
    for adapter, users in inputs.personas().items():
        record = staging / adapter / "training.json"
        if record.exists():
            done = json.loads(record.read_text())
            # records written before the taste share and base were recorded count as this run's
            if (
                done.get("config") == asdict(config)
                and done.get("persona_taste", persona_taste) == persona_taste
                and done.get("base_model", base_id) == base_id
            ):
                log.info("%s: already trained with this config (%s)", adapter, record)
                results[adapter] = done
                continue
        results[adapter] = train_sequence_adapter(
            adapter,
            inputs,
            users,
            sequences,
            base,
            tokenizer,
            config,
            staging,
            persona_taste,
            base_id,
        )
    run = {
        "wall_seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "training_users": len(inputs.users),
    }
    install_adapters(root, staging, config, results, prompt, name, run)
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m training.sequence_training``: ``persona-gym train`` (its default recipe)."""
    from persona_gym.cli import main as cli

    return cli(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
