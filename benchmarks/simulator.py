"""Benchmark of the rating engine: ratings/s, tokens per rating and achieved GFLOP/s per mode.

Modes, from the paper's way to ours (each on the same synthetic workload of ``--users`` users
spread over ``--personas`` random LoRA adapters, a ``--prefix``-token profile prefix and a
``--block``-token candidate block per rating):

    generate     paper-style: generate 4 tokens per request (temperature 0.3), one at a time
    forward      one full forward per request (whole prompt, full-vocabulary head)
    batched      padded batches, adapters mixed in a batch via peft ``adapter_names``
    grouped      batches grouped by persona, one ``set_adapter`` per group, rating head only
    prefix-cache grouped + the user's prefix keys/values cached: a rating pays its block only
    base         prefix-cache with the adapters disabled: the base model's bound for this
                 workload (``prefix-cache`` / ``base`` is the share of it kept with 8 personas)
    compact      prefix-cache with item tokens (``PromptConfig.item_tokens``): a block of
                 ``--compact-state`` state tokens (3 soft item tokens: the window) and
                 ``--compact-candidate`` candidate tokens (2: memory and movie), each persona's
                 random item projection injected at the first of the top 4 layers
    ranking      compact with ``--candidates`` candidates per state (a ranking policy's or an
                 evaluator's call): the state tokens are shared (``engine.share_rows``), a rating
                 pays its candidate tokens and a share of the state
    ranking-base ranking with the adapters disabled: its base-model bound

It also measures the machine's matmul peak, with ``--train`` LoRA training tokens/s, and with
``--env ARTIFACTS [...]`` the environment itself (real model and data: the shipped ``ml-100k``
or an artifacts directory): env steps/s of one ``PersonaML100K-v0`` and of ``make_vec`` with
16 and 64 sub-environments, random allowed actions, and the model tokens per env step, and the
simulator ranking 20 candidates in each of 8 user states in one call. Weights are random (speed does not depend on their values), so it runs where no model
files exist: ``--shape smollm2`` (135M) or ``--shape qwen2.5-0.5b``.

    python benchmarks/simulator.py                       # CPU, float32, SmolLM2 shape
    python benchmarks/simulator.py --device cuda --dtype bfloat16 --shape qwen2.5-0.5b --rank 256 \
        --batch-size 512 --users 512 --ratings 4096

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from persona_gym.assets import cpu_has_fast_bf16

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark module
from env_throughput import env_throughput, ranking_throughput  # noqa: E402

from persona_gym.simulator.engine import (
    ItemTokens,
    LayeredLM,
    encode_prefixes,
    pack,
    score_blocks,
    share_rows,
)

SHAPES = {
    # SmolLM2-135M-Instruct: LlamaForCausalLM
    "smollm2": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    # Qwen2.5-0.5B-Instruct
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    # for the test that runs every mode
    "tiny": dict(
        model_type="llama",
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
}
RATING_IDS = [33, 34, 35, 36, 37]
MODES = (
    "generate",
    "forward",
    "batched",
    "grouped",
    "prefix-cache",
    "base",
    "compact",
    "ranking",
    "ranking-base",
)
BASE_OF = {
    "prefix-cache": "base",
    "ranking": "ranking-base",
}  # a mode and its bound without adapters
PER_REQUEST = ("generate", "forward")


def build_model(shape: str, personas: int, rank: int, device: str, dtype: torch.dtype):
    """Random model of the shape with ``personas`` random LoRA adapters (q,k,v,o)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(SHAPES[shape])
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
    )
    model = get_peft_model(model, lora, adapter_name="persona-0")
    for p in range(1, personas):
        model.add_adapter(f"persona-{p}", lora)
    return model.to(device=device, dtype=dtype).eval()


def non_embedding_params(model) -> int:
    base = model.get_base_model()
    return sum(p.numel() for n, p in base.named_parameters() if "embed_tokens" not in n)


