"""The ``persona-gym`` command. Each subcommand lives in the module that owns the work.

A command module exposes ``add_parser(subparsers)``, which adds its parser and sets
``func`` (called with the parsed namespace, returns an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules providing subcommands, in the order --help lists them.
_COMMAND_MODULES = [
    "persona_gym.data.cli",
    "training.distill",
    "training.personas",
    "training.train",
    "training.evaluate",
    "agents.train",
    "agents.evaluate",
    "persona_gym.demo",
]


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every available subcommand."""
    from persona_gym import __version__

    parser = argparse.ArgumentParser(
        prog="persona-gym",
        description="Simulated users for recommender-system RL: data, training, environments.",
    )
    parser.add_argument("--version", action="version", version=f"persona-gym {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
