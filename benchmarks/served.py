"""The vLLM-served rating backend beside the local engine, on the text-prompt simulator (issue 19).

Run in vLLM's environment (``make vllm-env``)::

    .venv-vllm/bin/python benchmarks/served.py                  # local, vLLM engine, vLLM server
    .venv-vllm/bin/python benchmarks/served.py --no-server --pairs-per-user 2
    .venv-vllm/bin/python benchmarks/served.py --artifacts DIR   # any text-prompt artifacts

The default artifacts are the text-prompt simulator shipped before the item-token one (commit
d64be79: persona-0..2, single-max, single-min; window 3, one memory, crowd cue, no collaborative
prior), rebuilt once into the persona-gym cache: today's ``persona-gym distill`` writes the tables
(the prompt tables hash to the value d64be79's manifest recorded, which the script checks), and
d64be79's adapters, persona cards and manifest are copied in and re-hashed. ``--personas 8``
(the default) deals its 200 users over 8 persona adapters, the 3 trained ones copied into 8 LoRA
slots: the throughput shape of 8 personas.

Each user of ``--per-persona`` users per persona rates ``--pairs-per-user`` random unseen movies
after the last ``window_size`` interactions of their logged history (pass A, 224 by default),
then ``--warm-per-user`` other movies in the same state (pass B, warm: prefixes cached on both
sides). Every backend rates the same requests in float32; printed: the engines' start times, ratings/s of each pass, and per
served backend the largest absolute difference of any probability and the RMSE of the expected
rating against the local engine. ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TEXT_COMMIT = "d64be79"  # the last shipped text-prompt simulator
SHIPPED = "persona_gym/default_artifacts/ml100k"


def cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [
        line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")
    ]
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")),
        [],
    )
    extras = [f for f in ("avx512f", "amx_bf16") if f in flags]
    return f"{names[0] if names else platform.processor()} ({os.cpu_count()} cores; {', '.join(extras) or 'no AVX-512'})"


def text_simulator(root: Path) -> Path:
    """The d64be79 text-prompt simulator in ``root`` (built once; see the module docstring)."""
    import hashlib

    from persona_gym.artifacts import load_tables, rehash, tables_digest

    if (root / "manifest.json").exists():
        return root
    repo = Path(__file__).resolve().parents[1]
    tmp = Path(tempfile.mkdtemp(prefix="text-sim-"))
    try:
        archive = subprocess.run(
            ["git", "-C", str(repo), "archive", TEXT_COMMIT, SHIPPED],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        old = tmp / SHIPPED
        manifest = json.loads((old / "manifest.json").read_text())
        persona_gym = Path(sys.executable).parent / "persona-gym"
        subprocess.run(
            [
                str(persona_gym),
                "distill",
                "--dataset",
                "ml-100k",
                "--out",
                str(root),
                "--no-progress",
            ],
            check=True,
        )
        catalog, profiles, memories, _ = load_tables(root)
        digest = (
            hashlib.sha256()
        )  # the prompt tables as d64be79's manifest hashed them (no CF file then)
        for user in sorted(profiles):
            digest.update(f"{user}\t{profiles[user]}\n".encode())
        for row in memories[["user_id", "item_index", "rating", "timestamp", "text"]].itertuples(
            index=False
        ):
            digest.update("\t".join(map(str, row)).encode() + b"\n")
        for index in range(len(catalog)):
            digest.update(catalog.describe(index).encode() + b"\n")
        if digest.hexdigest() != manifest["tables_sha256"]:
            raise SystemExit(
                f"today's distiller writes other prompt tables than {TEXT_COMMIT}'s adapters "
                "were trained on; the comparison would still hold, the ratings not"
            )
        shutil.copytree(old / "adapters", root / "adapters")
        shutil.copy2(old / "personas.json", root / "personas.json")
        manifest["tables_sha256"] = tables_digest(root)
        manifest["materialised_from"] = (
            f"{TEXT_COMMIT} text-prompt simulator (benchmarks/served.py)"
        )
        (root / "manifest.json").write_text(json.dumps(manifest, indent=2))
        rehash(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def widen_personas(root: Path, n: int) -> Path:
    """A copy of ``root`` whose users are dealt round-robin over ``n`` persona adapters, the
    trained ``persona-k`` copied into the slots ``persona-(k + K·j)``: the throughput shape of
    ``n`` personas (``n`` distinct LoRA slots in every batch) from the trained ones. Built once."""
    from persona_gym.artifacts import rehash

    wide = root.with_name(f"{root.name}-{n}personas")
    if (wide / "manifest.json").exists():
        return wide
    tmp = wide.with_name(wide.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(root, tmp, ignore=shutil.ignore_patterns("adapters"))
    manifest = json.loads((root / "manifest.json").read_text())
    personas = json.loads((root / "personas.json").read_text())
    trained = int(personas["k"])
    users = sorted(int(u) for u in personas["assignment"])
    assignment = {str(u): i % n for i, u in enumerate(users)}
    adapters = {k: v for k, v in manifest["adapters"].items() if not k.startswith("persona-")}
    for k in range(n):
        shutil.copytree(
            root / "adapters" / f"persona-{k % trained}", tmp / "adapters" / f"persona-{k}"
        )
        adapters[f"persona-{k}"] = f"adapters/persona-{k}"
    for name in adapters:
        if not (tmp / adapters[name]).exists():
            shutil.copytree(root / manifest["adapters"][name], tmp / adapters[name])
    personas.update(
        k=n, assignment=assignment, sizes=[users[k::n].__len__() for k in range(n)], cards=[]
    )
    (tmp / "personas.json").write_text(json.dumps(personas))
    manifest.update(
        adapters=adapters,
        personas={str(k): users[k::n] for k in range(n)},
        materialised_from=f"{manifest.get('materialised_from', root.name)}; "
        f"{trained} trained persona adapters copied into {n} slots",
    )
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    rehash(tmp)
    tmp.rename(wide)
    return wide


def workload(simulator, per_persona: int, per_user: int, warm_per_user: int, seed: int):
    """``(users, items, windows)`` of pass A and pass B (module docstring)."""
    rng = np.random.default_rng(seed)
    by_persona: dict[int, list[int]] = {}
    for user in simulator.user_ids:
        by_persona.setdefault(simulator.persona(user), []).append(user)
    passes: list[tuple[list[int], list[int], list]] = [([], [], []), ([], [], [])]
    for persona in sorted(by_persona):
        for user in rng.choice(
            by_persona[persona], size=min(per_persona, len(by_persona[persona])), replace=False
        ):
            history = simulator.history(int(user))
            seen = {x.item_index for x in history}
            unseen = np.setdiff1d(np.arange(len(simulator.catalog)), list(seen))
            items = rng.choice(unseen, size=per_user + warm_per_user, replace=False)
            window = history[-simulator.window_size :] if simulator.window_size else ()
            for index, item in enumerate(items):
                users, chosen, windows = passes[int(index >= per_user)]
                users.append(int(user))
                chosen.append(int(item))
                windows.append(window)
    return passes


def timed_passes(simulator, passes) -> tuple[list[np.ndarray], list[float]]:
    probs, seconds = [], []
    for users, items, windows in passes:
        start = time.perf_counter()
        probs.append(simulator.rate(users, items, windows))
        seconds.append(time.perf_counter() - start)
    return probs, seconds


def compare(local: list[np.ndarray], served: list[np.ndarray]) -> dict:
    from persona_gym.ratings import expected

    a, b = np.concatenate(local), np.concatenate(served)
    gap = expected(b) - expected(a)
    return {
        "pairs": len(a),
        "max_abs_prob_diff": float(np.abs(a - b).max()),
        "rmse_expected_rating": float(np.sqrt(np.mean(gap**2))),
        "max_abs_expected_diff": float(np.abs(gap).max()),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(simulator, port: int, log_path: Path, timeout_s: float):
    """``vllm serve`` on 127.0.0.1 with the simulator's adapters; returns (process, seconds to ready)."""
    from persona_gym.assets import resolve_model
    from persona_gym.simulator.adapter_names import variant_adapters
    from persona_gym.simulator.served import start_vllm_server, vllm_serve_command

    adapters = variant_adapters(simulator.variant, simulator.artifacts.adapter_dirs)
    command = vllm_serve_command(
        resolve_model(), adapters, simulator.prompt.max_tokens + 1, port=port, python=sys.executable
    )
    start = time.perf_counter()
    process = start_vllm_server(command, port, log_path, timeout_s)
    return process, time.perf_counter() - start