def matmul_peak(device: str, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """GFLOP/s of a square matmul (the machine's practical peak)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def workload(users: int, personas: int, prefix: int, block: int, ratings: int, seed: int = 0):
    """Synthetic requests: (user, persona, prefix ids, block ids) with user-specific prefixes."""
    rng = np.random.default_rng(seed)
    prefixes = [rng.integers(100, 40000, prefix).tolist() for _ in range(users)]
    out = []
    for n in range(ratings):
        user = n % users
        out.append(
            (
                user,
                f"persona-{user % personas}",
                prefixes[user],
                rng.integers(100, 40000, block).tolist(),
            )
        )
    return out


def run_generate(model, requests, device):
    for _, adapter, prefix, block in requests:
        model.set_adapter(adapter)
        ids = torch.tensor([prefix + block], device=device)
        model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=True,
            temperature=0.3,
            top_p=0.9,
            max_new_tokens=4,
            min_new_tokens=4,
            pad_token_id=0,
        )
    return sum(len(p) + len(b) + 4 for _, _, p, b in requests)


@torch.inference_mode()
def run_forward(model, requests, device):
    for _, adapter, prefix, block in requests:
        model.set_adapter(adapter)
        logits = model(torch.tensor([prefix + block], device=device)).logits
        logits[0, -1, RATING_IDS].softmax(-1)
    return sum(len(p) + len(b) for _, _, p, b in requests)


@torch.inference_mode()
def run_batched(model, requests, device, batch_size):
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        width = max(len(p) + len(b) for _, _, p, b in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, (_, _, p, b) in enumerate(chunk):  # left padding: the last token is the rating slot
            seq = p + b
            ids[r, width - len(seq) :] = torch.tensor(seq)
            mask[r, width - len(seq) :] = 1
        logits = model(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            logits_to_keep=1,
            adapter_names=[a for _, a, _, _ in chunk],
        ).logits
        logits[:, -1, RATING_IDS].softmax(-1)
    return sum(len(p) + len(b) for _, _, p, b in requests)


def by_persona(requests):
    groups: dict[str, list] = {}
    for request in requests:
        groups.setdefault(request[1], []).append(request)
    return groups


@torch.inference_mode()
def run_grouped(model, layered, requests, device, batch_size):
    for adapter, group in by_persona(requests).items():
        model.set_adapter(adapter)
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            packed = pack([(p, [b]) for _, _, p, b in chunk], 0, device)
            layered.forward(packed).softmax(-1)
    return sum(len(p) + len(b) for _, _, p, b in requests)


@torch.inference_mode()
def run_prefix_cache(model, layered, requests, device, batch_size, cache):
    """Steady state of an environment: prefixes are already cached (``cache`` warmed)."""
    for adapter, group in by_persona(requests).items():
        model.set_adapter(adapter)
        for start in range(0, len(group), batch_size):
            chunk = group[start : start + batch_size]
            kv = [cache[(adapter, u)] for u, _, _, _ in chunk]
            score_blocks(layered, kv, [([], [b]) for _, _, _, b in chunk], 0, device).softmax(-1)
    return sum(len(b) for _, _, _, b in requests)


@torch.inference_mode()
def warm_cache(model, layered, requests, device):
    cache = {}
    for adapter, group in by_persona(requests).items():
        model.set_adapter(adapter)
        users = sorted({u for u, _, _, _ in group})
        prefixes = {u: p for u, _, p, _ in group}
        for user, kv in zip(
            users, encode_prefixes(layered, [prefixes[u] for u in users], 0, device), strict=True
        ):
            cache[(adapter, user)] = kv
    return cache


def compact_blocks(rng, state: int, candidate: int, n: int) -> tuple[list[int], list[list[int]]]:
    """One state of an item-token prompt and ``n`` candidate parts: the state (chat turn and
    window) holds 3 item ids, each candidate part 2 (its memory and its movie)."""

    def tokens(length, n_items):
        ids = rng.integers(100, 40000, length).tolist()
        for slot in np.linspace(0, length - 8, n_items).astype(int):  # the average stays text
            ids[slot] = -int(rng.integers(1, 1683))
        return ids

    return tokens(state, 3), [tokens(candidate, 2) for _ in range(n)]


def compact_workload(requests, state: int, candidate: int, n_candidates: int, seed: int = 1):
    """The same users and prefixes with item-token blocks, ``n_candidates`` per state."""
    rng = np.random.default_rng(seed)
    out = []
    for user, adapter, prefix, _ in requests:
        shared, parts = compact_blocks(rng, state, candidate, n_candidates)
        out.append((user, adapter, prefix, [shared + part for part in parts]))
    return out


def item_projections(
    model, personas: int, device: str, dtype: torch.dtype
) -> dict[str, ItemTokens]:
    """One random item projection per persona (ML-100k's 1,682 items, 384-d embeddings)."""
    torch.manual_seed(1)
    embeddings = torch.randn(1682, 384)
    layers = model.get_base_model().config.num_hidden_layers
    out = {}
    for p in range(personas):
        items = ItemTokens(embeddings, model.get_base_model().config.hidden_size, layers - 4)
        torch.nn.init.normal_(items.proj.weight, std=0.02)
        out[f"persona-{p}"] = items.to(device=device, dtype=dtype).eval()
    return out


@torch.inference_mode()
def run_compact(model, layered, states, device, batch_size, cache, items):
    """Item-token blocks after cached prefixes; the blocks of one state go through
    ``share_rows`` as in ``RatingModel.score`` (with one candidate per state: one block a row)."""
    tokens = 0
    for adapter, group in by_persona(states).items():
        model.set_adapter(adapter)
        layered.items = items[adapter]
        rows = [
            (u, row)
            for u, _, _, blocks in group
            for row in share_rows(blocks, list(range(len(blocks))))
        ]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            kv = [cache[(adapter, u)] for u, _ in chunk]
            score_blocks(layered, kv, [row.segments() for _, row in chunk], 0, device).softmax(-1)
            tokens += sum(row.width for _, row in chunk)
    layered.items = None
    return tokens


def run_train(model, layered, requests, device, batch_size, steps=5):
    model.set_adapter("persona-0")
    model.train()
    params = [p for n, p in model.named_parameters() if "persona-0" in n]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    tokens = 0
    for step in range(steps + 1):
        chunk = requests[:batch_size]
        packed = pack([(p, [b]) for _, _, p, b in chunk], 0, device)
        if step == 1:  # the first step warms up
            sync(device)
            start, tokens = time.perf_counter(), 0
        loss = torch.nn.functional.cross_entropy(
            layered.forward(packed), torch.zeros(len(chunk), dtype=torch.long, device=device)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        tokens += packed.n_tokens
    sync(device)
    model.eval()
    return tokens / (time.perf_counter() - start)


def timed(fn, device, ratings):
    sync(device)
    start = time.perf_counter()
    tokens = fn()
    sync(device)
    seconds = time.perf_counter() - start
    return {
        "ratings_per_s": ratings / seconds,
        "tokens_per_rating": tokens / ratings,
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    parser.add_argument("--personas", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--users", type=int, default=64)
    parser.add_argument("--prefix", type=int, default=150, help="profile prefix tokens")
    parser.add_argument("--block", type=int, default=125, help="candidate block tokens")
    parser.add_argument("--ratings", type=int, default=64, help="ratings per exact mode")
    parser.add_argument(
        "--per-request-ratings",
        type=int,
        default=8,
        help="ratings for the one-request-at-a-time modes (generate, forward)",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--compact-state",
        type=int,
        default=20,
        help="item-token block: state tokens (chat turn + window of 3 movies; 20 with SmolLM2)",
    )
    parser.add_argument(
        "--compact-candidate",
        type=int,
        default=14,
        help="item-token block: candidate tokens (memory, movie, average, cue; 14 with SmolLM2)",
    )
    parser.add_argument(
        "--candidates",
        type=int,
        default=20,
        help="candidates ranked per state in the ranking mode (SimulatorGreedyPolicy's 20)",
    )
    parser.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--env",
        nargs="*",
        default=[],
        metavar="ARTIFACTS",
        help="also env steps/s on these artifacts (ml-100k = shipped; needs the data)",
    )
    parser.add_argument("--env-steps", type=int, default=128, help="env steps per vector size")
    parser.add_argument("--train", action="store_true", help="also measure LoRA training tokens/s")
    parser.add_argument(
        "--train-batch-size", type=int, default=16, help="sequences per training step"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoder layers (engine modes, env)",
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    device = args.device

    model = build_model(args.shape, args.personas, args.rank, device, dtype)
    layered = LayeredLM(model, RATING_IDS, compile=args.compile)
    flops_per_token = 2 * non_embedding_params(model)
    peak = matmul_peak(device, dtype, 8192 if device.startswith("cuda") else 2048)
    requests = workload(args.users, args.personas, args.prefix, args.block, args.ratings)
    results = {}
    runners = {
        "generate": lambda: run_generate(model, requests[: args.per_request_ratings], device),
        "forward": lambda: run_forward(model, requests[: args.per_request_ratings], device),
        "batched": lambda: run_batched(model, requests, device, args.batch_size),
        "grouped": lambda: run_grouped(model, layered, requests, device, args.batch_size),
    }
    if {"prefix-cache", "base", "compact", "ranking", "ranking-base"} & set(args.modes):
        cache = warm_cache(model, layered, requests, device)
        compact = compact_workload(requests, args.compact_state, args.compact_candidate, 1)
        ranking = compact_workload(
            requests, args.compact_state, args.compact_candidate, args.candidates
        )
        items = item_projections(model, args.personas, device, dtype)
        runners["compact"] = lambda: run_compact(
            model, layered, compact, device, args.batch_size, cache, items
        )
        runners["ranking"] = lambda: run_compact(
            model, layered, ranking, device, args.batch_size, cache, items
        )
        runners["prefix-cache"] = lambda: run_prefix_cache(
            model, layered, requests, device, args.batch_size, cache
        )

        def without_adapters(runner):
            def run():
                with model.disable_adapter():
                    return runner()

            return run

        for mode, base in BASE_OF.items():
            runners[base] = without_adapters(runners[mode])
    for mode in args.modes:
        runner = runners[mode]
        n = args.per_request_ratings if mode in PER_REQUEST else args.ratings
        n *= args.candidates if mode.startswith("ranking") else 1
        if mode != "generate":
            runner()  # warm-up (kernels, allocator)
        results[mode] = timed(runner, device, n)
        results[mode]["gflops"] = results[mode]["tokens_per_s"] * flops_per_token / 1e9
        results[mode]["fraction_of_peak"] = results[mode]["gflops"] / peak
        print(f"  {mode}: {results[mode]['ratings_per_s']:.1f} ratings/s", flush=True)
    for mode, base in BASE_OF.items():
        if mode in results and base in results:
            results[mode]["fraction_of_base"] = (
                results[mode]["ratings_per_s"] / results[base]["ratings_per_s"]
            )
    if args.train:
        results["train_tokens_per_s"] = run_train(
            model, layered, requests, device, args.train_batch_size
        )
    env_results = {
        name: env_throughput(name, args.dtype, args.compile, args.env_steps) for name in args.env
    }
    for sizes in env_results.values():
        for r in sizes.values():  # share of the FLOP bound of the tokens an env step pays for
            flops = r["env_steps_per_s"] * r["tokens_per_env_step"] * flops_per_token
            r["fraction_of_flop_bound"] = flops / (peak * 1e9)
    prior_env = (
        env_throughput(args.env[-1], args.dtype, False, 64 * 50, rater="prior", sizes=(64,))
        if args.env
        else {}
    )
    ranking_results = {
        name: ranking_throughput(name, args.dtype, args.compile) for name in args.env
    }
    report = {
        "date": date.today().isoformat(),
        "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"cpu x{torch.get_num_threads()}",
        "cpu": cpu_model(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        # file arguments by name only: no paths of the machine in committed results
        "args": {k: v.name if isinstance(v, Path) else str(v) for k, v in vars(args).items()},
        "matmul_peak_gflops": peak,
        "flops_per_token": flops_per_token,
        "modes": results,
        "env": env_results,
        "simulator_ranking": ranking_results,
        "prior_env": prior_env,
    }
    print(f"cpu: {report['cpu']} (hardware bf16: {'yes' if report['cpu_fast_bf16'] else 'no'})")
    print(
        f"device: {report['device']}  dtype: {args.dtype}  shape: {args.shape}  personas: {args.personas}"
        f"  rank: {args.rank}  matmul peak: {peak:.0f} GFLOP/s"
    )
    print(
        f"{'mode':<14}{'ratings/s':>12}{'tokens/rating':>15}{'GFLOP/s':>10}{'% peak':>8}{'x generate':>12}"
    )
    base = results.get("generate", {}).get("ratings_per_s")
    for mode in args.modes:
        r = results[mode]
        speedup = f"{r['ratings_per_s'] / base:.1f}" if base else "-"
        print(
            f"{mode:<14}{r['ratings_per_s']:>12.1f}{r['tokens_per_rating']:>15.0f}{r['gflops']:>10.1f}"
            f"{100 * r['fraction_of_peak']:>7.0f}%{speedup:>12}"
        )
    for mode in BASE_OF:
        if "fraction_of_base" in results.get(mode, {}):
            print(
                f"{mode} with {args.personas} personas keeps "
                f"{100 * results[mode]['fraction_of_base']:.0f}% of the base model's rate"
            )
    if args.train:
        print(f"training: {results['train_tokens_per_s']:.0f} tokens/s")
    for name, sizes in env_results.items():
        for size, r in sizes.items():
            print(
                f"env {name} {size}: {r['env_steps_per_s']:.1f} env steps/s, "
                f"{r['tokens_per_env_step']:.1f} tokens per env step, "
                f"{100 * r['fraction_of_flop_bound']:.0f}% of the FLOP bound"
            )
    for size, r in prior_env.items():
        print(f"env rater='prior' {size}: {r['env_steps_per_s']:.0f} env steps/s")
    for name, r in ranking_results.items():
        print(
            f"simulator {name}, {r['candidates_per_state']} candidates per state: "
            f"{r['ratings_per_s']:.1f} ratings/s, "
            f"{r['tokens_per_rating']:.1f} tokens per rating"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
