"""Train the sequence user model's persona adapters (:mod:`persona_gym.simulator.sequence`).

Each persona adapter (LoRA on every layer, its soft tokens and its collaborative prior) reads
its users' logged rating sequences in the simulator's layout: a static prefix of ``history``
events, then blocks of ``window`` events and a target whose rating is read at its item token.
Each epoch draws each user's prefix end anew and up to ``targets_per_user`` targets after it, so
the gap between the prefix and the window ranges from none to the whole training part, as it
does for a late test rating or deep in an episode (a model trained only on contiguous context
learns to trust a prefix that is stale by then). The last ``val_share`` of each simulated user's
ratings is the validation stretch (never trained on), read twice as the test ratings are: with
the rolling window (each rating after its real previous ``window``, as in an episode), which
chooses the step to keep (the lowest RMSE: the adapters overfit within a few epochs), and with
the evaluator's window (the ``window`` before the stretch, each rating as many events after it
as precede it in the stretch), on which, with the rolling reads, the share of its departure from
the prior the SLM keeps at each gap is refitted (:func:`fit_gap_scale`). Every rating is read
with a collaborative prediction that never saw the stretch of the user's sequence around it
(:func:`training_sequences`), as a test rating's never saw the test period. The prior alone is
scored on the same reads, so what the SLM adds is measured while it trains.

``persona-gym train --artifacts DIR --preset sequence`` (with :class:`SequenceTrainConfig` and
:func:`sequence_prompt`) reads what ``persona-gym distill`` and ``persona-gym personas`` wrote
into DIR and writes the adapters and the manifest: the recipe of the shipped PersonaML100K-v0
simulator (``persona-gym train``'s default preset).
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
    load_collaborative,
    persona_tastes,
    taste_axes,
)
from persona_gym.simulator.prompt_config import PromptConfig
from persona_gym.simulator.rating_prior import fit_rating_prior
from persona_gym.simulator.sequence import (
    GAP_BUCKETS,
    SequenceLM,
    SequenceTokens,
    UserSequence,
    gap_bucket,
    item_features,
)
from training.adapter_training import strip_machine_path

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
        learning_rate: AdamW on the LoRA weights, linear warm-up over the first 10% of steps,
            then constant.
        token_learning_rate: the same for the soft tokens, new parameters that start from zero
            or from the LM's embeddings (the collaborative prior is fitted first and kept).
        epochs: passes over the training users (early stopping keeps the best step).
        batch: users per optimiser step.
        mse_weight: weight of the squared error of the expected rating beside the NLL.
        val_per_user: the fewest of each simulated user's last ratings held out for validation.
        val_share: the share of each simulated user's ratings held out for validation (at least
            ``val_per_user``): long enough to read the gaps of late test ratings.
        other_users: also train each adapter on the dataset's other users (those the simulator
            does not simulate) nearest its persona's taste (:func:`training_sequences`); the
            validation slice stays the simulated users'.
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
    token_learning_rate: float = 3e-3
    epochs: int = 2
    batch: int = 4
    mse_weight: float = 0.1
    val_per_user: int = 5
    val_share: float = 0.25
    other_users: bool = True
    eval_every: int = 16
    seed: int = 0


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


PERSONA_TASTE = 0.75  # the shipped share of a user's collaborative taste their persona owns


@dataclass
class SequenceInputs:
    """What the trainer reads from a directory written by ``persona-gym distill`` and
    ``persona-gym personas`` (no manifest needed): the logged ratings, the item features, the
    collaborative model, the personas, and the collaborative taste each training user is
    predicted with (their own moved toward their persona's, ``PromptConfig.persona_taste``)."""

    memories: pd.DataFrame
    item_embeddings: np.ndarray
    collaborative: CollaborativeModel
    user_persona: dict[int, int]
    users: list[int]  # the adapters' training users (the protocol users of split.json)
    tastes: dict[int, np.ndarray | None]
    catalog: ItemCatalog
    # the training users' sequences and the other users' (with their persona), with blocked
    # out-of-fold collaborative predictions (:func:`training_sequences`, :meth:`with_sequences`)
    sequences: dict[int, UserSequence] | None = None
    others: dict[int, tuple[UserSequence, int]] | None = None

    @classmethod
    def load(cls, root: str | Path, persona_taste: float = PERSONA_TASTE) -> SequenceInputs:
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
        return cls(memories, item_embeddings, collaborative, user_persona, users, tastes, catalog)

    def with_sequences(
        self,
        root: str | Path,
        persona_taste: float = PERSONA_TASTE,
        seed: int = 0,
        other_users: bool = True,
    ) -> SequenceInputs:
        """These inputs with the training users' sequences (their logged ratings) and, with
        ``other_users``, the other users' of the split recorded in ``root/split.json``
        (:func:`training_sequences`; without them its refits see the training users only)."""
        from dataclasses import replace

        from persona_gym.data.protocol import read_split_record, rebuild_split

        cols = ["user_id", "item_id", "rating", "timestamp"]
        background = self.memories[cols].iloc[:0]
        if other_users:
            _, split = rebuild_split(read_split_record(root), Path(root) / "split.json")
            background = split.background
        own, others = training_sequences(self, self.memories[cols], background, persona_taste, seed)
        return replace(self, sequences=own, others=others)

    def personas(self) -> dict[str, list[int]]:
        """``{adapter name: its training users}``, one adapter per persona."""
        out: dict[str, list[int]] = {}
        for user in self.users:
            out.setdefault(f"persona-{self.user_persona[user]}", []).append(user)
        return {name: sorted(out[name]) for name in sorted(out)}


def training_sequences(
    inputs: SequenceInputs,
    train: pd.DataFrame,
    background: pd.DataFrame,
    persona_taste: float = PERSONA_TASTE,
    seed: int = 0,
    folds: int = 5,
) -> tuple[dict[int, UserSequence], dict[int, tuple[UserSequence, int]]]:
    """The training users' sequences and the dataset's other users': ``({training user: their
    ratings in time order with blocked out-of-fold collaborative predictions}, {other user:
    (the same, the persona nearest their taste)})``.

    Each user's time-ordered ratings (``train``: the training users', ``background``: the users
    the simulator does not simulate; a user of ``train`` outside ``inputs.users`` is left out) are
    cut into ``folds`` contiguous stretches; stretch ``f`` of every user is predicted by the
    collaborative model's blend refitted, with its recorded parameters, on all the other
    stretches. A rating's prediction never sees it nor the ratings
    around it, as a test rating's never sees the test period: what the user's last ratings
    carry beyond the collaborative model stays in the residuals the SLM learns from (a random
    fold would leave the neighbours in the fit, which absorbs most of it). A user's taste moves
    toward their persona's as in the simulator (``inputs.tastes``; an other user's toward the
    persona nearest theirs, the closest persona taste along the axes that separate them,
    :func:`taste_axes`), and the model's gain around the user's level applies.
    """
    from persona_gym.simulator.cf_models import BiasedMF, ItemKNN, fit_frame
    from persona_gym.simulator.collaborative import gained

    cf = inputs.collaborative
    params = cf.params
    mf_params = {k: v for k, v in params["mf"].items() if k != "seed"}
    w, gain = float(params["blend"]), float(params.get("gain", 1.0))
    cols = ["user_id", "item_id", "rating", "timestamp"]
    frame = pd.concat(
        [train[cols].assign(other=False), background[cols].assign(other=True)], ignore_index=True
    )
    frame["item_index"] = inputs.catalog.indices_of(frame["item_id"])
    frame = frame.sort_values(["user_id", "timestamp", "item_index"], kind="stable")
    frame = frame.reset_index(drop=True)
    position = frame.groupby("user_id").cumcount().to_numpy()
    length = frame.groupby("user_id")["user_id"].transform("size").to_numpy()
    fold = position * folds // length
    blend = np.zeros(len(frame))
    for f in range(folds):
        held = fold == f
        part = fit_frame(frame.loc[~held, cols], frame.loc[[], cols])
        rows = frame.loc[held, "user_id"], frame.loc[held, "item_id"]
        mf = BiasedMF(**mf_params, seed=seed).fit(part).predict(*rows)
        knn = ItemKNN(**params["knn"]).fit(part).predict(*rows)
        blend[held] = np.clip((1.0 - w) * mf + w * knn, 1.0, 5.0)
    means = persona_tastes(cf, inputs.user_persona, inputs.users)
    axes = taste_axes(means)
    personas = sorted(means)
    centres = np.stack([means[p] for p in personas]) @ axes.T
    training = set(inputs.users)
    own: dict[int, UserSequence] = {}
    others: dict[int, tuple[UserSequence, int]] = {}
    for user, rows in frame.assign(predicted=blend).groupby("user_id"):
        user = int(user)
        row = int(cf.user_rows([user])[0])
        other = bool(rows["other"].iloc[0])
        if row < 0 or not (other or user in training):
            continue
        factors = cf.user_factors[row]
        if not other:
            persona, taste = inputs.user_persona[user], inputs.tastes[user]
        else:
            persona = personas[int(np.argmin(((factors @ axes.T - centres) ** 2).sum(1)))]
            taste = cf.taste_of(user, means[persona], persona_taste, axes)
        items = rows["item_index"].to_numpy(np.int64)
        shift = 0.0 if taste is None else (1.0 - w) * (cf.item_factors[items] @ (taste - factors))
        level = np.full(len(items), cf.mu + cf.user_bias[row])
        predicted = gained(level, rows["predicted"].to_numpy() + shift, gain).astype(np.float32)
        seq = UserSequence(items, rows["rating"].to_numpy(np.float32), predicted)
        if not other:
            own[user] = seq
        else:
            others[user] = (seq, persona)
    return own, others


def _slice(seq: UserSequence, start: int, end: int) -> UserSequence:
    return UserSequence(seq.items[start:end], seq.ratings[start:end], seq.predictions[start:end])


@dataclass
class BlockExample:
    """One user's static prefix and the blocks read after it, laid out as the simulator does:
    ``[head] prefix | block`` for each block, every block on the same prefix (its own copy of
    the prefix's keys/values) at the positions that follow it. A block is ``window`` events and
    a target event, ``2 window + 1`` tokens (the target's rating token is not shown); ``gaps``:
    per block, the user's events between its window and its target."""

    prefix: UserSequence
    blocks: list[UserSequence]
    gaps: list[int]


def _examples(
    seqs: dict[int, UserSequence], config: SequenceTrainConfig, rng: np.random.Generator
) -> list[BlockExample]:
    """This epoch's training examples: for each user (``seqs``: what is trained on, the
    validation stretch cut off) a prefix end ``s`` drawn at random, the ``history`` events
    before it as the prefix, and up to ``targets_per_user`` target events ``t >= s + window``
    drawn from the rest of the sequence, each with a window of
    ``window`` events that ends ``gap`` events before it. The gap between prefix and window then
    spans what the rolling window of a test rating or an episode shows (from none to the whole
    training part), and the gap between window and target what the evaluator's window shows
    for a late test rating (:func:`_gap`)."""
    k = config.window
    out = []
    for seq in seqs.values():
        n = len(seq)
        first_end = min(config.history, max(n - k - 1, 1))
        if n - k - 1 < first_end:
            continue
        s = int(rng.integers(first_end, n - k))
        targets = np.arange(s + k, n)
        if len(targets) > config.targets_per_user:
            targets = np.sort(rng.choice(targets, config.targets_per_user, replace=False))
        gaps = [_gap(rng, int(t) - k - s) for t in targets]
        prefix = _slice(seq, max(0, s - config.history), s)
        blocks = [
            _slice(seq, int(t) - g - k, int(t) + 1) for t, g in zip(targets, gaps, strict=True)
        ]
        out.append(BlockExample(prefix, [_window_and_target(b, k) for b in blocks], gaps))
    return out


def _gap(rng: np.random.Generator, most: int) -> int:
    """A gap between window and target, at most ``most``: none half of the time (an episode's
    case), else log-uniform from 1 to 127 (a late test rating under the evaluator's window)."""
    if most <= 0 or rng.random() < 0.5:
        return 0
    return min(int(2 ** (rng.random() * 7)), most)


def _window_and_target(stretch: UserSequence, k: int) -> UserSequence:
    """The first ``k`` events of ``stretch`` and its last one."""
    keep = np.r_[np.arange(k), len(stretch) - 1]
    return UserSequence(stretch.items[keep], stretch.ratings[keep], stretch.predictions[keep])


def held_out(n: int, config: SequenceTrainConfig) -> int:
    """How many of a simulated user's ``n`` ratings (their last) are held out for validation."""
    return max(config.val_per_user, round(config.val_share * n))


def _val_examples(
    seqs: dict[int, UserSequence], config: SequenceTrainConfig, rolling: bool
) -> list[BlockExample]:
    """Each user's validation stretch (their last :func:`held_out` ratings) in the simulator's
    layout for test ratings: the prefix is the ``history`` events before the ``window`` that
    precedes the stretch; with ``rolling`` each rating is read after its real previous
    ``window`` events (an episode's window), else after that first window, as many events
    after it as precede the rating in the stretch (the evaluator's window)."""
    k = config.window
    out = []
    for seq in seqs.values():
        first = len(seq) - held_out(len(seq), config)
        s = max(0, first - k)
        prefix = _slice(seq, max(0, s - config.history), s)
        stretch = range(first, len(seq))
        if rolling:
            blocks = [_slice(seq, max(0, t - k), t + 1) for t in stretch]
            gaps = [0] * len(blocks)
        else:
            window = _slice(seq, s, first)
            blocks = [_concat(window, _slice(seq, t, t + 1)) for t in stretch]
            gaps = [t - first for t in stretch]
        out.append(BlockExample(prefix, blocks, gaps))
    return out


def _concat(a: UserSequence, b: UserSequence) -> UserSequence:
    return UserSequence(
        np.r_[a.items, b.items], np.r_[a.ratings, b.ratings], np.r_[a.predictions, b.predictions]
    )


def block_logits(
    lm: SequenceLM, tokens: SequenceTokens, examples: list[BlockExample], every_event: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The LM's logits of "1".."5" for the blocks of ``examples`` with their targets' 1..5
    ratings, collaborative predictions and gaps: each prefix runs once, then its blocks on
    copies of its keys/values (as :meth:`SequenceRatingModel.score_logits` does).
    ``every_event``: also read each window event's rating at its item token (right after the
    events before it: gap 0), not only the target's."""
    head = lm.head
    groups: dict[tuple[int, int], list[tuple[int, UserSequence, int]]] = {}
    for i, ex in enumerate(examples):
        for block, gap in zip(ex.blocks, ex.gaps, strict=True):
            groups.setdefault((len(ex.prefix), len(block)), []).append((i, block, gap))
    logits, ratings, predictions, gaps = [], [], [], []
    for (_, length), group in groups.items():
        owners = sorted({i for i, _, _ in group})
        prefixes = torch.stack(
            [torch.cat([head, examples[i].prefix.embed(tokens)]) for i in owners]
        )
        _, cache = lm.decode(prefixes)
        row_of = {i: row for row, i in enumerate(owners)}
        index = torch.tensor([row_of[i] for i, _, _ in group])
        layers = [(layer.keys[index], layer.values[index]) for layer in cache.layers]
        blocks = [block for _, block, _ in group]
        embeds = torch.stack([block.embed(tokens)[:-1] for block in blocks])
        cues = tokens.cue(
            torch.tensor([gap for _, _, gap in group]),
            torch.tensor([_slice(b, 0, len(b) - 1).surprise() for b in blocks]),
        )
        embeds = torch.cat([embeds[:, :-1], (embeds[:, -1] + cues)[:, None]], dim=1)
        start = prefixes.shape[1]
        positions = torch.arange(start, start + embeds.shape[1])[None].expand(len(blocks), -1)
        hidden, _ = lm.decode(embeds, layers, positions)
        events = list(range(length)) if every_event else [length - 1]
        logits.append(lm.logits(hidden[:, [2 * j for j in events]]).reshape(-1, 5))
        ratings.append(
            torch.from_numpy(np.rint(np.stack([b.ratings[events] for b in blocks])))
            .long()
            .reshape(-1)
        )
        predictions.append(
            torch.from_numpy(np.stack([b.predictions[events] for b in blocks])).reshape(-1)
        )
        read_at = torch.zeros(len(blocks), len(events), dtype=torch.long)
        read_at[:, -1] = torch.tensor([gap for _, _, gap in group])
        gaps.append(read_at.reshape(-1))
    return torch.cat(logits), torch.cat(ratings), torch.cat(predictions), torch.cat(gaps)


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
    base: torch.nn.Module,
    tokenizer,
    config: SequenceTrainConfig,
    out: Path,
    persona_taste: float = PERSONA_TASTE,
    base_model: dict | None = None,
) -> dict:
    """Train one persona adapter on ``users``' sequences; save it under ``out / name``
    (``persona_taste`` and the ``base_model``'s identity are recorded with it: a rerun reuses
    it only for the same ones)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    if inputs.sequences is None:
        raise ValueError("SequenceInputs.with_sequences() first: the training sequences")
    seqs = {u: inputs.sequences[u] for u in users}
    val = _val_examples(seqs, config, rolling=True)
    val_far = _val_examples(seqs, config, rolling=False)
    persona = inputs.user_persona[users[0]]
    others = {u: seq for u, (seq, p) in (inputs.others or {}).items() if p == persona}
    own = {u: _slice(seq, 0, len(seq) - held_out(len(seq), config)) for u, seq in seqs.items()}
    trained_on = {**own, **others}
    initial = _examples(trained_on, config, np.random.default_rng(config.seed))
    n_train = len(initial)
    if not n_train:
        raise ConfigError(
            f"{name}: no training example: its {len(users)} users have at most "
            f"window + 1 ratings besides their validation stretch (val_share "
            f"{config.val_share}, at least val_per_user {config.val_per_user}); "
            "lower --window or --val-per-user"
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
    fit_on = [s for s in own.values() if len(s) > config.window]
    ratings_fit = np.concatenate([np.rint(s.ratings[config.window :]) for s in fit_on])
    preds_fit = np.concatenate([s.predictions[config.window :] for s in fit_on])
    prior = fit_rating_prior(preds_fit, np.zeros_like(preds_fit), ratings_fit.astype(np.int64))
    prior.requires_grad_(False)  # fitted alone and kept: the prior-alone row of the report
    with torch.no_grad():
        # start from the prior alone: the untrained LM's mean digit logits are cancelled
        model.eval()
        tokens.offset.sub_(block_logits(lm, tokens, initial[:32], every_event=False)[0].mean(0))

    lora_params = [p for p in model.parameters() if p.requires_grad]
    new_params = list(tokens.parameters())
    params = lora_params + new_params
    optimizer = torch.optim.AdamW(
        [
            {"params": lora_params, "lr": config.learning_rate},
            {"params": new_params, "lr": config.token_learning_rate},
        ],
        weight_decay=0.0,
    )
    per_epoch = int(np.ceil(n_train / config.batch))
    steps = config.epochs * per_epoch
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))

    def reads(examples: list[BlockExample]) -> tuple[torch.Tensor, ...]:
        model.eval()
        with torch.no_grad():
            return block_logits(lm, tokens, examples, every_event=False)

    def scored(read: tuple[torch.Tensor, ...]) -> dict[str, float]:
        digits, ratings, predictions, gaps = read
        with torch.no_grad():
            return _scores(tokens.rating_logits(prior, digits, predictions, gaps), ratings)

    def prior_alone(read: tuple[torch.Tensor, ...]) -> dict[str, float]:
        _, ratings, predictions, _ = read
        zeros = torch.zeros_like(predictions)
        return _scores(prior(torch.zeros(len(ratings), 5), predictions, zeros), ratings)

    def validate() -> dict[str, float]:
        return scored(reads(val))

    start = reads(val)
    prior_only = prior_alone(start)
    log.info(
        "%s: %d training users (%d of them other users), %d val ratings; prior alone %s",
        name,
        len(trained_on),
        len(others),
        prior_only["n"],
        prior_only,
    )
    best = scored(start)
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
            logits, ratings, predictions, gaps = block_logits(lm, tokens, batch, every_event=True)
            logits = tokens.rating_logits(prior, logits, predictions, gaps)
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
    far, rolling = reads(val_far), reads(val)
    far_before = scored(far)
    digits, ratings, predictions, gaps = (
        torch.cat(pair) for pair in zip(rolling, far, strict=True)
    )
    per_bucket = fit_gap_scale(tokens, prior, digits, ratings, predictions, gaps, config.mse_weight)
    best = scored(rolling)
    refit = {
        "scale": [round(float(x), 4) for x in tokens.scale],
        "reads_per_bucket": per_bucket,
        "rolling": best,
        "far_before": far_before,
        "far": scored(far),
        "far_prior_alone": prior_alone(far),
    }
    log.info("%s: gap scale refitted on the validation stretch: %s", name, refit)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), selected_adapters=[name])
    strip_machine_path(folder / "adapter_config.json")
    tokens.save(folder)
    prior.save(folder)
    metrics = {
        "config": asdict(config),
        "persona_taste": persona_taste,
        "base_model": base_model,
        "best": best,
        "prior_alone": prior_only,
        "gap_scale": refit,
        "history": history,
        "steps": step,
        "seconds": time.perf_counter() - started,
        "training_users": len(trained_on),
        "other_users": len(others),
    }
    (folder / "training.json").write_text(json.dumps(metrics, indent=1))
    model.unload()
    return metrics


SCALE_GRID = torch.linspace(0.0, 3.0, 121)
FIT_LEAST = 100  # held-out reads a gap bucket needs for a scale of its own


def fit_gap_scale(
    tokens: SequenceTokens,
    prior: torch.nn.Module,
    digits: torch.Tensor,
    ratings: torch.Tensor,
    predictions: torch.Tensor,
    gaps: torch.Tensor,
    mse_weight: float,
) -> list[int]:
    """Refit ``tokens.scale`` on held-out reads (the LM's logits of "1".."5" with their
    ratings, collaborative predictions and gaps): per gap bucket, the scale on
    :data:`SCALE_GRID` of the lowest training loss (NLL plus ``mse_weight`` times the squared
    error of the expected rating). A bucket with fewer than :data:`FIT_LEAST` reads takes the
    scale of the nearest bucket below it that has them (above it when none below has); with
    no such bucket the learned scale stays (and a warning says so). Returns the reads per
    bucket."""
    buckets = gap_bucket(gaps)
    counts = [int((buckets == b).sum()) for b in range(GAP_BUCKETS)]
    values = torch.as_tensor(RATING_VALUES, dtype=torch.float32)
    fitted: dict[int, float] = {}
    with torch.no_grad():
        part = digits + tokens.offset  # the SLM's part at scale 1
        for b in range(GAP_BUCKETS):
            if counts[b] < FIT_LEAST:
                continue
            rows = buckets == b
            centre = predictions[rows].float()
            losses = []
            for scale in SCALE_GRID:
                logits = prior(scale * part[rows], centre, torch.zeros_like(centre))
                nll = torch.nn.functional.cross_entropy(logits, ratings[rows] - 1)
                expected = logits.softmax(-1) @ values
                losses.append(nll + mse_weight * ((expected - ratings[rows]) ** 2).mean())
            fitted[b] = float(SCALE_GRID[int(torch.stack(losses).argmin())])
        if not fitted:
            log.warning(
                "no gap bucket has %d validation reads (%s): the learned gap scale is kept",
                FIT_LEAST,
                counts,
            )
            return counts
        for b in range(GAP_BUCKETS):
            below = [f for f in fitted if f <= b]
            tokens.scale[b] = fitted[max(below)] if below else fitted[min(fitted)]
    return counts


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
    inputs = SequenceInputs.load(root, persona_taste).with_sequences(
        root, persona_taste, config.seed, config.other_users
    )
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
            adapter, inputs, users, base, tokenizer, config, staging, persona_taste, base_id
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
