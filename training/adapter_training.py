"""Training one adapter: the loss, the validation pass, the loop with checkpoints, early stopping
and best-state keeping, and saving the adapter (LoRA weights, item projection, prior)."""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, NotRequired, TypedDict

import numpy as np
import torch
from tqdm import tqdm

from persona_gym.io import atomic_write
from persona_gym.ratings import RATING_VALUES
from persona_gym.simulator.adapters import quiet_peft, save_item_tokens
from persona_gym.simulator.engine import ItemTokens, LayeredLM
from persona_gym.simulator.rating_prior import RatingPrior
from training.examples import Example, LowerCache

if TYPE_CHECKING:
    from training.train import TrainConfig

log = logging.getLogger(__name__)
RATINGS = torch.as_tensor(RATING_VALUES, dtype=torch.float32)


def _chunks(indices: list[int], examples: list[Example], size: int, rng: np.random.Generator):
    """Shuffle examples within users, cut into same-user chunks of ``size``, shuffle the chunks."""
    by_user: defaultdict[int, list[int]] = defaultdict(list)
    for n in indices:
        by_user[examples[n].user_id].append(n)
    chunks: list[tuple[int, list[int]]] = []
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


class _TrainState(TypedDict):
    """The training loop's progress, saved in (and resumed from) the checkpoint."""

    step: int
    best: dict[str, torch.Tensor] | None
    best_val: float
    bad_evals: int
    history: list[dict[str, Any]]
    tokens: int
    seconds: float
    best_extras: NotRequired[dict[str, dict[str, torch.Tensor]]]


def _loss(logits: torch.Tensor, labels: torch.Tensor, mse_weight: float) -> torch.Tensor:
    ce = torch.nn.functional.cross_entropy(logits, labels - 1)
    expected = logits.softmax(-1) @ RATINGS.to(logits.device)
    return ce + mse_weight * ((expected - labels.float()) ** 2).mean()


def _rating_logits(
    layered: LayeredLM,
    packed,
    hidden,
    split_layer: int,
    prior: RatingPrior | None,
    examples: list[Example],
    batch,
) -> torch.Tensor:
    """The adapter's rating logits of a batch, with its collaborative prior when it has one."""
    logits = layered.forward(packed, start=split_layer, hidden=hidden)
    if prior is None:
        return logits
    requests = [examples[n].request for _, ns in batch for n in ns]
    return prior(
        logits,
        torch.tensor([r.cf_prediction for r in requests]),
        torch.tensor([r.surprise or 0.0 for r in requests]),
    )


