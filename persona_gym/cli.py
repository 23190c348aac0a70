"""The ``persona-gym`` command. Each subcommand lives in the module that owns the work.

A command module exposes ``add_parser(subparsers)``, which adds its parser and sets
``func`` (called with the parsed namespace, returns an exit code).

Errors: an ordinary failure (bad input or arguments, a missing or corrupted file, a refused
overwrite, a permission problem, a backend that failed after its retries) prints ONE line on
stderr, ``persona-gym COMMAND: error: MESSAGE``, naming the file, field or value and the fix,
and exits with status 2 (as argparse does for bad arguments). ``-v`` (before or after the
command) also prints the traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

from persona_gym.errors import PersonaGymError

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C

# Modules providing subcommands, in the order --help lists them.
_COMMAND_MODULES = [
    "persona_gym.data.cli",
    "training.build",
    "training.distill",
    "training.personas",
    "training.train",
    "training.evaluate",
    "agents.train",
    "agents.evaluate",
    "agents.demo",
    "persona_gym.artifacts.cli",
]

# What counts as an ordinary error: our own family, the OS's (missing files, permissions, a
# full disk, network), and the ValueErrors the configs and data checks raise with their message.
ORDINARY_ERRORS: tuple[type[BaseException], ...] = (PersonaGymError, OSError, ValueError)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every available subcommand."""
    from persona_gym import __version__

    parser = argparse.ArgumentParser(
        prog="persona-gym",
        description="Simulated users for recommender-system RL: data, training, environments.",
    )
    parser.add_argument("--version", action="version", version=f"persona-gym {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log at DEBUG level and print tracebacks of errors",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    _add_verbose_everywhere(parser)
    return parser


def _add_verbose_everywhere(parser: argparse.ArgumentParser) -> None:
    """Accept ``-v`` after a subcommand too (``persona-gym train ... -v``); record each
    subcommand's name for error lines (``persona-gym data info: error: ...``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if not any("-v" in a.option_strings for a in sub._actions):
                    sub.add_argument(
                        "-v",
                        "--verbose",
                        action="store_true",
                        default=argparse.SUPPRESS,
                        help="log at DEBUG level and print tracebacks of errors",
                    )
                sub.set_defaults(command_name=sub.prog)
                _add_verbose_everywhere(sub)


def error_line(error: BaseException) -> str:
    """One line for an ordinary error: the message with its whitespace collapsed; OS errors
    name the path and say what to check."""
    if isinstance(error, OSError) and not isinstance(error, PersonaGymError) and error.filename:
        reason = error.strerror or type(error).__name__
        message = f"{reason}: {error.filename}"
        if error.filename2:
            message += f" -> {error.filename2}"
        message += (
            "; check that the path exists and that you may read and write it, or choose another"
        )
    else:
        message = str(error) or type(error).__name__
    return " ".join(message.split())


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_ERROR
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        name = getattr(args, "command_name", f"persona-gym {args.command}")
        resume = getattr(args, "resume_hint", None)
        sys.stderr.write(f"{name}: interrupted" + (f"; {resume}" if resume else "") + "\n")
        return EXIT_INTERRUPTED
    except ORDINARY_ERRORS as error:
        if verbose:
            traceback.print_exc()
        name = getattr(args, "command_name", f"persona-gym {args.command}")
        sys.stderr.write(f"{name}: error: {error_line(error)}\n")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
