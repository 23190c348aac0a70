"""Stage 3: fine-tune LoRA adapters that rate movies like the users of a persona.

``persona-gym train --artifacts DIR`` reads what ``distill`` and ``personas`` wrote into DIR and
trains, with RAFT (retrieved ``Ml`` memories in every training prompt, as at inference):

* ``persona``     one adapter per persona (θpersona), on its users' training interactions;
* ``single-max``  one adapter for all users, sub-sampled per user to the largest persona's size;
* ``single-min``  the same, to the smallest persona's size (the paper's θsingle max/min);
* ``user``        one adapter per user (optional; costly).

Objective: cross-entropy over the five rating tokens (the next-token distribution restricted to
"1".."5", which is exactly what the simulator samples from), plus ``mse_weight`` × the squared
error of the expected rating, which targets RMSE directly when the distribution is uncertain.

Speed on a CPU: LoRA sits on the top ``lora_layers`` decoder layers only. The frozen layers
below produce the same activations in every epoch and for every adapter, so they run ONCE
(cached in memory and on disk); each training step runs just the upper layers. A user's
profile prefix is shared by up to ``blocks_per_sequence`` of their examples in one packed
sequence (see ``persona_gym.simulator.engine``), so it is paid once per sequence, not per example.

Each adapter checkpoints every ``checkpoint_every`` steps; a killed run restarted with the same
command resumes from the checkpoints (and says so). Early stopping watches the RMSE on a
validation slice: the last ``val_per_user`` training interactions of each user (test data is
never read: it is not in the artifacts directory).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import resource
import shutil
import tempfile
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from persona_gym.artifacts import (
    library_versions,
    load_personas,
    load_tables,
    prepare_stage,
    tables_digest,
    write_manifest,
)
from persona_gym.assets import (
    DEFAULT_SLM,
    load_causal_lm,
    model_source,
    resolve_dtype,
    resolve_model,
)
from persona_gym.collaborative import CF_FILE, CollaborativeModel, load_collaborative
from persona_gym.io import atomic_write, atomic_write_json
from persona_gym.memory import logged_history, short_term_window
from persona_gym.retrieval import MemoryIndex
from persona_gym.simulator.adapters import save_item_tokens
from persona_gym.simulator.engine import ItemTokens, LayeredLM, pack
from persona_gym.simulator.prior import RatingPrior
from persona_gym.simulator.prompts import PromptBuilder, PromptConfig, RatingRequest

log = logging.getLogger(__name__)

VARIANTS = ("persona", "single-max", "single-min", "user")
RATINGS = torch.arange(1, 6, dtype=torch.float32)


@dataclass
class TrainConfig:
    """Adapter training settings (all recorded in the manifest).

    Attributes:
        variants: which adapter sets to train (see module docstring).
        base_model: base SLM (alias, local folder or hub id).
        rank, alpha, dropout: LoRA rank r, scaling alpha and dropout.
        target_modules: linear layers that get LoRA.
        lora_layers: LoRA on the top N decoder layers (0 = all layers; no lower-layer cache).
        learning_rate: AdamW learning rate (cosine decay to 10% after a 5% warm-up).
        epochs: passes over each adapter's training examples.
        batch_examples: examples per optimizer step.
        blocks_per_sequence: examples of one user packed behind one profile prefix.
        mse_weight: weight of the expected-rating squared error added to the cross-entropy.
        max_examples_per_user: train on each user's most recent N training interactions
            (before the validation slice); 0 = all.
        val_per_user: the last N training interactions of each user form the validation slice.
        eval_every: steps between validation passes (early stopping, best-state keeping).
        patience: validation passes without improvement before stopping.
        checkpoint_every: steps between checkpoints.
        seed: seeds data order, sub-sampling and LoRA initialisation.
        item_learning_rate: learning rate of the item projection (``prompt.item_tokens``); it
            starts from zero weights, so it gets a larger rate than the LoRA matrices.
        lower_dtype: dtype of the one-off pass through the frozen lower layers (``"auto"``:
            bfloat16 where the hardware has it, as the simulator runs there; see
            ``persona_gym.assets.resolve_dtype``). The trained upper layers stay float32.
    """

    variants: tuple[str, ...] = ("persona", "single-max", "single-min")
    base_model: str = DEFAULT_SLM
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )
    lora_layers: int = 4
    learning_rate: float = 5e-4
    epochs: int = 1
    batch_examples: int = 16
    blocks_per_sequence: int = 4
    mse_weight: float = 0.1
    max_examples_per_user: int = 20
    val_per_user: int = 2
    eval_every: int = 40
    patience: int = 3
    checkpoint_every: int = 25
    seed: int = 0
    prompt: PromptConfig = field(default_factory=PromptConfig)
    item_learning_rate: float = 5e-3
    lower_dtype: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.prompt, dict):
            self.prompt = PromptConfig(**self.prompt)
        self.variants = tuple(self.variants)
        self.target_modules = tuple(self.target_modules)
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"TrainConfig.variants: unknown {unknown}; choose from {VARIANTS}")
        for name in ("rank", "alpha", "epochs", "batch_examples", "blocks_per_sequence",
                     "eval_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"TrainConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """Hash of everything that changes an adapter (checkpoints from other configs are refused).

        ``variants`` is left out: which other adapters a run trains does not change this one.
        """
        values = {k: v for k, v in self.to_dict().items() if k != "variants"}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]

    def activations_digest(self) -> str:
        """Hash of what the cached frozen-layer activations depend on."""
        keys = ("base_model", "lora_layers", "max_examples_per_user", "val_per_user", "prompt",
                "lower_dtype")
        values = {k: v for k, v in self.to_dict().items() if k in keys}
        values["prompt"] = {k: v for k, v in values["prompt"].items() if k != "cf_items"}  # injected above
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Example:
    """One training/validation prompt with its label."""

    user_id: int
    request: RatingRequest
    rating: int
    validation: bool


def build_examples(
    profiles: dict[int, str],
    memories,
    index: MemoryIndex,
    config: TrainConfig,
    collaborative: CollaborativeModel | None = None,
) -> list[Example]:
    """RAFT examples from each user's time-ordered training interactions (Ml table).

    With collaborative cues in the prompt, ``collaborative`` gives them (out-of-fold for
    these logged interactions, see :mod:`persona_gym.collaborative`).
    """
    cued = config.prompt.cf_cue or config.prompt.surprise_cue
    if cued and collaborative is None:
        raise ValueError("the prompt has collaborative cues but no collaborative model was given")
    examples = []
    prompt = config.prompt
    for user_id in sorted(profiles):
        history = logged_history(memories, user_id)
        n_val = min(config.val_per_user, max(0, len(history) - 1))
        first_train = 0
        if config.max_examples_per_user:
            first_train = max(0, len(history) - n_val - config.max_examples_per_user)
        for position in range(first_train, len(history)):
            item = history[position]
            retrieved = index.top_k(user_id, item.item_index, prompt.n_memories)
            window = short_term_window(history, prompt.window_size, before=position)
            prediction, surprise = (collaborative.cues(user_id, item.item_index, window) if cued
                                    else (None, None))
            request = RatingRequest(
                user_id=user_id,
                profile=profiles[user_id],
                candidate=item.item_index,
                window=window,
                memories=tuple(m.text for m in retrieved),
                memory_items=tuple((m.item_index, m.rating) for m in retrieved),
                cf_prediction=prediction,
                surprise=surprise,
            )
            examples.append(Example(user_id, request, int(round(item.rating)),
                                    position >= len(history) - n_val))
    return examples


class LowerCache:
    """Frozen lower-layer activations: one prefix per user, one block per example."""

    def __init__(self, prefix_ids, prefix_hidden, block_ids, block_hidden):
        self.prefix_ids: dict[int, list[int]] = prefix_ids
        self.prefix_hidden: dict[int, torch.Tensor] = prefix_hidden
        self.block_ids: list[list[int]] = block_ids
        self.block_hidden: list[torch.Tensor] = block_hidden

    @classmethod
    @torch.inference_mode()
    def compute(cls, examples, builder, layered: LayeredLM, split_layer: int, pad_id: int,
                blocks_per_sequence: int, progress: bool) -> LowerCache:
        prefix_ids, prefix_hidden, block_ids = {}, {}, []
        block_hidden: list[torch.Tensor | None] = [None] * len(examples)
        by_user = defaultdict(list)
        for n, example in enumerate(examples):
            prefix, block = builder.segments(example.request)
            prefix_ids[example.user_id] = prefix
            block_ids.append(block)
            by_user[example.user_id].append(n)
        chunks = [(u, ns[i : i + blocks_per_sequence]) for u, ns in by_user.items()
                  for i in range(0, len(ns), blocks_per_sequence)]
        for start in tqdm(range(0, len(chunks), 4), desc="frozen layers", disable=not progress):
            part = chunks[start : start + 4]
            packed = pack([(prefix_ids[u], [block_ids[n] for n in ns]) for u, ns in part], pad_id,
                          layered.device)
            hidden = layered.run_layers(layered.embed_tokens(packed), packed, 0, split_layer).float().cpu()
            for row, (user, ns) in enumerate(part):
                p = len(prefix_ids[user])
                prefix_hidden.setdefault(user, hidden[row, :p].clone())
                offset = p
                for n in ns:
                    m = len(block_ids[n])
                    block_hidden[n] = hidden[row, offset : offset + m].clone()
                    offset += m
        return cls(prefix_ids, prefix_hidden, block_ids, block_hidden)

    def assemble(self, chunks: list[tuple[int, list[int]]], pad_id: int, device: torch.device):
        """Packed batch and its lower-layer hidden states for ``[(user, [example, ...]), ...]``,
        on ``device`` (the cache itself stays in CPU memory)."""
        packed = pack([(self.prefix_ids[u], [self.block_ids[n] for n in ns]) for u, ns in chunks], pad_id,
                      device)
        width = packed.input_ids.shape[1]
        dim = next(iter(self.prefix_hidden.values())).shape[-1]
        hidden = torch.zeros(len(chunks), width, dim, dtype=next(iter(self.prefix_hidden.values())).dtype)
        for row, (user, ns) in enumerate(chunks):
            parts = [self.prefix_hidden[user]] + [self.block_hidden[n] for n in ns]
            joined = torch.cat(parts)
            hidden[row, : len(joined)] = joined
        return packed, hidden.to(device)

    def placeholder_mean(self, indices: list[int]) -> torch.Tensor:
        """Mean frozen-layer state at the item tokens of examples ``indices``."""
        states = [self.block_hidden[n][torch.tensor(self.block_ids[n]) < 0] for n in indices]
        return torch.cat(states).float().mean(0)

    def state(self) -> dict:
        return {"prefix_ids": self.prefix_ids, "prefix_hidden": self.prefix_hidden,
                "block_ids": self.block_ids, "block_hidden": self.block_hidden}


def _frozen_pass(examples, builder, layered: LayeredLM, config: TrainConfig, split_layer: int,
                 pad_id: int, device: str, compile: bool, progress: bool) -> LowerCache:
    """The frozen lower layers' activations of every example, in ``config.lower_dtype`` (a
    second, low-precision copy of the base model when that is not float32)."""
    dtype = resolve_dtype(config.lower_dtype, device)
    lower = layered
    if dtype != "float32":
        model, _ = load_causal_lm(config.base_model, device=device, dtype=dtype)
        lower = LayeredLM(model, builder.rating_token_ids, compile=compile,
                          placeholder_id=builder.item_placeholder_id)
    log.info("frozen layers 0..%d in %s for %d examples", split_layer - 1, dtype, len(examples))
    return LowerCache.compute(examples, builder, lower, split_layer, pad_id, config.blocks_per_sequence,
                              progress)


def _chunks(indices: list[int], examples: list[Example], size: int, rng: np.random.Generator):
    """Shuffle examples within users, cut into same-user chunks of ``size``, shuffle the chunks."""
    by_user = defaultdict(list)
    for n in indices:
        by_user[examples[n].user_id].append(n)
    chunks = []
    for user in sorted(by_user):
        ns = list(rng.permutation(by_user[user]))
        chunks.extend((user, [int(n) for n in ns[i : i + size]]) for i in range(0, len(ns), size))
    order = rng.permutation(len(chunks))
    return [chunks[i] for i in order]


def _batches(chunks, batch_examples: int):
    """Group chunks into optimizer steps of about ``batch_examples`` examples."""
    batch, count = [], 0
    for chunk in chunks:
        batch.append(chunk)
        count += len(chunk[1])
        if count >= batch_examples:
            yield batch
            batch, count = [], 0
    if batch:
        yield batch


def adapter_datasets(examples: list[Example], user_persona: dict[int, int], config: TrainConfig,
                     ) -> dict[str, tuple[list[int], list[int]]]:
    """``{adapter name: (train example indices, validation example indices)}`` per variant."""
    train_by_user, val_by_user = defaultdict(list), defaultdict(list)
    for n, example in enumerate(examples):
        (val_by_user if example.validation else train_by_user)[example.user_id].append(n)
    personas = sorted(set(user_persona.values()))
    sets: dict[str, tuple[list[int], list[int]]] = {}
    persona_sizes = {}
    for p in personas:
        users = [u for u in sorted(train_by_user) if user_persona.get(u) == p]
        train = [n for u in users for n in train_by_user[u]]
        val = [n for u in users for n in val_by_user[u]]
        persona_sizes[p] = len(train)
        if "persona" in config.variants:
            sets[f"persona-{p}"] = (train, val)
    all_val = [n for u in sorted(val_by_user) for n in val_by_user[u]]
    total = sum(len(v) for v in train_by_user.values())
    # θsingle: every user sub-sampled in proportion to their data, to a persona's size
    for variant, size in (("single-max", max(persona_sizes.values(), default=0)),
                          ("single-min", min(persona_sizes.values(), default=0))):
        if variant not in config.variants:
            continue
        rng = np.random.default_rng([config.seed, zlib.crc32(variant.encode())])
        users = sorted(train_by_user)
        quotas = np.array([size * len(train_by_user[u]) / total for u in users]) if total else np.zeros(0)
        keep = np.floor(quotas).astype(int)
        # largest remainders get the leftover examples, so the total matches `size` exactly
        for i in np.argsort(-(quotas - keep), kind="stable")[: size - keep.sum()]:
            keep[i] += 1
        train = []
        for user, n_keep in zip(users, keep, strict=True):
            chosen = rng.choice(train_by_user[user], size=int(n_keep), replace=False)
            train.extend(int(n) for n in sorted(chosen))
        sets[variant] = (train, all_val)
    if "user" in config.variants:
        for user in sorted(train_by_user):
            sets[f"user-{user}"] = (train_by_user[user], val_by_user[user])
    return sets


def _loss(logits: torch.Tensor, labels: torch.Tensor, mse_weight: float) -> torch.Tensor:
    ce = torch.nn.functional.cross_entropy(logits, labels - 1)
    expected = logits.softmax(-1) @ RATINGS.to(logits.device)
    return ce + mse_weight * ((expected - labels.float()) ** 2).mean()


def _rating_logits(layered: LayeredLM, packed, hidden, split_layer: int, prior: RatingPrior | None,
                   examples: list[Example], batch) -> torch.Tensor:
    """The adapter's rating logits of a batch, with its collaborative prior when it has one."""
    logits = layered.forward(packed, start=split_layer, hidden=hidden)
    if prior is None:
        return logits
    predictions = torch.tensor([examples[n].request.cf_prediction for _, ns in batch for n in ns])
    return prior(logits, predictions)


