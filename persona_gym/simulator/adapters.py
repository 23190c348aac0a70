"""The on-disk side of adapters: peft LoRA folders attached to a model, and item projections.

A trained adapter is a peft ``save_pretrained`` folder (``adapter_config.json``,
``adapter_model.safetensors``); with item-token prompts it also holds the adapter's item
projection (:data:`ITEM_TOKENS_FILE`). Names follow :mod:`persona_gym.simulator.adapter_names`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from persona_gym.simulator.adapter_names import BASE
from persona_gym.simulator.engine import ItemTokens

__all__ = ["ITEM_TOKENS_FILE", "attach_adapters", "load_item_tokens", "save_item_tokens"]

ITEM_TOKENS_FILE = "item_tokens.pt"  # an adapter's item projection (item_tokens prompts)


def save_item_tokens(items: ItemTokens, folder: str | Path) -> None:
    """Write an adapter's item projection next to its LoRA weights."""
    state = {
        "layer": items.layer,
        "weight": items.proj.weight.detach().cpu().clone(),
        "bias": items.proj.bias.detach().cpu().clone(),
    }
    torch.save(state, Path(folder) / ITEM_TOKENS_FILE)


def load_item_tokens(
    adapters: Mapping[str, str | Path], embeddings: np.ndarray, device: torch.device | str = "cpu"
) -> dict[str, ItemTokens]:
    """Each ``{name: folder}`` adapter's :class:`ItemTokens` over the artifacts' item embeddings,
    on ``device``."""
    out = {}
    for name, folder in adapters.items():
        path = Path(folder) / ITEM_TOKENS_FILE
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: adapter {name!r} was trained without "
                "item tokens; retrain with `persona-gym train` (the shipped recipe has them)"
            )
        state = torch.load(path, weights_only=True)
        if state["weight"].shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"{path}: projects {state['weight'].shape[1]}-d item embeddings but the "
                f"artifacts' are {embeddings.shape[1]}-d"
            )
        items = ItemTokens(embeddings, state["weight"].shape[0], state["layer"])
        items.proj.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
        out[name] = items.to(device).eval()
    return out


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence the FutureWarning transformers raises each time peft wraps a model (peft reads
    the deprecated ``is_gradient_checkpointing``): nothing for our users to change."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        yield


def attach_adapters(model: torch.nn.Module, adapters: Mapping[str, str | Path]) -> torch.nn.Module:
    """Wrap ``model`` in a ``PeftModel`` holding each ``{name: folder}`` adapter (eval mode)."""
    if not adapters:
        return model
    from peft import PeftModel

    peft_model = None
    for name, folder in adapters.items():
        if name == BASE:
            raise ValueError(f"'{BASE}' is reserved for the model without adapter; rename it")
        folder = Path(folder)
        if not (folder / "adapter_config.json").exists():
            raise FileNotFoundError(
                f"adapter {name!r}: {folder} has no adapter_config.json; train it with "
                "`persona-gym train` or point the manifest at the right folder"
            )
        if peft_model is None:
            with quiet_peft():
                peft_model = PeftModel.from_pretrained(model, folder, adapter_name=name)
        else:
            peft_model.load_adapter(folder, adapter_name=name)
    assert peft_model is not None  # adapters is not empty
    return peft_model.eval()
