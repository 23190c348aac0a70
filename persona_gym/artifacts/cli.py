"""``persona-gym artifacts verify|rehash DIR``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from persona_gym.artifacts import load_artifacts
from persona_gym.artifacts.manifest import MANIFEST, rehash


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``persona-gym artifacts verify|rehash DIR``."""
    parser = subparsers.add_parser(
        "artifacts",
        help="verify an artifacts directory or record a deliberate change",
        description="verify: check the manifest and the hash of every file of an artifacts "
        "directory ('ml-100k' = the shipped simulator). rehash: record the current "
        "files in the manifest after a deliberate change (or for a manifest written "
        "by an older persona-gym).",
    )
    parser.add_argument("action", choices=["verify", "rehash"])
    parser.add_argument("dir", help="artifacts directory (verify also takes 'ml-100k')")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.action == "rehash":
        manifest = rehash(args.dir)
        sys.stdout.write(
            f"recorded {len(manifest['files'])} files in {Path(args.dir) / MANIFEST}\n"
        )
        return 0
    loaded = load_artifacts(args.dir)
    sys.stdout.write(
        f"{loaded.root}: {len(loaded.manifest['files'])} files match {MANIFEST}; "
        f"{len(loaded.profiles)} users, {len(loaded.manifest['adapters'])} adapters\n"
    )
    return 0
