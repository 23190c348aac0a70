"""Stage 3: fine-tune LoRA adapters that rate movies like the users of a persona.

``persona-gym train --artifacts DIR`` reads what ``distill`` and ``personas`` wrote into DIR,
trains the adapters and writes the manifest. ``--preset`` picks the recipe:

* ``sequence`` (the default): the recipe of the shipped PersonaML100K-v0 simulator, the
  sequence user model's persona adapters (``training/sequence_training.py``; its defaults).
* ``block``: the earlier item-token simulator's recipe, with the block trainer below: persona
  adapters with item tokens and the collaborative signal (cf cue, surprise cue, cf items, cf
  prior) owning 0.75 of their users' taste, on every training interaction
  (:func:`block_train_config`).
* ``paper``: the paper's configuration with the block trainer (:class:`TrainConfig`'s defaults:
  text prompts, persona and single adapters, no collaborative signal; ``make paper-table``).

The block trainer's options apply under ``block`` and ``paper``, the sequence model's under
``sequence``; the other trainer's options are refused. The block trainer trains, with RAFT
(retrieved ``Ml`` memories in every training prompt, as at inference):

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
import functools
import hashlib
import json
import logging
import resource
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from persona_gym.artifacts import (
    library_versions,
    load_personas,
    load_tables,
    prepare_stage,
    tables_digest,
    training_users,
    write_manifest,
)
from persona_gym.assets import (
    DEFAULT_SLM,
    load_causal_lm,
    model_source,
    resolve_model,
)
from persona_gym.config_cli import plain
from persona_gym.errors import ConfigError
from persona_gym.io import atomic_write, atomic_write_json
from persona_gym.simulator.collaborative import (
    CF_FILE,
    load_collaborative,
    persona_tastes,
    taste_axes,
)
from persona_gym.simulator.engine import ItemTokens, LayeredLM
from persona_gym.simulator.prompts import PromptBuilder, PromptConfig
from persona_gym.simulator.rating_prior import fit_rating_prior
from persona_gym.simulator.retrieval import MemoryIndex
from training.adapter_training import train_adapter
from training.examples import LowerCache, adapter_datasets, build_examples, frozen_pass
from training.parallel import run_in_workers

log = logging.getLogger(__name__)

VARIANTS = ("persona", "single-max", "single-min", "user")


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
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
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
    prompt: PromptConfig = field(default_factory=PromptConfig.paper)
    item_learning_rate: float = 5e-3
    lower_dtype: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.prompt, dict):
            self.prompt = PromptConfig.of_manifest(self.prompt)
        self.variants = tuple(self.variants)
        self.target_modules = tuple(self.target_modules)
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"TrainConfig.variants: unknown {unknown}; choose from {VARIANTS}")
        for name in (
            "rank",
            "alpha",
            "epochs",
            "batch_examples",
            "blocks_per_sequence",
            "eval_every",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"TrainConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.learning_rate <= 0:
            raise ValueError(f"TrainConfig.learning_rate must be > 0, got {self.learning_rate}")
        if self.prompt.persona_taste and self.variants != ("persona",):
            raise ValueError(
                "TrainConfig.prompt.persona_taste moves the cues toward each persona's taste: "
                "train the persona variant alone (--variants persona)"
            )

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
        keys = (
            "base_model",
            "lora_layers",
            "max_examples_per_user",
            "val_per_user",
            "prompt",
            "lower_dtype",
        )
        values = {k: v for k, v in self.to_dict().items() if k in keys}
        values["prompt"] = {
            k: v for k, v in values["prompt"].items() if k != "cf_items"
        }  # injected above
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _trained_with(root: Path, config: TrainConfig) -> bool:
    """Whether ``root``'s manifest records adapters of ``config`` (the same digest: other
    variants may be added to them)."""
    try:
        recorded = json.loads((root / "manifest.json").read_text())["training"]
        if "sequence" in recorded:  # the sequence model's adapters (--preset sequence)
            return False
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        return (
            TrainConfig(**{k: v for k, v in recorded.items() if k in names}).digest()
            == config.digest()
        )
    except (OSError, ValueError, KeyError, TypeError):
        return False


@dataclass
class _Run:
    """What every process of a training run loads once: the model, the examples and their
    adapter sets, the frozen-layer activations; :meth:`train_one` trains one adapter on them."""

    root: Path
    config: TrainConfig
    device: str
    base: torch.nn.Module  # frozen; each adapter is wrapped around it and unloaded again
    hidden_size: int
    layered: LayeredLM
    cache: LowerCache
    examples: list
    sets: dict[str, tuple[list[int], list[int]]]
    item_embeddings: np.ndarray
    split_layer: int
    pad_id: int
    model_path: str
    lower_seconds: float

    def train_one(self, name: str, progress: bool) -> dict:
        """Train (or resume) adapter ``name``, save it; return its metrics."""
        config, (train_idx, val_idx) = self.config, self.sets[name]
        items = None
        if config.prompt.item_tokens:
            items = ItemTokens(self.item_embeddings, self.hidden_size, self.split_layer).to(
                self.device
            )
        prior = None
        if config.prompt.cf_prior:
            fit_on = [self.examples[i] for i in train_idx]
            prior = fit_rating_prior(
                [e.request.cf_prediction for e in fit_on],
                [e.request.surprise or 0.0 for e in fit_on],
                [e.rating for e in fit_on],
            ).to(self.device)
        self.base, metrics = train_adapter(
            name,
            self.base,
            self.layered,
            self.cache,
            self.examples,
            train_idx,
            val_idx,
            config,
            self.split_layer,
            self.pad_id,
            self.root,
            progress,
            items,
            prior,
        )
        return metrics


def _load_run(root: Path, config: TrainConfig, device: str, compile: bool, progress: bool) -> _Run:
    """Load the tables and the model, build the examples, and compute the frozen-layer
    activations or reuse the cached ones (every worker reuses the parent's)."""
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
    layered = LayeredLM(
        base, builder.rating_token_ids, compile=compile, placeholder_id=builder.item_placeholder_id
    )
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    split_layer = layered.n_layers - config.lora_layers if config.lora_layers else 0
    if not 0 <= split_layer < layered.n_layers:
        raise ValueError(
            f"lora_layers={config.lora_layers} but the model has {layered.n_layers} layers"
        )

    mine = training_users(root, profiles)  # not the other simulated users of --all-users
    tastes = None
    if config.prompt.persona_taste:
        assert collaborative is not None  # persona_taste needs cf_cue, so it was loaded above
        persona_taste = persona_tastes(collaborative, user_persona, mine)
        axes = taste_axes(persona_taste)
        tastes = {
            u: collaborative.taste_of(
                u, persona_taste[user_persona[u]], config.prompt.persona_taste, axes
            )
            for u in mine
        }
    examples = build_examples(
        {u: profiles[u] for u in mine}, memories, index, config, collaborative, tastes
    )
    sets = adapter_datasets(examples, user_persona, config)
    log.info(
        "%d examples (%d validation), adapters: %s",
        len(examples),
        sum(e.validation for e in examples),
        ", ".join(f"{k}={len(v[0])}" for k, v in sets.items()),
    )

    cache_key = hashlib.sha256(
        (
            config.activations_digest()
            + str(model_source(model_path)["sha256"] or model_path)
            + str(len(examples))
        ).encode()
    ).hexdigest()[:16]
    cache_path = root / "cache" / f"lower-{cache_key}.pt"
    lower_started = time.perf_counter()
    if cache_path.exists():
        cache = LowerCache(**torch.load(cache_path, weights_only=False))
        log.info("reusing frozen-layer activations from %s", cache_path)
    else:
        cache = frozen_pass(
            examples, builder, layered, config, split_layer, pad_id, device, compile, progress
        )
        atomic_write(cache_path, lambda tmp: torch.save(cache.state(), tmp))
    return _Run(
        root,
        config,
        device,
        base,
        base.config.hidden_size,
        layered,
        cache,
        examples,
        sets,
        item_embeddings,
        split_layer,
        pad_id,
        model_path,
        time.perf_counter() - lower_started,
    )


def _worker_run(
    root: Path, config: TrainConfig, device: str, compile: bool, progress: bool, rank: int
) -> Callable[[str], dict]:
    """A worker's job runner (:func:`training.parallel.run_in_workers`): its own copy of the
    run; the first worker shows its progress bars."""
    run = _load_run(root, config, device, compile, progress=False)
    return lambda name: run.train_one(name, progress and rank == 0)


def train(
    artifacts: str | Path,
    config: TrainConfig,
    device: str = "cpu",
    progress: bool = True,
    compile: bool = False,
    force: bool = False,
    workers: int = 1,
) -> dict:
    """Train every adapter of ``config.variants`` into ``artifacts``; write the manifest.

    ``compile`` runs the decoder layers through ``torch.compile`` (faster on CPU after its warm-up).
    A directory with adapters of another config is refused unless ``force``, which deletes them
    (and the manifest, checkpoints and evaluation) first; the same config resumes or adds variants.
    ``workers`` > 1 trains the adapters in that many processes (:mod:`training.parallel`; at
    most one per adapter to train), each with its share of the torch threads; the adapters,
    metrics and manifest are those of the one-process run.
    """
    if workers < 1:
        raise ConfigError(f"workers (--workers) must be >= 1, got {workers}")
    root = Path(artifacts)
    prepare_stage(root, "train", force=force, same_run=_trained_with(root, config))
    started = time.perf_counter()
    run = _load_run(root, config, device, compile, progress)
    sets, split_layer, examples, model_path = (
        run.sets,
        run.split_layer,
        run.examples,
        run.model_path,
    )
    lower_seconds = run.lower_seconds

    metrics: dict[str, dict] = {}
    metrics_path = root / "checkpoints" / "metrics.json"
    if metrics_path.exists():
        metrics = json.loads(metrics_path.read_text()).get(config.digest(), {})
    todo = []
    for name in sets:
        if name in metrics and (root / "adapters" / name / "adapter_config.json").exists():
            log.info("adapter %s: already trained, skipping", name)
        else:
            todo.append(name)
    if workers > max(1, len(todo)):
        log.info(
            "--workers %d but %d adapters to train: %d workers",
            workers,
            len(todo),
            max(1, len(todo)),
        )
        workers = max(1, len(todo))
    finished: Iterable[tuple[str, dict]]
    if workers == 1:
        finished = ((name, run.train_one(name, progress)) for name in todo)
    else:
        del run  # the workers load their own
        setup = functools.partial(_worker_run, root, config, device, compile, progress)
        finished = run_in_workers(
            setup,
            todo,
            workers,
            resume_hint="rerun the same command to resume from the checkpoints",
        )
    for name, adapter_metrics in finished:
        metrics[name] = adapter_metrics
        atomic_write_json(metrics_path, {config.digest(): metrics})
    # in the order of the adapter sets, however the workers finished (earlier variants' last)
    metrics = {**{n: metrics[n] for n in sets if n in metrics}, **metrics}

    split_info = (
        json.loads((root / "split.json").read_text()) if (root / "split.json").exists() else {}
    )
    personas: dict[str, list[int]] = defaultdict(list)
    for user, p in sorted(load_personas(root).items()):
        personas[str(p)].append(user)
    peak_rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if workers > 1:  # the largest worker's
        peak_rss_kb = max(peak_rss_kb, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    summary = {
        "wall_seconds": round(time.perf_counter() - started, 1),
        "frozen_layer_seconds": round(lower_seconds, 1),
        "peak_rss_mb": round(peak_rss_kb / 1024, 1),
        "examples": len(examples),
        "workers": workers,
    }
    manifest = {
        "base_model": model_source(model_path),
        "dataset": split_info.get(
            "dataset", split_info.get("params", {}).get("dataset", "unknown")
        ),
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
    log.info(
        "trained %d adapters in %.0f s; manifest at %s",
        len(metrics),
        summary["wall_seconds"],
        root / "manifest.json",
    )
    return manifest


# -- the CLI: three presets ----------------------------------------------------------------------
PRESETS = ("sequence", "block", "paper")


def block_train_config() -> TrainConfig:
    """The earlier item-token simulator's recipe (``--preset block``): the
    block trainer's persona adapters with item tokens and the collaborative signal, owning 0.75
    of their users' taste, on every training interaction."""
    return TrainConfig(
        variants=("persona",),
        blocks_per_sequence=8,
        max_examples_per_user=0,
        val_per_user=5,
        prompt=PromptConfig(),
    )


def block_preset(preset: str) -> TrainConfig:
    """The :class:`TrainConfig` of a block-trainer preset: ``block`` or ``paper`` (the paper's
    configuration: TrainConfig's defaults)."""
    return block_train_config() if preset == "block" else TrainConfig()


# Options of one trainer only: (flag, dest). Given under the other, they are refused in one line.
BLOCK_ONLY = (
    ("--variants", "variants"),
    ("--target-modules", "target_modules"),
    ("--lora-layers", "lora_layers"),
    ("--blocks-per-sequence", "blocks_per_sequence"),
    ("--max-examples-per-user", "max_examples_per_user"),
    ("--memories", "memories"),
    ("--no-profile", "no_profile"),
    ("--max-tokens", "max_tokens"),
    ("--[no-]item-tokens", "item_tokens"),
    ("--[no-]cf-cue", "cf_cue"),
    ("--[no-]surprise-cue", "surprise_cue"),
    ("--[no-]cf-prior", "cf_prior"),
    ("--[no-]cf-items", "cf_items"),
    ("--patience", "patience"),
    ("--checkpoint-every", "checkpoint_every"),
    ("--item-learning-rate", "item_learning_rate"),
    ("--lower-dtype", "lower_dtype"),
    ("--device", "device"),
    ("--workers", "workers"),
    ("--no-progress", "no_progress"),
    ("--no-compile", "no_compile"),
)
SEQUENCE_ONLY = (
    ("--history", "history"),
    ("--targets-per-user", "targets_per_user"),
    ("--other-users", "other_users"),
    ("--val-share", "val_share"),
)


def _common_defaults(preset: str) -> dict:
    """A preset's values of the options both trainers read."""
    if preset == "sequence":
        from training.sequence_training import PERSONA_TASTE, SequenceTrainConfig

        s = SequenceTrainConfig()
        return {
            "rank": s.rank,
            "alpha": s.alpha,
            "dropout": s.dropout,
            "learning_rate": s.learning_rate,
            "epochs": s.epochs,
            "batch": s.batch,
            "mse_weight": s.mse_weight,
            "val_per_user": s.val_per_user,
            "eval_every": s.eval_every,
            "window": s.window,
            "persona_taste": PERSONA_TASTE,
            "seed": s.seed,
        }
    b = block_preset(preset)
    return {
        "rank": b.rank,
        "alpha": b.alpha,
        "dropout": b.dropout,
        "learning_rate": b.learning_rate,
        "epochs": b.epochs,
        "batch": b.batch_examples,
        "mse_weight": b.mse_weight,
        "val_per_user": b.val_per_user,
        "eval_every": b.eval_every,
        "window": b.prompt.window_size,
        "persona_taste": b.prompt.persona_taste,
        "seed": b.seed,
    }


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from training.sequence_training import SequenceTrainConfig

    block_recipe, paper, sequence = block_train_config(), TrainConfig(), SequenceTrainConfig()
    common = {p: _common_defaults(p) for p in PRESETS}

    def three(dest: str, text: str) -> str:
        values = "; ".join(f"{p}: {common[p][dest]}" for p in PRESETS)
        return f"{text} ({values})"

    def blocks(text: str, of_block, of_paper) -> str:
        return f"{text} (block: {of_block}; paper: {of_paper})"

    parser = subparsers.add_parser(
        "train",
        help="train the simulator's persona adapters (stage 3)",
        description=plain(__doc__ or ""),
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--artifacts",
        required=True,
        type=Path,
        help="directory written by `persona-gym distill` and `persona-gym personas`",
    )
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default="sequence",
        help="sequence: the shipped simulator's recipe, the sequence user model "
        "(training/sequence_training.py); block: the earlier item-token simulator's (block "
        "trainer: persona adapters with item tokens and the collaborative signal); paper: the "
        "paper's configuration (block trainer: text "
        "prompts, persona and single adapters, no collaborative signal; `make paper-table`)",
    )
    parser.add_argument(
        "--base-model", default=paper.base_model, help="base SLM: alias, local folder or hub id"
    )
    parser.add_argument("--rank", type=int, default=None, help=three("rank", "LoRA rank r"))
    parser.add_argument(
        "--alpha", type=int, default=None, help=three("alpha", "LoRA scaling alpha")
    )
    parser.add_argument(
        "--dropout", type=float, default=None, help=three("dropout", "LoRA dropout")
    )
    parser.add_argument(
        "--learning-rate", type=float, default=None, help=three("learning_rate", "AdamW rate")
    )
    parser.add_argument(
        "--epochs", type=int, default=None, help=three("epochs", "passes over the training data")
    )
    parser.add_argument(
        "--batch-size",
        dest="batch",
        type=int,
        default=None,
        help=three("batch", "examples (sequence: users) per optimizer step"),
    )
    parser.add_argument(
        "--mse-weight",
        type=float,
        default=None,
        help=three(
            "mse_weight", "weight of the expected rating's squared error beside the cross-entropy"
        ),
    )
    parser.add_argument(
        "--val-per-user",
        type=int,
        default=None,
        help=three("val_per_user", "each user's last N training ratings form the validation slice"),
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=None,
        help=three("eval_every", "optimizer steps between validation passes"),
    )
    parser.add_argument(
        "--window", type=int, default=None, help=three("window", "short-term window size k")
    )
    parser.add_argument(
        "--persona-taste",
        type=float,
        default=None,
        metavar="S",
        help=three(
            "persona_taste",
            "share of each user's collaborative taste their persona adapter owns (0..1)",
        ),
    )
    parser.add_argument(
        "--seed", type=int, default=None, help=three("seed", "data order and initialisation")
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace adapters trained with another config (and their evaluation)",
    )
    seq = parser.add_argument_group("--preset sequence only (the sequence user model)")
    seq.add_argument(
        "--history",
        type=int,
        default=None,
        help=f"logged events in each user's static prefix (default: {sequence.history})",
    )
    seq.add_argument(
        "--other-users",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train on the dataset's other users, each under the persona nearest their "
        f"taste (default: {sequence.other_users})",
    )
    seq.add_argument(
        "--val-share",
        type=float,
        default=None,
        help="share of each simulated user's ratings (their last, at least --val-per-user) held "
        "out to choose the step and fit the gap scale (default: "
        f"{sequence.val_share})",
    )
    seq.add_argument(
        "--targets-per-user",
        type=int,
        default=None,
        help=f"rated events per user and epoch, read after a prefix drawn each epoch (default: "
        f"{sequence.targets_per_user})",
    )
    block = parser.add_argument_group(
        "--preset block and paper only (the block trainer: LoRA on the top layers)"
    )
    block.add_argument(
        "--variants",
        nargs="+",
        default=None,
        choices=VARIANTS,
        help=blocks(
            "adapter sets to train", " ".join(block_recipe.variants), " ".join(paper.variants)
        ),
    )
    block.add_argument("--target-modules", nargs="+", default=None, help="linear layers with LoRA")
    block.add_argument(
        "--lora-layers",
        type=int,
        default=None,
        help=blocks(
            "LoRA on the top N layers, 0 = all", block_recipe.lora_layers, paper.lora_layers
        ),
    )
    block.add_argument(
        "--blocks-per-sequence",
        type=int,
        default=None,
        help=blocks(
            "examples of one user packed behind one profile prefix",
            block_recipe.blocks_per_sequence,
            paper.blocks_per_sequence,
        ),
    )
    block.add_argument(
        "--max-examples-per-user",
        type=int,
        default=None,
        help=blocks(
            "each user's most recent N training interactions, 0 = all",
            block_recipe.max_examples_per_user,
            paper.max_examples_per_user,
        ),
    )
    block.add_argument(
        "--memories",
        type=int,
        default=None,
        help=blocks(
            "retrieved Ml memories per prompt, 0 = none",
            block_recipe.prompt.n_memories,
            paper.prompt.n_memories,
        ),
    )
    block.add_argument(
        "--no-profile", action="store_true", default=None, help="leave Ms out of the prompt"
    )
    block.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help=blocks(
            "prompt budget in tokens; older memories are dropped first",
            block_recipe.prompt.max_tokens,
            paper.prompt.max_tokens,
        ),
    )
    for flag, text in (
        (
            "item_tokens",
            "compact prompts: each movie is one soft token projected from its embedding",
        ),
        ("cf_cue", "the collaborative model's prediction next to the answer"),
        ("surprise_cue", "how the window's ratings deviated from the collaborative predictions"),
        (
            "cf_prior",
            "a learned Gaussian prior around the collaborative prediction (with the cf cue)",
        ),
        ("cf_items", "item tokens carry collaborative factors (with item tokens)"),
    ):
        block.add_argument(
            f"--{flag.replace('_', '-')}",
            action=argparse.BooleanOptionalAction,
            default=None,
            help=blocks(text, "on" if getattr(block_recipe.prompt, flag) else "off", "off"),
        )
    block.add_argument(
        "--patience",
        type=int,
        default=None,
        help=blocks(
            "validation passes without improvement before stopping",
            block_recipe.patience,
            paper.patience,
        ),
    )
    block.add_argument(
        "--checkpoint-every",
        type=int,
        default=None,
        help=blocks(
            "steps between checkpoints", block_recipe.checkpoint_every, paper.checkpoint_every
        ),
    )
    block.add_argument(
        "--item-learning-rate",
        type=float,
        default=None,
        help=blocks(
            "learning rate of the item projection",
            block_recipe.item_learning_rate,
            paper.item_learning_rate,
        ),
    )
    block.add_argument(
        "--lower-dtype",
        default=None,
        choices=["auto", "float32", "bfloat16"],
        help="dtype of the one-off frozen-layer pass (default: auto, bfloat16 where the "
        "hardware has it)",
    )
    block.add_argument(
        "--device", default=None, help="torch device: cpu, cuda, cuda:N (default: cpu)"
    )
    block.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help="train the adapters in N processes, each with its share of the torch threads; "
        "a killed run resumes with any N (default: 1)",
    )
    block.add_argument("--no-progress", action="store_true", default=None, help="no progress bars")
    block.add_argument(
        "--no-compile",
        action="store_true",
        default=None,
        help="run eagerly instead of through torch.compile",
    )
    parser.set_defaults(func=_run)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default (where it has one for every
    preset; the others name theirs)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or isinstance(action, argparse._StoreTrueAction):
            return action.help
        return super()._get_help_string(action)