def main() -> None:
    from persona_gym.assets import cache_dir
    from persona_gym.simulator.served import VLLMSettings, load_served, stop_vllm_server
    from persona_gym.simulator.simulator import UserSimulator

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=None,
        help="text-prompt artifacts (default: the d64be79 simulator, built into the cache)",
    )
    parser.add_argument("--per-persona", type=int, default=7, help="users per persona (default 7)")
    parser.add_argument(
        "--pairs-per-user", type=int, default=4, help="movies per user in pass A (default 4)"
    )
    parser.add_argument(
        "--warm-per-user", type=int, default=1, help="movies per user in pass B (default 1)"
    )
    parser.add_argument(
        "--personas",
        type=int,
        default=8,
        help="persona adapters the users are dealt over (the trained ones copied into "
        "that many LoRA slots; 0 = as trained; default 8)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-server", action="store_true", help="skip the OpenAI-compatible server"
    )
    parser.add_argument(
        "--server-timeout", type=float, default=900.0, help="seconds for vllm serve to start"
    )
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    root = args.artifacts or text_simulator(
        cache_dir() / "artifacts" / f"ml100k-text-{TEXT_COMMIT}"
    )
    if args.personas:
        root = widen_personas(root, args.personas)
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "cpu": cpu_model(),
        "artifacts": str(root),
        "load_average_before": os.getloadavg()[0],
    }
    start = time.perf_counter()
    local = UserSimulator.load(root, dtype="float32")
    results["local_start_s"] = time.perf_counter() - start
    # vLLM aborts an engine step slower than this (300 s by default): a shared 2-core CPU needs more
    os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
    # vLLM-CPU keeps one core for its front end by default (1 of 2 here): give its engine every
    # core, as the local engine has
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    passes = workload(local, args.per_persona, args.pairs_per_user, args.warm_per_user, args.seed)
    adapters = sorted({local.adapter_of(u) for u in passes[0][0]})
    results.update(adapters=adapters, ratings_per_pass=[len(p[0]) for p in passes])
    probs, seconds = timed_passes(local, passes)
    results["local"] = {
        "seconds": seconds,
        "ratings_per_s": [len(p[0]) / s for p, s in zip(passes, seconds, strict=True)],
    }

    start = time.perf_counter()
    engine = load_served(root, backend="vllm", dtype="float32")
    results["vllm_start_s"] = time.perf_counter() - start
    served, seconds = timed_passes(engine, passes)
    results["vllm"] = {
        "seconds": seconds,
        "ratings_per_s": [len(p[0]) / s for p, s in zip(passes, seconds, strict=True)],
        **compare(probs, served),
    }
    engine.model.client.close()
    del engine

    if not args.no_server:
        log_path = Path(tempfile.gettempdir()) / "persona-gym-vllm-serve.log"
        port = free_port()
        process, ready = start_server(local, port, log_path, args.server_timeout)
        try:
            results["server_start_s"] = ready
            settings = VLLMSettings(url=f"http://127.0.0.1:{port}/v1")
            client = load_served(root, backend="vllm-server", settings=settings)
            served, seconds = timed_passes(client, passes)
            results["vllm_server"] = {
                "seconds": seconds,
                "ratings_per_s": [len(p[0]) / s for p, s in zip(passes, seconds, strict=True)],
                **compare(probs, served),
            }
        finally:
            stop_vllm_server(process)

    results["load_average_after"] = os.getloadavg()[
        0
    ]  # other jobs on the machine slow every figure
    print(f"\n{results['date']}, {results['cpu']}; {root}")
    print(
        f"load average {results['load_average_before']:.1f} before, {results['load_average_after']:.1f} after"
    )
    print(f"{results['ratings_per_pass']} ratings in passes A, B over adapters {adapters}, float32")
    print(
        f"start: local {results['local_start_s']:.0f} s, vLLM engine {results['vllm_start_s']:.0f} s"
        + (f", vllm serve {results['server_start_s']:.0f} s" if "server_start_s" in results else "")
    )
    print(f"{'backend':<14}{'A ratings/s':>12}{'B ratings/s':>12}{'max |dp|':>11}{'RMSE E[r]':>11}")
    for name in ("local", "vllm", "vllm_server"):
        if name in results:
            row = results[name]
            diff = (
                f"{row['max_abs_prob_diff']:>11.2e}{row['rmse_expected_rating']:>11.2e}"
                if "max_abs_prob_diff" in row
                else ""
            )
            print(
                f"{name:<14}{row['ratings_per_s'][0]:>12.2f}{row['ratings_per_s'][1]:>12.2f}{diff}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":  # vLLM's engine starts worker processes
    main()
