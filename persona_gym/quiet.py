"""Third-party progress bars off inside library calls, unless asked for.

transformers draws a bar on stderr for every model it loads ("Loading weights", "Writing model
shards", and through plain tqdm "Converting and de-quantizing GGUF tensors"), and
huggingface_hub one per download: inside ``gym.make``
or any other library call those are noise the caller did not ask for. The library's own model
loading runs inside :func:`quiet_loading`::

    with quiet_loading():
        model = AutoModelForCausalLM.from_pretrained(path)

The bars come back after the block exactly as they were (a caller that turned them off keeps
them off). ``PERSONA_GYM_PROGRESS_BARS=1`` in the environment (or ``quiet_loading(show=True)``)
leaves them on. persona-gym's own progress (``train --progress``, ``evaluate-policy``'s lines)
is not affected.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

__all__ = ["PROGRESS_ENV", "quiet_loading"]

#: Set to 1 to keep the third-party progress bars of library calls.
PROGRESS_ENV = "PERSONA_GYM_PROGRESS_BARS"


def _asked_for_bars() -> bool:
    return os.environ.get(PROGRESS_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _gguf_utils() -> ModuleType | None:
    """transformers' GGUF loader, which draws its bar with plain tqdm (None where absent)."""
    try:
        return importlib.import_module("transformers.modeling_gguf_pytorch_utils")
    except ImportError:
        return None


@contextmanager
def quiet_loading(show: bool = False) -> Iterator[None]:
    """transformers' and huggingface_hub's progress bars off inside the block, restored after
    (``show`` or ``$PERSONA_GYM_PROGRESS_BARS=1``: left as they are)."""
    if show or _asked_for_bars():
        yield
        return
    from huggingface_hub import utils as hub_utils  # a dependency of transformers
    from transformers.utils import logging as hf_logging

    bars_were_on = hf_logging.is_progress_bar_enabled()
    hub_bars_were_on = not hub_utils.are_progress_bars_disabled()
    gguf = _gguf_utils()
    gguf_bar = getattr(gguf, "tqdm", None)
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    if gguf is not None and gguf_bar is not None:
        gguf.tqdm = functools.partial(gguf_bar, disable=True)  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if gguf is not None and gguf_bar is not None:
            gguf.tqdm = gguf_bar  # type: ignore[attr-defined]
        if bars_were_on:
            hf_logging.enable_progress_bar()
        if hub_bars_were_on:
            hub_utils.enable_progress_bars()
