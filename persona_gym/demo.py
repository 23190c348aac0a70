"""``persona-gym demo``: the main job on the embedded default (ML-100k, SmolLM2-135M).

For now it loads the bundled MovieLens-100k and prints its summary and the paper's protocol
split; later stages extend it to the full simulation.
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the main job on the embedded default (offline)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the protocol split")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from persona_gym.data import load_dataset, protocol_split

    dataset = load_dataset("ml-100k")
    print(json.dumps(dataset.summary(), indent=2, default=str))
    split = protocol_split(dataset, seed=args.seed)
    print(json.dumps(split.summary(), indent=2, default=str))
    return 0