@torch.no_grad()
def _evaluate(
    model,
    layered,
    cache,
    examples,
    indices,
    split_layer,
    pad_id,
    size,
    prior: RatingPrior | None = None,
) -> dict:
    """Validation RMSE/MAE/NLL of the active adapter on ``indices``."""
    if not indices:
        return {"rmse": float("nan"), "mae": float("nan"), "nll": float("nan"), "n": 0}
    model.eval()
    chunks = _chunks(indices, examples, size, np.random.default_rng(0))
    errors, nll = [], []
    for batch in _batches(chunks, 64):
        packed, hidden = cache.assemble(batch, pad_id, layered.device)
        logits = _rating_logits(layered, packed, hidden, split_layer, prior, examples, batch)
        labels = torch.tensor(
            [examples[n].rating for _, ns in batch for n in ns], device=layered.device
        )
        probs = logits.softmax(-1)
        errors.append(probs @ RATINGS.to(probs.device) - labels.float())
        nll.append(-probs[torch.arange(len(labels), device=probs.device), labels - 1].log())
    err, nll_t = torch.cat(errors), torch.cat(nll)
    model.train()
    return {
        "rmse": float(err.pow(2).mean().sqrt()),
        "mae": float(err.abs().mean()),
        "nll": float(nll_t.mean()),
        "n": len(err),
    }


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
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        layers_to_transform=list(range(split_layer, n_layers)) if config.lora_layers else None,
    )
    seed = config.seed * 1_000_003 + zlib.crc32(name.encode())
    torch.manual_seed(seed)
    with quiet_peft():
        model = get_peft_model(base, lora_config, adapter_name=name)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": params, "lr": config.learning_rate}]
    if items is not None:
        with torch.no_grad():
            items.proj.bias.copy_(cache.placeholder_mean(train_idx))
    extras = {
        key: module for key, module in (("items", items), ("prior", prior)) if module is not None
    }
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
    state: _TrainState = {
        "step": 0,
        "best": None,
        "best_val": float("inf"),
        "bad_evals": 0,
        "history": [],
        "tokens": 0,
        "seconds": 0.0,
    }
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
            log.warning(
                "adapter %s: ignoring checkpoint %s made with another config", name, ckpt_path
            )

    def checkpoint() -> None:
        payload = {
            "config": config.digest(),
            "lora": _lora_state(model, name),
            "extras": {key: _clone(m.state_dict()) for key, m in extras.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "state": state,
        }
        atomic_write(ckpt_path, lambda tmp: torch.save(payload, tmp))

    model.train()
    step, stopped = 0, False
    bar = tqdm(total=total_steps, desc=f"train {name}", disable=not progress, initial=state["step"])
    for epoch in range(config.epochs):
        rng = np.random.default_rng([config.seed, zlib.crc32(name.encode()), epoch])
        for batch in _batches(
            _chunks(train_idx, examples, config.blocks_per_sequence, rng), config.batch_examples
        ):
            if step < state["step"]:  # already done before the resume
                step += 1
                continue
            started = time.perf_counter()
            packed, hidden = cache.assemble(batch, pad_id, layered.device)
            labels = torch.tensor(
                [examples[n].rating for _, ns in batch for n in ns], device=layered.device
            )
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
                metrics = _evaluate(
                    model,
                    layered,
                    cache,
                    examples,
                    val_idx,
                    split_layer,
                    pad_id,
                    config.blocks_per_sequence,
                    prior,
                )
                state["history"].append({"step": step, "loss": loss.item(), **metrics})
                if metrics["rmse"] < state["best_val"] - 1e-4 or state["best"] is None:
                    state["best_val"], state["bad_evals"] = metrics["rmse"], 0
                    state["best"] = _lora_state(model, name)
                    state["best_extras"] = {
                        key: _clone(m.state_dict()) for key, m in extras.items()
                    }
                else:
                    state["bad_evals"] += 1
                if state["bad_evals"] >= config.patience:
                    log.info(
                        "adapter %s: early stop at step %d (val RMSE %.4f)",
                        name,
                        step,
                        state["best_val"],
                    )
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
        "train_examples": len(train_idx),
        "val_examples": len(val_idx),
        "steps": state["step"],
        "best_val_rmse": state["best_val"],
        "history": state["history"],
        "train_tokens": state["tokens"],
        "train_seconds": round(state["seconds"], 1),
        "train_tokens_per_s": round(state["tokens"] / max(state["seconds"], 1e-9), 1),
        "early_stopped": stopped,
    }
    return model.unload(), metrics


def strip_machine_path(config_file: Path) -> None:
    """peft records the base model's local folder; keep only its name (the manifest records
    the model and its file hash), so adapters carry no path of the machine that trained them."""
    config = json.loads(config_file.read_text())
    base = config.get("base_model_name_or_path")
    if base and Path(base).is_absolute():
        config["base_model_name_or_path"] = Path(base).name
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_adapter(
    model,
    name: str,
    folder: Path,
    items: ItemTokens | None = None,
    prior: RatingPrior | None = None,
) -> None:
    """``save_pretrained`` one adapter (with its item projection and prior) into ``folder``
    atomically."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}-"))
    try:
        model.save_pretrained(tmp, selected_adapters=[name])
        written = tmp / name if (tmp / name).is_dir() else tmp
        strip_machine_path(written / "adapter_config.json")
        if items is not None:
            save_item_tokens(items, written)
        if prior is not None:
            prior.save(written)
        if folder.exists():
            shutil.rmtree(folder)
        written.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
