"""Stage 1: distil each user's training history into text memories (paper §3.2).

What distillation produces and the deterministic :class:`~persona_gym.distill.DataDistiller`
(the offline default) live in :mod:`persona_gym.distill`, which the runtime needs to rebuild a
shipped simulator's tables. Here:

* :class:`LLMDistiller`, the paper's hierarchical self-reflection with a chat backend
  (:mod:`training.chat`): chronological batches of at most 10 interactions; after each batch the
  model writes a reason per interaction and an updated profile. Per-user results are cached on
  disk under a content hash, so a killed run resumes where it stopped.

``persona-gym distill`` writes the artifacts directory (see :func:`write_artifacts`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from persona_gym.catalog import ItemCatalog
from persona_gym.distill import (
    DataDistiller,
    DataDistillerConfig,
    UserMemories,
    compute_traits,
    memories_frame,
    memory_text,
    profile_text,
    select_users,
    training_rows,
    write_artifacts,
)
from persona_gym.io import atomic_write_json

log = logging.getLogger(__name__)

__all__ = [
    "LLMDistiller",
    "LLMDistillerConfig",
    "add_parser",
    "batch_prompt",
    "parse_reply",
    "run_distill",
    "token_lengths",
]

PROMPT_VERSION = "v1"


# --------------------------------------------------------------------------------------------
# LLM distiller (hierarchical self-reflection)
# --------------------------------------------------------------------------------------------

_SYSTEM = (
    "You study one person's movie ratings and explain them in the first person, as that "
    "person. Be brief and concrete."
)
# Generated text is refused (the data distiller's text is used instead) when it carries chat
# markup or special tokens, or addresses the rating model instead of describing a taste.
_MARKUP = re.compile(
    r"<\|[^<>|]{0,40}\|>|</?s>|\[/?INST\]|<</?SYS>>|<\|?(?:im_start|im_end|endoftext)"
    r"|^\s*(?:system|assistant|user)\s*:",
    re.IGNORECASE | re.MULTILINE,
)
_INJECTION = re.compile(
    r"\b(?:ignore|disregard|forget|override)\b.{0,40}\b(?:instructions?|prompts?|rules|above|previous)\b"
    r"|\b(?:new|updated|real) instructions?\b|\bsystem prompt\b|\byou are now\b|\bas an ai\b"
    r"|\b(?:always|only)\s+(?:answer|rate|reply|respond|say|output)\b"
    r"|\b(?:answer|reply|respond|output)\s+(?:with\s+)?(?:only\s+)?(?:a\s+|the\s+)?[1-5]\b",
    re.IGNORECASE | re.DOTALL,
)
_LINE = re.compile(r"^\s*(?:\**)?(\d{1,2})\s*[.):\-]\s*(.+?)\s*$", re.MULTILINE)
_PROFILE = re.compile(r"PROFILE\s*:\s*(.+)", re.IGNORECASE | re.DOTALL)


_MAX_REASON_CHARS = 1000  # a generated reason or profile beyond this is cut (then to words)
_MAX_PROFILE_CHARS = 2000


@dataclass(frozen=True)
class LLMDistillerConfig:
    """Settings of the LLM distiller."""

    batch_size: int = 10  # interactions per reflection step (the paper: at most 10)
    max_profile_words: int = 90  # Ms is cut to this many words
    max_reason_words: int = 30  # each Ml reason is cut to this many words
    cache_dir: str | None = None  # per-user result cache; default <persona-gym cache>/distill
    progress: bool = True  # tqdm bar over users

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 10:
            raise ValueError(f"batch_size must be in 1..10, got {self.batch_size}")


def batch_prompt(profile: str, lines: list[str], config: LLMDistillerConfig) -> list[dict]:
    """The chat messages of one reflection step."""
    listing = "\n".join(f"{n}. {line}" for n, line in enumerate(lines, start=1))
    user = (
        f"My profile so far: {profile or 'none yet'}\n\n"
        f"My next ratings, oldest first (1 = hated, 5 = loved; avg = other viewers' average):\n"
        f"{listing}\n\n"
        f"For each movie write one line 'N. <why I gave that rating, one short sentence>'. "
        f"Then write 'PROFILE: <my updated movie taste, at most {config.max_profile_words} words>'."
    )
    return [{"role": "system", "content": _SYSTEM}, {"role": "user", "content": user}]


def accepted_text(text: str | None, limit: int) -> str | None:
    """A generated reason or profile fit to store, or None when it must be refused.

    Refused: chat markup or special tokens (``<|im_end|>``, ``[INST]``, ``system:`` lines) and
    text that addresses the rating model (``"ignore previous instructions"``, ``"always answer
    5"``). Kept text has control characters and newlines turned into single spaces and is cut to
    ``limit`` characters (prompts cut it again to ``FIELD_LIMITS``).
    """
    from persona_gym.simulator.prompts import clean_field

    if text is None:
        return None
    reason = (
        "markup" if _MARKUP.search(text) else "instructions" if _INJECTION.search(text) else None
    )
    if reason:
        log.warning("refused a distiller reply with %s: %r", reason, text[:80])
        return None
    text = " ".join(clean_field(text, len(text) + 1).split())
    return clean_field(text, limit) or None


def parse_reply(reply: str, n: int) -> tuple[list[str | None], str | None]:
    """Reasons for items 1..n (None where missing or refused by :func:`accepted_text`) and the
    profile (None if missing or refused)."""
    match = _PROFILE.search(reply)
    profile = match.group(1).strip() if match else None
    head = reply[: match.start()] if match else reply
    reasons: list[str | None] = [None] * n
    for m in _LINE.finditer(head):
        k = int(m.group(1))
        text = accepted_text(m.group(2).strip().strip("*").strip(), _MAX_REASON_CHARS)
        if 1 <= k <= n and reasons[k - 1] is None and text is not None and len(text) >= 3:
            reasons[k - 1] = text
    return reasons, accepted_text(profile or None, _MAX_PROFILE_CHARS)


def _words(text: str, limit: int) -> str:
    words = text.split()
    return " ".join(words[:limit]) + ("..." if len(words) > limit else "")


class LLMDistiller:
    """The paper's hierarchical self-reflection with any :class:`training.chat.ChatBackend`.

    Per user, interactions in time order are cut into batches of ``config.batch_size``; each
    step shows the model the current profile and the batch and asks for a reason per
    interaction (``Ml``) and the updated profile (``Ms``). Unparsable reasons fall back to the
    data distiller's text (counted in ``traits[u]["llm"]``); an unparsable profile keeps the
    previous one, and a user left with none gets the data distiller's profile.
    """

    name = "llm"

    def __init__(
        self,
        backend,
        config: LLMDistillerConfig | None = None,
        user_ids: Iterable[int] | None = None,
        data_config: DataDistillerConfig | None = None,
    ) -> None:
        self.backend = backend
        self.config = config or LLMDistillerConfig()
        self.data_config = data_config or DataDistillerConfig()
        self.user_ids = None if user_ids is None else sorted(int(u) for u in user_ids)

    @property
    def identity(self) -> str:
        return f"llm:{PROMPT_VERSION}:{self.backend.identity}"

    def cache_path(self) -> Path:
        if self.config.cache_dir is not None:
            return Path(self.config.cache_dir)
        from persona_gym.assets import cache_dir

        return cache_dir() / "distill"

    def distill(self, dataset, split, catalog: ItemCatalog) -> UserMemories:
        from tqdm.auto import tqdm

        traits = compute_traits(dataset, split, catalog, self.data_config)
        users = select_users(traits, self.user_ids)
        rows = training_rows(split, catalog)
        rows = rows[rows["user_id"].isin(users)].reset_index(drop=True)
        identity = self.identity
        profiles: dict[int, str] = {}
        out_traits: dict[int, dict] = {}
        texts: list[str] = []
        for user_id in tqdm(
            users, desc="distil (llm)", unit="user", disable=not self.config.progress
        ):
            group = rows[rows["user_id"] == user_id]
            result = self._user(user_id, group, catalog, identity)
            # cached results may predate the checks of parse_reply
            result["reasons"] = [accepted_text(r, _MAX_REASON_CHARS) for r in result["reasons"]]
            result["profile"] = accepted_text(result["profile"], _MAX_PROFILE_CHARS)
            fallback = [
                memory_text(catalog, int(i), float(r), traits[user_id], self.data_config)
                for i, r in zip(group["item_index"], group["rating"], strict=True)
            ]
            user_texts = []
            for reason, i, r, fb in zip(
                result["reasons"], group["item_index"], group["rating"], fallback, strict=True
            ):
                if reason is None:
                    user_texts.append(fb)
                else:
                    user_texts.append(
                        f"I rated {catalog.title_year(int(i))} {int(r)}/5: "
                        f"{_words(reason, self.config.max_reason_words)}"
                    )
            texts.extend(user_texts)
            profile = result["profile"]
            profiles[user_id] = (
                f"PERSONA: {_words(profile, self.config.max_profile_words)}"
                if profile
                else profile_text(traits[user_id])
            )
            out_traits[user_id] = dict(
                traits[user_id],
                llm={
                    "backend": self.backend.identity,
                    "prompt_version": PROMPT_VERSION,
                    "n_batches": result["n_batches"],
                    "reason_fallbacks": sum(x is None for x in result["reasons"]),
                    "profile_fallbacks": result["profile_fallbacks"],
                    "profile_from_data": profile is None,
                },
            )
        n_fb = sum(t["llm"]["reason_fallbacks"] for t in out_traits.values())
        log.info(
            "LLM distiller: %d users, %d memories, %d reasons fell back to templates",
            len(users),
            len(texts),
            n_fb,
        )
        return UserMemories(profiles, out_traits, memories_frame(rows, texts))

    def _user(self, user_id: int, group: pd.DataFrame, catalog: ItemCatalog, identity: str) -> dict:
        """One user's reflection, from the cache when this exact history was done before."""
        lines = [
            f"{catalog.describe(int(i))} -> I rated {int(r)}"
            for i, r in zip(group["item_index"], group["rating"], strict=True)
        ]
        key = hashlib.sha256(
            json.dumps(
                {
                    "identity": identity,
                    "config": [self.config.batch_size, self.config.max_profile_words],
                    "history": lines,
                }
            ).encode()
        ).hexdigest()
        path = self.cache_path() / f"user-{user_id}-{key[:20]}.json"
        if path.exists():
            return json.loads(path.read_text(encoding="utf-8"))
        profile: str | None = None
        reasons: list[str | None] = []
        replies: list[str] = []
        profile_fallbacks = 0
        size = self.config.batch_size
        for start in range(0, len(lines), size):
            batch = lines[start : start + size]
            t0 = time.perf_counter()
            reply = self.backend.complete(batch_prompt(profile or "", batch, self.config))
            log.debug(
                "user %d: batch %d/%d in %.1f s",
                user_id,
                start // size + 1,
                -(-len(lines) // size),
                time.perf_counter() - t0,
            )
            replies.append(reply)
            got, new_profile = parse_reply(reply, len(batch))
            reasons.extend(got)
            if new_profile is None:
                profile_fallbacks += 1
            else:
                profile = new_profile
        result = {
            "user_id": user_id,
            "key": key,
            "profile": profile,
            "reasons": reasons,
            "n_batches": len(replies),
            "profile_fallbacks": profile_fallbacks,
            "replies": replies,
        }
        atomic_write_json(path, result)
        return result


# --------------------------------------------------------------------------------------------
# Artifacts and CLI
# --------------------------------------------------------------------------------------------


def token_lengths(texts: Iterable[str], tokenizer) -> list[int]:
    """Token count of each text with ``tokenizer`` (no special tokens)."""
    return [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]


def add_parser(subparsers) -> None:
    """Add ``persona-gym distill``."""
    p = subparsers.add_parser(
        "distill",
        help="distil users' training histories into profiles (Ms) and memories (Ml)",
        description=(
            "Stage 1 of the paper: for each user of the protocol split, a profile Ms and one "
            "enriched memory Ml per training interaction, from training data only. Writes "
            "items.parquet, profiles.jsonl, memories.parquet, split.json, "
            "embeddings/items.npy and distill.json into --out."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="ml-100k", help="dataset name or MovieLens folder")
    p.add_argument("--out", required=True, help="artifacts directory to write")
    p.add_argument(
        "--backend",
        choices=["data", "hf", "openai"],
        default="data",
        help="data: deterministic templates; hf: local LLM; openai: HTTP endpoint",
    )
    p.add_argument(
        "--model",
        default=None,
        help="hf: model alias/path/hub id (default smollm2-135m-instruct); "
        "openai: model name (required)",
    )
    p.add_argument(
        "--base-url",
        default=None,
        help="openai: endpoint base URL, e.g. http://localhost:8000/v1 "
        "(API key from $OPENAI_API_KEY)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=256,
        help="hf/openai: reply length cap per reflection step",
    )
    p.add_argument("--n-users", type=int, default=200, help="users in the protocol split")
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument(
        "--all-users",
        action="store_true",
        help="also simulate every other user with >= 20 ratings (split by time like the "
        "protocol users; the adapters still train on the protocol users only)",
    )
    p.add_argument(
        "--max-users",
        type=int,
        default=None,
        help="distil only the first N split users (quick LLM runs)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing artifacts directory --out (its personas and adapters too)",
    )
    p.set_defaults(func=run_distill)


def run_distill(args: argparse.Namespace) -> int:
    """Body of ``persona-gym distill``: builds the directory aside and swaps it in whole
    (:func:`persona_gym.artifacts.staged_dir`)."""
    from persona_gym.artifacts import staged_dir
    from persona_gym.errors import ConfigError

    for name in ("n_users", "max_users"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.backend == "openai" and (not args.base_url or not args.model):
        raise ConfigError("--backend openai needs --base-url and --model")
    with staged_dir(args.out, force=args.force) as work:
        return _distill_into(args, work)


def _distill_into(args: argparse.Namespace, out: Path) -> int:
    from persona_gym.data import load_dataset, protocol_split
    from persona_gym.embeddings import DEFAULT_EMBEDDER, Embedder, embed_items

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    dataset = load_dataset(args.dataset)
    split = protocol_split(dataset, n_users=args.n_users, seed=args.seed, all_users=args.all_users)
    catalog = ItemCatalog.from_frames(dataset.items, split.item_stats())
    timings["load+split"] = time.perf_counter() - t0

    user_ids = None
    if args.max_users is not None:
        user_ids = [int(u) for u in split.user_ids[: args.max_users]]
    if args.backend == "data":
        distiller: Any = DataDistiller(user_ids=user_ids)
    else:
        if args.backend == "hf":
            from training.chat import HFChatBackend

            backend: Any = HFChatBackend(
                model=args.model or "smollm2-135m-instruct", max_new_tokens=args.max_new_tokens
            )
        else:
            from training.chat import OpenAIChatBackend

            backend = OpenAIChatBackend(
                base_url=args.base_url, model=args.model, max_tokens=args.max_new_tokens
            )
        config = LLMDistillerConfig(cache_dir=str(out / "llm_cache"), progress=not args.no_progress)
        distiller = LLMDistiller(backend, config, user_ids=user_ids)

    t0 = time.perf_counter()
    result = distiller.distill(dataset, split, catalog)
    timings["distill"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    embedder = Embedder(DEFAULT_EMBEDDER)
    item_embeddings = embed_items(catalog, embedder)
    timings["item embeddings"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    from transformers import AutoTokenizer

    from persona_gym.assets import DEFAULT_SLM, resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(DEFAULT_SLM))
    ms_tokens = token_lengths(result.profiles.values(), tokenizer)
    ml_tokens = token_lengths(result.memories["text"], tokenizer)
    timings["token counts"] = time.perf_counter() - t0
    info = {
        "backend": distiller.identity,
        "dataset": dataset.name,
        "n_users": len(result.profiles),
        "n_memories": len(result.memories),
        "embedder": DEFAULT_EMBEDDER,
        "tokenizer": DEFAULT_SLM,
        "ms_tokens": _length_stats(ms_tokens),
        "ml_tokens": _length_stats(ml_tokens),
    }
    if args.backend != "data":
        info["reason_fallbacks"] = sum(t["llm"]["reason_fallbacks"] for t in result.traits.values())
        info["profiles_from_data"] = sum(
            t["llm"]["profile_from_data"] for t in result.traits.values()
        )
    t0 = time.perf_counter()
    write_artifacts(out, dataset, split, catalog, result, item_embeddings, info)
    timings["write"] = time.perf_counter() - t0
    log.info("timings (s): %s", {k: round(v, 2) for k, v in timings.items()})
    log.info(
        "wrote %s: %d profiles (median Ms %s tokens), %d memories (median Ml %s tokens)",
        args.out,
        len(result.profiles),
        info["ms_tokens"]["median"],
        len(result.memories),
        info["ml_tokens"]["median"],
    )
    return 0


def _length_stats(lengths: list[int]) -> dict:
    if not lengths:
        return {"min": 0, "median": 0, "max": 0}
    return {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)}