def _refuse_other_trainer(args: argparse.Namespace) -> None:
    """One line naming the given options that the chosen preset's trainer does not read."""
    only: tuple[tuple[str, str], ...]
    if args.preset == "sequence":
        only, trainer = BLOCK_ONLY, "the block trainer's (--preset block or paper)"
        fix = "drop them, or add --preset block"
    else:
        only, trainer = SEQUENCE_ONLY, "the sequence user model's (--preset sequence)"
        fix = "drop them, or leave --preset out"
    given = [flag for flag, dest in only if getattr(args, dest) is not None]
    if given:
        raise ConfigError(
            f"{', '.join(given)}: {'options' if len(given) > 1 else 'an option'} of {trainer} "
            f"only; {fix}"
        )


def _run(args: argparse.Namespace) -> int:
    if args.preset == "sequence":
        return _run_sequence(args)
    return _run_block(args)


def _given(args: argparse.Namespace, dest: str, default):
    value = getattr(args, dest)
    return default if value is None else value


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    """``args`` with the chosen preset's defaults for what was not given (after refusing the
    other trainer's options)."""
    _refuse_other_trainer(args)
    args = argparse.Namespace(**vars(args))
    for dest, value in _common_defaults(args.preset).items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    return args


def sequence_config(args: argparse.Namespace):
    """The :class:`~training.sequence_training.SequenceTrainConfig` and persona taste share of
    parsed ``persona-gym train --preset sequence`` options."""
    from training.sequence_training import SequenceTrainConfig

    args = _resolve(args)
    d = SequenceTrainConfig()
    config = SequenceTrainConfig(
        history=_given(args, "history", d.history),
        window=args.window,
        targets_per_user=_given(args, "targets_per_user", d.targets_per_user),
        other_users=_given(args, "other_users", d.other_users),
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        learning_rate=args.learning_rate,
        epochs=args.epochs,
        batch=args.batch,
        mse_weight=args.mse_weight,
        val_per_user=args.val_per_user,
        val_share=_given(args, "val_share", d.val_share),
        eval_every=args.eval_every,
        seed=args.seed,
    )
    if not 0.0 < config.val_share < 1.0:
        raise ConfigError(f"--val-share must be in (0, 1), got {config.val_share}")
    for name in (
        "history",
        "window",
        "targets_per_user",
        "rank",
        "alpha",
        "epochs",
        "batch",
        "eval_every",
    ):
        if getattr(config, name) < 1:
            raise ConfigError(
                f"--{name.replace('_', '-')} must be >= 1, got {getattr(config, name)}"
            )
    if not 0.0 <= args.persona_taste <= 1.0:
        raise ConfigError(f"--persona-taste must be in [0, 1], got {args.persona_taste}")
    return config, args.persona_taste


