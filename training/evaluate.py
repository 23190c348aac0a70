"""``persona-gym evaluate``: the paper's Table 1 on our stack, CF baselines beside it, fidelity.

``persona-gym evaluate --artifacts DIR`` rebuilds the protocol split from ``DIR/split.json``
(``load_dataset`` + ``protocol_split`` with the recorded parameters; the user ids must match),
takes each simulated user's TEST interactions and scores them under every configuration of the
paper's Table 1 that our stack has:

====  ===================  =======================  ==================================
No.   adapter              memories                 spec
====  ===================  =======================  ==================================
3     none (vanilla)       Ms                       ``base:Ms``
4     none (vanilla)       Ms + Ml                  ``base:Ms+Ml``
(2)   none (vanilla)       Ml                       ``base:Ml`` (paper: LLaMA-3 only)
5/6   θsingle (max/min)    Ms                       ``single-max:Ms`` / ``single-min:Ms``
7/8   θsingle (max/min)    Ms + Ml                  ``single-max:Ms+Ml`` / ``single-min:Ms+Ml``
9     θpersona             Ms                       ``persona:Ms``
10    θpersona             Ms + Ml                  ``persona:Ms+Ml``
====  ===================  =======================  ==================================

plus our additions: ``persona:Ms+Ml:w0`` (short-term window off) and ``persona:Ms+Ml:k2`` /
``:k3`` (retrieval k). A spec is ``VARIANT:MEMORIES[:wN][:kN]``; ``Ms`` = the profile,
``Ml`` = retrieved memories (k = the training prompt's ``n_memories``, or 1), ``wN`` = window
size (default: the training prompt's).

Protocol details:

* **No test rating is ever an input.** The short-term window of every test interaction is the
  last ``k`` TRAINING interactions of the user (the artifacts' memories, i.e. the logged
  history), the retrieved ``Ml`` memories are training memories, and the catalogue's item
  averages come from training data only. Consequently all test items of a user share one
  window (the paper's setting: the agent rates the held-out future from its past).
* ``--max-test-per-user N`` evaluates the first N test interactions of each user in time
  order (``--subsample random``: N drawn with ``--seed``, then re-sorted by time).
* The adapters were trained with ONE prompt config (the manifest's ``prompt``). A configuration
  whose prompt differs (e.g. ``persona:Ms`` on adapters trained with Ms + Ml) is evaluated
  as-is and labelled "(prompt differs from training)"; the paper trained separate adapters per
  memory setting, so such rows are not like-for-like with the paper's.
* Prediction rules: the expected rating of the 5-way distribution (headline; URR = 0 by
  construction), its argmax, and with ``--generation`` the paper's generation mode (4 sampled
  tokens at temperature 0.3, the first number rounded and kept if in 1..5 — with the crowd cue
  the model answers like " 3.6"; slow: on the first ``--generation-per-user`` evaluated
  interactions of each user). Generation RMSE/MAE are over the parsed answers; URR is the share
  without a rating.
* Baselines (``persona_gym.evaluation.baselines``) are fitted on train + background, tuned on
  a validation slice of train, and scored on exactly the rows the simulator was scored on (and
  on the full test set).

Outputs, written atomically into ``DIR/evaluation/`` (``--out`` to change): ``report.md``
(paper layout, our numbers beside the paper's, baselines beneath, fidelity table),
``results.json`` (every figure), ``predictions.parquet`` (one row per evaluated interaction,
the expected rating of each configuration and each baseline's prediction), and the plots
``histograms.png``, ``calibration.png``, ``persona_rmse.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from persona_gym.config_cli import plain
from persona_gym.data.protocol import USER_GROUPS, EvalData, logged_data
from persona_gym.evaluation.configs import (
    DEFAULT_CONFIGS,
    EXTRA_CONFIGS,
    PAPER_TABLE,
    TABLE_CONFIGS,
    EvalConfig,
    parse_config,
    select_test,
)
from persona_gym.evaluation.metrics import fidelity_report, mae, ndcg_random, rmse, urr
from persona_gym.evaluation.report import render_markdown, write_report
from persona_gym.evaluation.studies import first_3, prior_alone, simulator_studies
from persona_gym.ratings import expected
from persona_gym.simulator.memory import logged_history
from persona_gym.simulator.rater import check_distribution

if TYPE_CHECKING:
    from persona_gym.simulator.engine import LayeredLM
    from persona_gym.simulator.sequence import SequenceRatingModel

log = logging.getLogger(__name__)


__all__ = [
    "DEFAULT_CONFIGS",
    "EXTRA_CONFIGS",
    "PAPER_TABLE",
    "TABLE_CONFIGS",
    "EvalConfig",
    "EvalData",
    "FidelityEvalConfig",
    "add_parser",
    "evaluate",
    "parse_config",
    "select_test",
    "write_report",
]


def _check_no_leakage(test: pd.DataFrame, memories: pd.DataFrame) -> None:
    seen = set(zip(memories["user_id"], memories["item_index"], strict=True))
    leaked = [
        (u, i) for u, i in zip(test["user_id"], test["item_index"], strict=True) if (u, i) in seen
    ]
    if leaked:
        raise ValueError(
            f"{len(leaked)} test interactions (e.g. user {leaked[0][0]}, item index "
            f"{leaked[0][1]}) are also in the training memories: test would leak into prompts"
        )


class SharedModels:
    """One base model with every adapter of the artifacts, shared by all configurations."""

    def __init__(
        self, artifacts, base_model: str | None, device: str, dtype: str, compile: bool = False
    ):
        from persona_gym.simulator.adapters import load_item_tokens
        from persona_gym.simulator.simulator import load_model

        self.model, self.tokenizer = load_model(
            artifacts, artifacts.adapter_dirs, base_model, device, dtype
        )
        self.item_tokens = None
        if artifacts.prompt_config.item_tokens:
            self.item_tokens = load_item_tokens(
                artifacts.adapter_dirs,
                artifacts.item_token_features(artifacts.prompt_config),
                device,
            )
        self.priors = None
        if artifacts.prompt_config.cf_prior:
            from persona_gym.simulator.rating_prior import load_rating_priors

            self.priors = load_rating_priors(artifacts.adapter_dirs)
        self.artifacts = artifacts
        self.adapters = set(artifacts.adapter_dirs)
        self.compile = compile
        # one LayeredLM (and its compiled kernels) for every configuration
        self._layered: LayeredLM | None = None
        # one sequence engine (and its prefix cache) for every configuration
        self._sequence: SequenceRatingModel | None = None

    def simulator(self, config: EvalConfig, prompt):
        from persona_gym.simulator.engine import LayeredLM
        from persona_gym.simulator.prompts import PromptBuilder
        from persona_gym.simulator.rating_model import RatingModel
        from persona_gym.simulator.simulator import UserSimulator

        builder = PromptBuilder(self.tokenizer, self.artifacts.catalog, prompt)
        if prompt.layout == "sequence":  # the user is their rating sequence: no text configs
            from persona_gym.simulator.sequence import SequenceRatingModel

            if self._sequence is None:
                self._sequence = SequenceRatingModel.load(
                    self.model, self.tokenizer, builder, self.artifacts, self.artifacts.adapter_dirs
                )
            return UserSimulator(self.artifacts, self._sequence, config.variant)
        if self._layered is None:
            self._layered = LayeredLM(
                self.model,
                builder.rating_token_ids,
                compile=self.compile,
                placeholder_id=builder.item_placeholder_id,
            )
        rating_model = RatingModel(
            self.model,
            builder,
            layered=self._layered,
            item_tokens=self.item_tokens,
            priors=self.priors,
        )
        return UserSimulator(self.artifacts, rating_model, config.variant)

    def missing(self, config: EvalConfig, users) -> list[str]:
        if config.variant == "base":
            # item tokens are learned with the adapters: the plain model has no projection
            return ["an item projection for the base model"] if self.item_tokens else []
        needed = {self.artifacts.adapter_of(int(u), config.variant) for u in users}
        return sorted(needed - self.adapters)


@dataclass(frozen=True)
class FidelityEvalConfig:
    """Settings of :func:`evaluate` (``persona-gym evaluate``'s options; the defaults are the
    command's). What is evaluated, on which rows, how the models run, and what else is computed;
    the data (``test``, ``train``, ``background``) and where the report goes are arguments of
    :func:`evaluate`, not settings.

    Attributes:
        configs: the configurations, as specs ``VARIANT:MEMORIES[:wN][:kN]`` or
            :class:`EvalConfig` (``None``: :data:`DEFAULT_CONFIGS`). Configurations whose
            adapters the artifacts lack are reported as skipped.
        max_test_per_user: evaluate only N test interactions per user (``None``: all).
        seed: the seed of the subsample, the user sample, generation and the baselines' MF.
        subsample: which N: ``"first"`` in time order, or ``"random"`` (drawn with ``seed``,
            kept in time order).
        generation: also the paper's generation mode (slow) on the first
            ``generation_per_user`` evaluated interactions of each user.
        generation_per_user: see ``generation``.
        baselines: fit and score the collaborative-filtering baselines.
        base_model: the base model (``None``: the one the adapters were trained on).
        device: torch device of the models.
        dtype: ``"auto"`` (bfloat16 where the hardware has it, else float32), ``"float32"`` or
            ``"bfloat16"``.
        compile: run the decoder layers through ``torch.compile`` (faster on CPU after a
            one-off warm-up; same results).
        chunk_users: users rated per simulator call.
        studies: also run the persona-specificity, memory-slope and reward-landscape studies of
            the persona simulator (:mod:`persona_gym.evaluation.fidelity`) on the first
            ``study_rows_per_user`` test interactions of each user (needs ``split.json``).
        study_rows_per_user: see ``studies``.
        users: whose held-out interactions (when :func:`evaluate` gets no ``test``):
            ``"training"``, the users the adapters were trained on, or ``"others"``, the other
            simulated users of an ``--all-users`` distillation, whom the adapters never saw.
        max_users: evaluate a seeded sample (``seed``) of this many of the test users.
    """

    configs: Sequence[str | EvalConfig] | None = None
    max_test_per_user: int | None = None
    seed: int = 0
    subsample: str = "first"
    generation: bool = False
    generation_per_user: int = 2
    baselines: bool = True
    base_model: str | None = None
    device: str = "cpu"
    dtype: str = "auto"
    compile: bool = False
    chunk_users: int = 16
    studies: bool = True
    study_rows_per_user: int = 15
    users: str = "training"
    max_users: int | None = None


def evaluate(
    artifacts_dir: str | Path,
    config: FidelityEvalConfig | Sequence[str | EvalConfig] | None = None,
    *,
    test: pd.DataFrame | None = None,
    train: pd.DataFrame | None = None,
    background: pd.DataFrame | None = None,
    out_dir: str | Path | None = None,
    write: bool = True,
    **settings: Any,
) -> dict:
    """Evaluate the simulated users of ``artifacts_dir``; return (and write) every figure.

    Args:
        config: the settings (default ``FidelityEvalConfig()``); a list of specs is short for
            ``FidelityEvalConfig(configs=...)``.
        test: the test interactions (``user_id, item_id, item_index, rating, timestamp``);
            default: rebuilt from ``split.json`` (:func:`persona_gym.data.protocol.logged_data`).
        train, background: what the baselines fit on when ``test`` is given (default: the
            artifacts' memories, i.e. the logged training interactions; no background).
        out_dir: where the report goes (default ``<artifacts>/evaluation``).
        write: write the report into ``out_dir``.
        settings: fields of :class:`FidelityEvalConfig` replacing those of ``config``
            (``evaluate(dir, ["persona:Ms"], max_test_per_user=2)``).
    """
    from persona_gym.artifacts import load_artifacts
    from persona_gym.evaluation.baselines import run_baselines

    if not isinstance(config, FidelityEvalConfig):
        config = FidelityEvalConfig(configs=config)
    cfg = dataclasses.replace(config, **settings) if settings else config
    max_test_per_user, seed, subsample = cfg.max_test_per_user, cfg.seed, cfg.subsample
    generation, generation_per_user, chunk_users = (
        cfg.generation,
        cfg.generation_per_user,
        cfg.chunk_users,
    )
    users, max_users = cfg.users, cfg.max_users
    started = time.perf_counter()
    artifacts = load_artifacts(artifacts_dir)
    configs = [
        c if isinstance(c, EvalConfig) else parse_config(c)
        for c in (cfg.configs or DEFAULT_CONFIGS)
    ]
    if test is None:
        data = logged_data(artifacts, users)
    else:
        missing_cols = {"user_id", "item_id", "item_index", "rating", "timestamp"} - set(
            test.columns
        )
        if missing_cols:
            raise ValueError(f"test lacks columns {sorted(missing_cols)}")
        memories = artifacts.memories
        data = EvalData(
            test.copy(),
            train if train is not None else memories[["user_id", "item_id", "rating", "timestamp"]],
            background
            if background is not None
            else memories.iloc[:0][["user_id", "item_id", "rating", "timestamp"]],
            "given test interactions",
        )
    unknown = sorted(set(data.test["user_id"]) - set(artifacts.user_ids))
    if unknown:
        log.warning(
            "%d test users are not simulated users of %s; dropped", len(unknown), artifacts.root
        )
    full_test = data.test[data.test["user_id"].isin(artifacts.user_ids)]
    if max_users is not None:
        full_test = full_test[
            full_test["user_id"].isin(sample_users(full_test["user_id"], max_users, seed))
        ]
    full_test = select_test(full_test, None)
    rows = select_test(full_test, max_test_per_user, subsample, seed)
    if max_test_per_user == 1:
        log.warning(
            "max_test_per_user=1: one test row per user, so NDCG@10 is 1.0 for any order; "
            "the report leaves it out (use 2 or more to rank within users)"
        )
    if not len(rows):
        raise ValueError("no test interactions to evaluate")
    _check_no_leakage(rows, artifacts.memories)
    user_ids = rows["user_id"].to_numpy(np.int64)
    items = rows["item_index"].to_numpy(np.int64)
    real = rows["rating"].to_numpy(np.float64)
    gaps = rows["gap"].to_numpy(np.int64)  # test rows between the evaluator's window and each
    personas = np.array([artifacts.user_persona.get(int(u), -1) for u in user_ids])
    trained_prompt = artifacts.prompt_config
    log.info(
        "evaluating %d test interactions of %d users (%s) under %d configurations",
        len(rows),
        len(np.unique(user_ids)),
        data.source,
        len(configs),
    )

    results: dict = {
        "artifacts": str(artifacts_dir),  # as given: a shipped name stays a name, not a cache path
        "data": {
            "source": data.source,
            "n_users": int(len(np.unique(user_ids))),
            "n_test_total": int(len(full_test)),
            "n_evaluated": int(len(rows)),
            "max_test_per_user": max_test_per_user,
            "subsample": subsample,
            "seed": seed,
            "users": users,
            "max_users": max_users,
            "window_rule": "last k TRAINING interactions of the user (no test rating is an input)",
        },
        "base_model": Path(str(artifacts.manifest.get("base_model", {}).get("model", "?"))).name,
        "training_prompt": dataclasses.asdict(trained_prompt),
        "ndcg@10_random_order": ndcg_random(user_ids, real, 10, seed=seed),
        "configs": [],
        "baselines": {},
        "paper": {str(k): v for k, v in PAPER_TABLE.items()},
    }
    predictions = rows[["user_id", "item_id", "item_index", "rating", "timestamp"]].copy()
    predictions["persona"] = personas

    models = (
        SharedModels(artifacts, cfg.base_model, cfg.device, cfg.dtype, cfg.compile)
        if configs
        else None
    )
    history_cache: dict[int, tuple] = {}
    generation_rows = (
        np.flatnonzero(rows.groupby("user_id").cumcount().to_numpy() < generation_per_user)
        if generation
        else None
    )
    for eval_config in configs:
        assert models is not None  # loaded above when there are configs
        prompt = eval_config.prompt(trained_prompt)
        entry: dict[str, Any] = {
            "spec": eval_config.spec,
            "paper_no": eval_config.paper_no,
            "adapter": eval_config.adapter_label,
            "memories": eval_config.memories_label,
            "variant": eval_config.variant,
            "prompt": dataclasses.asdict(prompt),
            "prompt_differs_from_training": eval_config.variant != "base"
            and prompt != trained_prompt,
        }
        missing = models.missing(eval_config, np.unique(user_ids))
        if missing:
            entry.update(status="skipped", reason=f"not in the artifacts: {missing}")
            log.warning("%s: skipped (%s)", eval_config.spec, entry["reason"])
            results["configs"].append(entry)
            continue
        simulator = models.simulator(eval_config, prompt)
        windows = []
        for u in user_ids:
            if int(u) not in history_cache:
                history_cache[int(u)] = simulator.history(int(u))
            windows.append(
                history_cache[int(u)][-prompt.window_size :] if prompt.window_size else ()
            )
        t0 = time.perf_counter()
        probs = np.zeros((len(rows), 5))
        unique_users = list(dict.fromkeys(user_ids.tolist()))
        for start in range(0, len(unique_users), chunk_users):
            mask = np.isin(user_ids, unique_users[start : start + chunk_users])
            index = np.flatnonzero(mask)
            probs[index] = check_distribution(
                simulator.rate(
                    user_ids[index].tolist(),
                    items[index].tolist(),
                    [windows[i] for i in index],
                    gaps[index].tolist(),
                ),
                simulator.source,
                n_rows=len(index),
            )
        seconds = time.perf_counter() - t0
        # fidelity_report takes any array-like `groups` (np.asarray); its hint says Sequence
        report = fidelity_report(user_ids, real, probs=probs, groups=personas)
        entry.update(
            status="ok",
            seconds=round(seconds, 2),
            ratings_per_s=round(len(rows) / max(seconds, 1e-9), 1),
            expected=report,
        )
        predictions[f"pred:{eval_config.spec}"] = expected(probs)
        entry["first_3"] = first_3(rows, expected(probs), real)
        for r in range(5):
            predictions[f"p{r + 1}:{eval_config.spec}"] = probs[:, r].astype(np.float32)
        if generation and prompt.item_tokens:
            log.info(
                "%s: no paper-style generation with item tokens (soft tokens are not text)",
                eval_config.spec,
            )
        elif generation_rows is not None:  # with --generation
            requests = [
                simulator.request(int(user_ids[i]), int(items[i]), windows[i])
                for i in generation_rows
            ]
            t0 = time.perf_counter()
            generated = simulator.model.generate(requests, seed=seed)
            g_real = real[generation_rows]
            entry["generation"] = {
                "n": int(len(generation_rows)),
                "rmse": rmse(generated.ratings, g_real),
                "mae": mae(generated.ratings, g_real),
                "urr": urr(generated.ratings),
                "seconds": round(time.perf_counter() - t0, 2),
                "examples": generated.texts[:5],
                # the expected-rating rule on the same rows, for a like-for-like comparison
                "expected_rule_rmse_same_rows": rmse(expected(probs[generation_rows]), g_real),
            }
        log.info(
            "%-22s RMSE %.4f MAE %.4f NLL %.3f (%.0f ratings/s)%s",
            eval_config.spec,
            report["rmse"],
            report["mae"],
            report["nll"],
            entry["ratings_per_s"],
            " [prompt differs from training]" if entry["prompt_differs_from_training"] else "",
        )
        results["configs"].append(entry)

    if cfg.baselines:
        evaluated = (
            full_test.merge(
                rows[["user_id", "item_id"]].assign(_in=True), on=["user_id", "item_id"], how="left"
            )["_in"]
            .fillna(False)
            .to_numpy(bool)
        )
        fitted = run_baselines(
            data.train, data.background, full_test, seed=seed, subsets={"evaluated_rows": evaluated}
        )
        keyed = full_test.assign(_row=np.arange(len(full_test))).set_index(["user_id", "item_id"])[
            "_row"
        ]
        take = keyed.loc[list(zip(rows["user_id"], rows["item_id"], strict=True))].to_numpy()
        for name, fit in fitted.items():
            pred = fit["predictions"][take]
            predictions[f"baseline:{name}"] = pred
            results["baselines"][name] = {
                "params": fit["params"],
                "val_rmse": fit["val_rmse"],
                "full_test": {"n": fit["n"], "rmse": fit["rmse"], "mae": fit["mae"]},
                "evaluated_rows": fidelity_report(
                    user_ids,
                    real,
                    pred=pred,
                    groups=personas,
                ),
                "first_3": first_3(rows, pred, real),
            }
    if models is not None and models.priors and artifacts.collaborative is not None:
        k = trained_prompt.window_size
        logged_windows = {
            int(u): logged_history(artifacts.memories, int(u))[-k:] if k else ()
            for u in np.unique(full_test["user_id"])
        }
        results["baselines"]["collaborative prior alone (no SLM)"] = prior_alone(
            models.priors, artifacts, rows, full_test, personas, logged_windows
        )
    persona = parse_config("persona:Ms+Ml")
    if cfg.studies and models is not None and not models.missing(persona, np.unique(user_ids)):
        t0 = time.perf_counter()
        results["studies"] = simulator_studies(
            models,
            artifacts,
            data,
            full_test,
            trained_prompt,
            seed,
            cfg.study_rows_per_user,
            chunk_users,
        )
        if trained_prompt.cf_prior:  # the prior-alone row needs the adapters' priors
            from persona_gym.evaluation.sequential_study import sequential_study

            log.info("studies: sequential fidelity (rolling window)")
            simulator = models.simulator(persona, trained_prompt)
            results["studies"]["sequential"] = sequential_study(
                simulator, data, k=trained_prompt.window_size or 3
            )
        results["studies"]["seconds"] = round(time.perf_counter() - t0, 1)
    results["seconds"] = round(time.perf_counter() - started, 1)
    if write:
        out = Path(out_dir) if out_dir is not None else Path(artifacts.root) / "evaluation"
        write_report(results, predictions, out)
        results["out_dir"] = str(out)
    return results


def sample_users(user_ids, n: int, seed: int) -> np.ndarray:
    """``n`` of the distinct ``user_ids`` drawn with ``seed`` (all of them when there are fewer)."""
    if n < 1:
        raise ValueError(f"max_users must be >= 1, got {n}")
    distinct = np.unique(np.asarray(user_ids, dtype=np.int64))
    if len(distinct) <= n:
        return distinct
    return np.sort(np.random.default_rng([seed, n]).choice(distinct, size=n, replace=False))


# -- CLI -----------------------------------------------------------------------------------------
def add_parser(subparsers) -> None:
    """Add ``persona-gym evaluate``."""
    p = subparsers.add_parser(
        "evaluate",
        help="RMSE/MAE/URR of the paper's Table 1, CF baselines and fidelity plots",
        description=plain(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--artifacts", required=True, type=Path, help="trained artifacts directory")
    p.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help=f"specs VARIANT:MEMORIES[:wN][:kN] (default: {' '.join(DEFAULT_CONFIGS)}); "
        "'table' = the Table 1 rows only",
    )
    p.add_argument(
        "--max-test-per-user",
        type=int,
        default=None,
        help="evaluate only N test interactions per user (CPU budget)",
    )
    p.add_argument(
        "--subsample",
        choices=["first", "random"],
        default="first",
        help="which N: the first in time order, or a seeded random draw",
    )
    p.add_argument("--seed", type=int, default=0, help="subsample, generation and MF seed")
    p.add_argument(
        "--generation",
        action="store_true",
        help="also the paper's generation mode (slow) on --generation-per-user rows per user",
    )
    p.add_argument("--generation-per-user", type=int, default=2)
    p.add_argument("--no-baselines", action="store_true", help="skip the CF baselines")
    p.add_argument(
        "--base-model", default=None, help="default: the one the adapters were trained on"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="auto: bfloat16 where the hardware has it (CUDA, AMX/AVX512-BF16), else float32",
    )
    p.add_argument(
        "--no-studies",
        action="store_true",
        help="skip the persona-specificity, memory-slope and reward-landscape studies",
    )
    p.add_argument(
        "--study-rows-per-user",
        type=int,
        default=15,
        help="test interactions per user the studies use",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decoder layers (faster on CPU after a one-off warm-up)",
    )
    p.add_argument(
        "--users",
        nargs="+",
        choices=USER_GROUPS,
        default=["training"],
        help="whose held-out ratings: the adapters' training users, and/or the other "
        "simulated users of an --all-users distillation (report in <out>/others)",
    )
    p.add_argument(
        "--max-users",
        type=int,
        default=None,
        help="evaluate a seeded sample of N users of each group (CPU budget)",
    )
    p.add_argument("--out", type=Path, default=None, help="default: <artifacts>/evaluation")
    p.set_defaults(func=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    """Body of ``persona-gym evaluate``."""
    configs = args.configs
    if configs == ["table"]:
        configs = list(TABLE_CONFIGS)
    out = args.out if args.out is not None else args.artifacts / "evaluation"
    # the other users first: the training users' report is the stage's product (build resumes on it)
    for group in sorted(dict.fromkeys(args.users), key=lambda g: g == "training"):
        config = FidelityEvalConfig(
            configs=configs,
            max_test_per_user=args.max_test_per_user,
            seed=args.seed,
            subsample=args.subsample,
            generation=args.generation,
            generation_per_user=args.generation_per_user,
            baselines=not args.no_baselines,
            base_model=args.base_model,
            device=args.device,
            dtype=args.dtype,
            compile=args.compile,
            studies=not args.no_studies,
            study_rows_per_user=args.study_rows_per_user,
            users=group,
            max_users=args.max_users,
        )
        results = evaluate(
            args.artifacts, config, out_dir=out if group == "training" else out / group
        )
        print(render_markdown(results))
        print(f"written to {results['out_dir']} in {results['seconds']} s")
    return 0