@torch.no_grad()
def _evaluate(model, layered, cache, examples, indices, split_layer, pad_id, size,
              prior: RatingPrior | None = None) -> dict:
    """Validation RMSE/MAE/NLL of the active adapter on ``indices``."""
    if not indices:
        return {"rmse": float("nan"), "mae": float("nan"), "nll": float("nan"), "n": 0}
    model.eval()
    chunks = _chunks(indices, examples, size, np.random.default_rng(0))
    errors, nll = [], []
    for batch in _batches(chunks, 64):
        packed, hidden = cache.assemble(batch, pad_id, layered.device)
        logits = _rating_logits(layered, packed, hidden, split_layer, prior, examples, batch)
        labels = torch.tensor([examples[n].rating for _, ns in batch for n in ns], device=layered.device)
        probs = logits.softmax(-1)
        errors.append(probs @ RATINGS.to(probs.device) - labels.float())
        nll.append(-probs[torch.arange(len(labels), device=probs.device), labels - 1].log())
    err, nll_t = torch.cat(errors), torch.cat(nll)
    model.train()
    return {"rmse": float(err.pow(2).mean().sqrt()), "mae": float(err.abs().mean()),
            "nll": float(nll_t.mean()), "n": len(err)}


def _clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _lora_state(model, name: str) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return _clone(get_peft_model_state_dict(model, adapter_name=name))