def _run_sequence(args: argparse.Namespace) -> int:
    """``--preset sequence``: the sequence user model's persona adapters."""
    from training.sequence_training import train_sequence

    config, persona_taste = sequence_config(args)
    results = train_sequence(args.artifacts, config, args.base_model, persona_taste, args.force)
    for name, m in results.items():
        print(
            f"{name:>14}: {m['training_users']:5d} users, {m['steps']:4d} steps, "
            f"val RMSE {m['best']['rmse']:.4f} (prior alone {m['prior_alone']['rmse']:.4f})"
        )
    manifest = json.loads((Path(args.artifacts) / "manifest.json").read_text())
    print(json.dumps(manifest["metrics"]["run"]))
    print(json.dumps(library_versions()))
    return 0


def block_config(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``persona-gym train`` options under a block-trainer
    preset (``block`` or ``paper``), with that preset's defaults."""
    args = _resolve(args)
    preset = block_preset(args.preset)
    p = preset.prompt

    def flag(dest: str) -> bool:
        return bool(_given(args, dest, getattr(p, dest)))

    prompt = PromptConfig(
        window_size=args.window,
        n_memories=_given(args, "memories", p.n_memories),
        use_profile=p.use_profile and not args.no_profile,
        max_tokens=_given(args, "max_tokens", p.max_tokens),
        crowd_cue=p.crowd_cue,
        item_tokens=flag("item_tokens"),
        cf_cue=flag("cf_cue"),
        surprise_cue=flag("surprise_cue"),
        cf_items=flag("cf_items"),
        cf_prior=flag("cf_prior"),
        persona_taste=args.persona_taste,
    )
    return TrainConfig(
        variants=tuple(_given(args, "variants", preset.variants)),
        base_model=args.base_model,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        target_modules=tuple(_given(args, "target_modules", preset.target_modules)),
        lora_layers=_given(args, "lora_layers", preset.lora_layers),
        learning_rate=args.learning_rate,
        epochs=args.epochs,
        batch_examples=args.batch,
        max_examples_per_user=_given(args, "max_examples_per_user", preset.max_examples_per_user),
        mse_weight=args.mse_weight,
        seed=args.seed,
        prompt=prompt,
        item_learning_rate=_given(args, "item_learning_rate", preset.item_learning_rate),
        val_per_user=args.val_per_user,
        lower_dtype=_given(args, "lower_dtype", preset.lower_dtype),
        blocks_per_sequence=_given(args, "blocks_per_sequence", preset.blocks_per_sequence),
        eval_every=args.eval_every,
        patience=_given(args, "patience", preset.patience),
        checkpoint_every=_given(args, "checkpoint_every", preset.checkpoint_every),
    )


def _run_block(args: argparse.Namespace) -> int:
    """``--preset block`` or ``--preset paper``: the block trainer
    (:func:`train`)."""
    config = block_config(args)

    manifest = train(
        args.artifacts,
        config,
        device=_given(args, "device", "cpu"),
        progress=not args.no_progress,
        compile=not args.no_compile,
        force=args.force,
        workers=_given(args, "workers", 1),
    )
    for name, m in manifest["metrics"]["adapters"].items():
        print(
            f"{name:>14}: {m['train_examples']:5d} examples, {m['steps']:4d} steps, "
            f"val RMSE {m['best_val_rmse']:.4f}, {m['train_tokens_per_s']:.0f} tokens/s"
        )
    print(json.dumps(manifest["metrics"]["run"]))
    print(json.dumps(library_versions()))
    return 0