def train_adapter(
    name: str,
    base: torch.nn.Module,
    layered: LayeredLM,
    cache: LowerCache,
    examples: list[Example],
    train_idx: list[int],
    val_idx: list[int],
    config: TrainConfig,
    split_layer: int,
    pad_id: int,
    out_dir: Path,
    progress: bool,
    items: ItemTokens | None = None,
    prior: RatingPrior | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Train one adapter (resuming from its checkpoint), save it; return the base model and metrics.

    ``items``: the adapter's item projection, trained with it (``prompt.item_tokens``); its bias
    starts at the mean frozen-layer state of the placeholder, so training starts from the model
    that sees the placeholder. ``prior``: its collaborative prior (``prompt.cf_prior``), also
    trained with it. Both learn at ``item_learning_rate``.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    n_layers = layered.n_layers
    lora_config = LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
        target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM",
        layers_to_transform=list(range(split_layer, n_layers)) if config.lora_layers else None,
    )
    seed = config.seed * 1_000_003 + zlib.crc32(name.encode())
    torch.manual_seed(seed)
    model = get_peft_model(base, lora_config, adapter_name=name)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": config.learning_rate}]
    if items is not None:
        with torch.no_grad():
            items.proj.bias.copy_(cache.placeholder_mean(train_idx))
    extras = {key: module for key, module in (("items", items), ("prior", prior)) if module is not None}
    for module in extras.values():
        groups.append({"params": list(module.parameters()), "lr": config.item_learning_rate})
        params = params + list(module.parameters())
    layered.items = items
    optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train_idx) / config.batch_examples)
    total_steps = max(1, steps_per_epoch * config.epochs)
    warmup = max(1, total_steps // 20)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress_ = (step - warmup) / max(1, total_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    ckpt_path = out_dir / "checkpoints" / f"{name}.pt"
    state = {"step": 0, "best": None, "best_val": float("inf"), "bad_evals": 0, "history": [],
             "tokens": 0, "seconds": 0.0}
    if ckpt_path.exists():
        saved = torch.load(ckpt_path, weights_only=False)
        if saved.get("config") == config.digest():
            set_peft_model_state_dict(model, saved["lora"], adapter_name=name)
            for key, module in extras.items():
                module.load_state_dict(saved["extras"][key])
            optimizer.load_state_dict(saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
            torch.set_rng_state(saved["torch_rng"])
            state = saved["state"]
            log.info("adapter %s: resumed from %s at step %d", name, ckpt_path, state["step"])
        else:
            log.warning("adapter %s: ignoring checkpoint %s made with another config", name, ckpt_path)

    def checkpoint() -> None:
        payload = {"config": config.digest(), "lora": _lora_state(model, name),
                   "extras": {key: _clone(m.state_dict()) for key, m in extras.items()},
                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "torch_rng": torch.get_rng_state(), "state": state}
        atomic_write(ckpt_path, lambda tmp: torch.save(payload, tmp))

    model.train()
    step, stopped = 0, False
    bar = tqdm(total=total_steps, desc=f"train {name}", disable=not progress, initial=state["step"])
    for epoch in range(config.epochs):
        rng = np.random.default_rng([config.seed, zlib.crc32(name.encode()), epoch])
        for batch in _batches(_chunks(train_idx, examples, config.blocks_per_sequence, rng),
                              config.batch_examples):
            if step < state["step"]:  # already done before the resume
                step += 1
                continue
            started = time.perf_counter()
            packed, hidden = cache.assemble(batch, pad_id, layered.device)
            labels = torch.tensor([examples[n].rating for _, ns in batch for n in ns], device=layered.device)
            logits = _rating_logits(layered, packed, hidden, split_layer, prior, examples, batch)
            loss = _loss(logits, labels, config.mse_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            state["step"] = step
            state["tokens"] += packed.n_tokens
            state["seconds"] += time.perf_counter() - started
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", best_rmse=f"{state['best_val']:.3f}")
            if step % config.eval_every == 0 or step == total_steps:
                metrics = _evaluate(model, layered, cache, examples, val_idx, split_layer,
                                    pad_id, config.blocks_per_sequence, prior)
                state["history"].append({"step": step, "loss": loss.item(), **metrics})
                if metrics["rmse"] < state["best_val"] - 1e-4 or state["best"] is None:
                    state["best_val"], state["bad_evals"] = metrics["rmse"], 0
                    state["best"] = _lora_state(model, name)
                    state["best_extras"] = {key: _clone(m.state_dict()) for key, m in extras.items()}
                else:
                    state["bad_evals"] += 1
                if state["bad_evals"] >= config.patience:
                    log.info("adapter %s: early stop at step %d (val RMSE %.4f)", name, step,
                             state["best_val"])
                    stopped = True
            if step % config.checkpoint_every == 0 or stopped:
                checkpoint()
            if stopped:
                break
        if stopped:
            break
    bar.close()
    if state["best"] is not None:
        set_peft_model_state_dict(model, state["best"], adapter_name=name)
        for key, module in extras.items():
            module.load_state_dict(state["best_extras"][key])
    _save_adapter(model, name, out_dir / "adapters" / name, items, prior)
    layered.items = None
    checkpoint()
    metrics = {
        "train_examples": len(train_idx), "val_examples": len(val_idx), "steps": state["step"],
        "best_val_rmse": state["best_val"], "history": state["history"],
        "train_tokens": state["tokens"], "train_seconds": round(state["seconds"], 1),
        "train_tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9), 1),
        "early_stopped": stopped,
    }
    return model.unload(), metrics


def _strip_machine_path(config_file: Path) -> None:
    """peft records the base model's local folder; keep only its name (the manifest records
    the model and its file hash), so adapters carry no path of the machine that trained them."""
    config = json.loads(config_file.read_text())
    base = config.get("base_model_name_or_path")
    if base and Path(base).is_absolute():
        config["base_model_name_or_path"] = Path(base).name
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_adapter(model, name: str, folder: Path, items: ItemTokens | None = None,
                  prior: RatingPrior | None = None) -> None:
    """``save_pretrained`` one adapter (with its item projection and prior) into ``folder``
    atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}-"))
    try:
        model.save_pretrained(tmp, selected_adapters=[name])
        written = tmp / name if (tmp / name).is_dir() else tmp
        _strip_machine_path(written / "adapter_config.json")
        if items is not None:
            save_item_tokens(items, written)
        if prior is not None:
            prior.save(written)
        if folder.exists():
            shutil.rmtree(folder)
        written.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _trained_with(root: Path, config: TrainConfig) -> bool:
    """Whether ``root``'s manifest records adapters of ``config`` (the same digest: other
    variants may be added to them)."""
    try:
        recorded = json.loads((root / "manifest.json").read_text())["training"]
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{k: v for k, v in recorded.items() if k in names}).digest() == config.digest()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def train(artifacts: str | Path, config: TrainConfig, device: str = "cpu", progress: bool = True,
          compile: bool = False, force: bool = False) -> dict:
    """Train every adapter of ``config.variants`` into ``artifacts``; write the manifest.

    ``compile`` runs the decoder layers through ``torch.compile`` (faster on CPU after ~1 min).
    A directory with adapters of another config is refused unless ``force``, which deletes them
    (and the manifest, checkpoints and evaluation) first; the same config resumes or adds variants.
    """
    root = Path(artifacts)
    prepare_stage(root, "train", force=force, same_run=_trained_with(root, config))
    started = time.perf_counter()
    catalog, profiles, memories, item_embeddings = load_tables(root)
    collaborative = None
    if config.prompt.uses_collaborative:
        collaborative = load_collaborative(root / CF_FILE)
        if config.prompt.cf_items:
            item_embeddings = np.c_[item_embeddings, collaborative.item_features()]
    user_persona = load_personas(root)
    index = MemoryIndex(memories, load_tables(root)[3])
    torch.manual_seed(config.seed)
    model_path = resolve_model(config.base_model)
    base, tokenizer = load_causal_lm(config.base_model, device=device)
    for p in base.parameters():
        p.requires_grad_(False)
    builder = PromptBuilder(tokenizer, catalog, config.prompt)
    layered = LayeredLM(base, builder.rating_token_ids, compile=compile,
                        placeholder_id=builder.item_placeholder_id)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    split_layer = layered.n_layers - config.lora_layers if config.lora_layers else 0
    if not 0 <= split_layer < layered.n_layers:
        raise ValueError(f"lora_layers={config.lora_layers} but the model has {layered.n_layers} layers")

    examples = build_examples(profiles, memories, index, config, collaborative)
    sets = adapter_datasets(examples, user_persona, config)
    log.info("%d examples (%d validation), adapters: %s", len(examples),
             sum(e.validation for e in examples), ", ".join(f"{k}={len(v[0])}" for k, v in sets.items()))

    cache_key = hashlib.sha256((config.activations_digest() + str(model_source(model_path)["sha256"] or model_path)
                                + str(len(examples))).encode()).hexdigest()[:16]
    cache_path = root / "cache" / f"lower-{cache_key}.pt"
    lower_started = time.perf_counter()
    if cache_path.exists():
        cache = LowerCache(**torch.load(cache_path, weights_only=False))
        log.info("reusing frozen-layer activations from %s", cache_path)
    else:
        cache = _frozen_pass(examples, builder, layered, config, split_layer, pad_id, device,
                             compile, progress)
        atomic_write(cache_path, lambda tmp: torch.save(cache.state(), tmp))
    lower_seconds = time.perf_counter() - lower_started

    metrics: dict[str, dict] = {}
    metrics_path = root / "checkpoints" / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text()).get(config.digest(), {})
    for name, (train_idx, val_idx) in sets.items():
        if name in metrics and (root / "adapters" / name / "adapter_config.json").exists():
            log.info("adapter %s: already trained, skipping", name)
            continue
        items = None
        if config.prompt.item_tokens:
            items = ItemTokens(item_embeddings, base.config.hidden_size, split_layer).to(device)
        prior = RatingPrior().to(device) if config.prompt.cf_prior else None
        base, metrics[name] = train_adapter(name, base, layered, cache, examples, train_idx, val_idx,
                                            config, split_layer, pad_id, root, progress, items, prior)
        atomic_write_json(metrics_path, {config.digest(): metrics})

    split_info = json.loads((root / "split.json").read_text()) if (root / "split.json").exists() else {}
    personas: dict[str, list[int]] = defaultdict(list)
    for user, p in sorted(user_persona.items()):
        personas[str(p)].append(user)
    summary = {
        "wall_seconds": round(time.perf_counter() - started, 1),
        "frozen_layer_seconds": round(lower_seconds, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "examples": len(examples),
    }
    manifest = {
        "base_model": model_source(model_path),
        "dataset": split_info.get("dataset", split_info.get("params", {}).get("dataset", "unknown")),
        "protocol": split_info,
        "tables_sha256": tables_digest(root),
        "seeds": {"training": config.seed},
        "personas": dict(personas),
        "adapters": {name: f"adapters/{name}" for name in metrics},
        "prompt": dataclasses.asdict(config.prompt),
        "training": {**config.to_dict(), "split_layer": split_layer},
        "metrics": {"adapters": metrics, "run": summary},
    }
    manifest = write_manifest(root, manifest)
    log.info("trained %d adapters in %.0f s; manifest at %s", len(metrics), summary["wall_seconds"],
             root / "manifest.json")
    return manifest


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    defaults = TrainConfig()
    parser = subparsers.add_parser(
        "train", help="fine-tune persona LoRA adapters (stage 3)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--artifacts", required=True, type=Path,
                        help="directory written by `persona-gym distill` and `persona-gym personas`")
    parser.add_argument("--variants", nargs="+", default=list(defaults.variants), choices=VARIANTS)
    parser.add_argument("--base-model", default=defaults.base_model)
    parser.add_argument("--rank", type=int, default=defaults.rank)
    parser.add_argument("--alpha", type=int, default=defaults.alpha)
    parser.add_argument("--dropout", type=float, default=defaults.dropout)
    parser.add_argument("--target-modules", nargs="+", default=list(defaults.target_modules))
    parser.add_argument("--lora-layers", type=int, default=defaults.lora_layers,
                        help="LoRA on the top N layers (0 = all)")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate)
    parser.add_argument("--epochs", type=int, default=defaults.epochs)
    parser.add_argument("--batch-examples", type=int, default=defaults.batch_examples)
    parser.add_argument("--blocks-per-sequence", type=int, default=defaults.blocks_per_sequence,
                        help="examples of one user packed behind one profile prefix")
    parser.add_argument("--max-examples-per-user", type=int, default=defaults.max_examples_per_user)
    parser.add_argument("--mse-weight", type=float, default=defaults.mse_weight)
    parser.add_argument("--window", type=int, default=defaults.prompt.window_size,
                        help="short-term window size k (0 = none)")
    parser.add_argument("--memories", type=int, default=defaults.prompt.n_memories,
                        help="retrieved Ml memories per prompt (0 = none)")
    parser.add_argument("--no-profile", action="store_true", help="leave Ms out of the prompt")
    parser.add_argument("--max-tokens", type=int, default=defaults.prompt.max_tokens)
    parser.add_argument("--item-tokens", action="store_true",
                        help="compact prompts: each movie is one soft token projected from its "
                             "embedding, trained with each adapter (~3x fewer tokens per rating)")
    parser.add_argument("--cf-cue", action="store_true",
                        help="show the collaborative model's prediction next to the answer")
    parser.add_argument("--surprise-cue", action="store_true",
                        help="show how the window's ratings deviated from the collaborative predictions")
    parser.add_argument("--cf-prior", action="store_true",
                        help="add a learned Gaussian prior around the collaborative prediction to the "
                             "rating logits (needs --cf-cue)")
    parser.add_argument("--cf-items", action="store_true",
                        help="item tokens carry collaborative factors (needs --item-tokens)")
    parser.add_argument("--val-per-user", type=int, default=defaults.val_per_user,
                        help="the last N training interactions of each user form the validation slice")
    parser.add_argument("--item-learning-rate", type=float, default=defaults.item_learning_rate)
    parser.add_argument("--lower-dtype", default=defaults.lower_dtype, choices=["auto", "float32", "bfloat16"],
                        help="dtype of the one-off frozen-layer pass (auto: bfloat16 where the hardware has it)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--force", action="store_true",
                        help="replace adapters trained with another config (and their evaluation)")
    parser.add_argument("--no-compile", action="store_true",
                        help="run eagerly instead of through torch.compile (slower, no warm-up)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    prompt = PromptConfig(window_size=args.window, n_memories=args.memories,
                          use_profile=not args.no_profile, max_tokens=args.max_tokens,
                          item_tokens=args.item_tokens, cf_cue=args.cf_cue,
                          surprise_cue=args.surprise_cue, cf_items=args.cf_items,
                          cf_prior=args.cf_prior)
    config = TrainConfig(
        variants=tuple(args.variants), base_model=args.base_model, rank=args.rank, alpha=args.alpha,
        dropout=args.dropout, target_modules=tuple(args.target_modules), lora_layers=args.lora_layers,
        learning_rate=args.learning_rate, epochs=args.epochs, batch_examples=args.batch_examples,
        max_examples_per_user=args.max_examples_per_user, mse_weight=args.mse_weight,
        seed=args.seed, prompt=prompt, item_learning_rate=args.item_learning_rate,
        val_per_user=args.val_per_user, lower_dtype=args.lower_dtype,
        blocks_per_sequence=args.blocks_per_sequence,
    )
    manifest = train(args.artifacts, config, device=args.device, progress=not args.no_progress,
                     compile=not args.no_compile, force=args.force)
    for name, m in manifest["metrics"]["adapters"].items():
        print(f"{name:>14}: {m['train_examples']:5d} examples, {m['steps']:4d} steps, "
              f"val RMSE {m['best_val_rmse']:.4f}, {m['train_tokens_per_s']:.0f} tokens/s")
    print(json.dumps(manifest["metrics"]["run"]))
    print(json.dumps(library_versions()))
    return 0
