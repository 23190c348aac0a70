"""The report of ``persona-gym evaluate``: markdown (Table 1 layout, baselines, fidelity,
studies), plots and the files written into the evaluation folder."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from persona_gym.evaluation.configs import PAPER_TABLE
from persona_gym.io import atomic_write, atomic_write_json, atomic_write_parquet, atomic_write_text


# -- report ---------------------------------------------------------------------------------------
def _f(value, digits: int = 3, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * value:.2f}%" if percent else f"{value:.{digits}f}"


def _best(results: dict) -> dict | None:
    ok = [c for c in results["configs"] if c["status"] == "ok"]
    for spec in ("persona:Ms+Ml", "single-max:Ms+Ml"):
        for c in ok:
            if c["spec"] == spec:
                return c
    return ok[0] if ok else None


def _beside_baselines(results: dict, data: dict) -> list[str]:
    """The simulator's configs beside the CF baselines on the same rows (only with baselines)."""
    lines: list[str] = []
    lines += [
        "",
        "## The simulator beside the baselines on the same split",
        "",
        "Fitted on train + background, hyper-parameters tuned on the last 20% of each "
        "selected user's training interactions (never on test).",
        "",
        "| Model | params | val RMSE | RMSE (evaluated rows) | MAE (evaluated rows) | "
        "RMSE (first 3 per user) | RMSE (full test) | MAE (full test) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in results["configs"]:
        if (
            c["status"] == "ok"
            and not c.get("prompt_differs_from_training")
            and c["variant"] != "base"
        ):
            e = c["expected"]
            full = _f(e["rmse"]) if data["n_evaluated"] == data["n_test_total"] else "-"
            mae_full = _f(e["mae"]) if full != "-" else "-"
            lines.append(
                f"| simulator `{c['spec']}` | - | - | {_f(e['rmse'])} | {_f(e['mae'])} | "
                f"{_f(c['first_3']['rmse'])} | {full} | {mae_full} |"
            )
    for name, b in results["baselines"].items():
        ev, full = b["evaluated_rows"], b["full_test"]
        params = ", ".join(f"{k}={v}" for k, v in b["params"].items() if k != "seed") or "-"
        lines.append(
            f"| {name} | {params} | {_f(b['val_rmse'])} | {_f(ev['rmse'])} | {_f(ev['mae'])} | "
            f"{_f(b['first_3']['rmse'])} | {_f(full['rmse'])} | {_f(full['mae'])} |"
        )
    return lines


def render_markdown(results: dict) -> str:
    """The report: Table 1 layout with the paper beside us, baselines, fidelity, notes."""
    data = results["data"]
    base = results["base_model"]
    lines = [
        "# Simulated-user fidelity (paper Table 1 layout)",
        "",
        f"Artifacts `{results['artifacts']}`; {data['source']}; {data['n_evaluated']} test "
        f"interactions of {data['n_users']} users evaluated (of {data['n_test_total']}; "
        f"max per user: {data['max_test_per_user'] or 'all'}, {data['subsample']}). "
        f"Training prompt: {results['training_prompt']}.",
        "",
        "Ours: expected rating of the 5-way distribution (URR 0 by construction); generation "
        "columns appear when run with `--generation`. Paper: MovieLens-1M, Phi-3-Mini (LLaMA-3 "
        "for row 2), generation mode, each memory setting with its own adapters.",
        "",
    ]
    has_gen = any("generation" in c for c in results["configs"])
    head = "| No. | Base Model | Adapter(s) | Memories Used | RMSE | MAE | URR | RMSE (argmax) |"
    rule = "|---|---|---|---|---|---|---|---|"
    if has_gen:
        head += " RMSE (gen.) | MAE (gen.) | URR (gen.) |"
        rule += "---|---|---|"
    head += " paper RMSE | paper MAE | paper URR |"
    rule += "---|---|---|"
    lines += [head, rule]
    for c in results["configs"]:
        no = c["paper_no"]
        label = c["memories"]
        if c.get("prompt_differs_from_training"):
            label += " (prompt differs from training)"
        extra = c["spec"].split(":")[2:]
        if extra:
            label += f" [{', '.join(extra)}]"
        if c["status"] != "ok":
            cells = [f"skipped: {c['reason']}", "", "", ""]
        else:
            e = c["expected"]
            cells = [_f(e["rmse"]), _f(e["mae"]), _f(e["urr"], percent=True), _f(e["rmse_argmax"])]
        if has_gen:
            g = c.get("generation") or {}
            cells += [_f(g.get("rmse")), _f(g.get("mae")), _f(g.get("urr"), percent=True)]
        paper = PAPER_TABLE.get(no) if no is not None else None
        if paper:
            note = " (LLaMA-3)" if paper["base"] != "Phi-3-Mini" else ""
            cells += [_f(paper["rmse"]) + note, _f(paper["mae"]), _f(paper["urr"], percent=True)]
        else:
            cells += ["-", "-", "-"]
        lines.append(
            f"| {no if no is not None else '+'} | {base} | {c['adapter']} | {label} | "
            + " | ".join(cells)
            + " |"
        )
    if results["baselines"]:
        lines += _beside_baselines(results, data)
    ndcg_ok = data["max_test_per_user"] != 1
    lines += [
        "",
        "## Distributional fidelity",
        "",
        f"NDCG@10 of a random order (floor): {_f(results['ndcg@10_random_order'])}. ECE: "
        "top-label, 10 bins. NDCG gains 2^r − 1."
        + (
            ""
            if ndcg_ok
            else " NDCG@10 is not reported: with one test row per user "
            "(--max-test-per-user 1) every order scores 1.0; use 2 or more."
        ),
        "",
        "| Config / baseline | NLL | ECE | user-mean Pearson | NDCG@10 | predicted histogram "
        "(mean distribution, 1..5) | real histogram |",
        "|---|---|---|---|---|---|---|",
    ]

    def hist(h):
        return " ".join(f"{x:.2f}" for x in h)

    def ndcg(e):
        return _f(e["ndcg@10"]) if ndcg_ok else "-"

    for c in results["configs"]:
        if c["status"] == "ok":
            e = c["expected"]
            lines.append(
                f"| {c['spec']} | {_f(e['nll'])} | {_f(e['ece'])} | {_f(e['user_mean_pearson'])} | "
                f"{ndcg(e)} | {hist(e['histogram_pred_mean_distribution'])} | "
                f"{hist(e['histogram_real'])} |"
            )
    for name, b in results["baselines"].items():
        e = b["evaluated_rows"]
        lines.append(
            f"| baseline: {name} | - | - | {_f(e['user_mean_pearson'])} | {ndcg(e)} | "
            f"{hist(e['histogram_pred_rounded'])} (rounded) | {hist(e['histogram_real'])} |"
        )
    best = _best(results)
    if best is not None:
        lines += [
            "",
            f"## Per persona ({best['spec']})",
            "",
            "| persona | n | RMSE | MAE |",
            "|---|---|---|---|",
        ]
        for p, g in best["expected"].get("per_group", {}).items():
            lines.append(f"| {p} | {g['n']} | {_f(g['rmse'])} | {_f(g['mae'])} |")
    lines += [
        "",
        "## Within-user fidelity",
        "",
        "Per user over the evaluated test interactions, then averaged over users: Pearson and "
        "Spearman correlation of predicted vs real ratings, and the spread of the predictions "
        "(an expected rating is a mean: its spread is below the real one). Histogram distance: "
        "total variation between the sampled-rating histogram and the real one.",
        "",
        "| Config / baseline | within-user Pearson | Spearman | std of predictions | "
        "std of real ratings | user-mean Pearson | ECE | histogram distance |",
        "|---|---|---|---|---|---|---|---|",
    ]
    reports = [(c["spec"], c["expected"]) for c in results["configs"] if c["status"] == "ok"]
    reports += [(f"baseline: {n}", b["evaluated_rows"]) for n, b in results["baselines"].items()]
    for label, e in reports:
        w = e.get("within_user", {})
        lines.append(
            f"| {label} | {_f(w.get('pearson'))} | {_f(w.get('spearman'))} | "
            f"{_f(w.get('std_pred'))} | {_f(w.get('std_real'))} | {_f(e['user_mean_pearson'])} | "
            f"{_f(e.get('ece'))} | {_f(e.get('histogram_distance'))} |"
        )
    studies = results.get("studies")
    if studies:
        spec, mem, land = studies["persona_specificity"], studies["memory"], studies["landscape"]
        lines += [
            "",
            "## Persona specificity, memory and reward landscape",
            "",
            f"On the first {studies['rows_per_user']} test interactions of each user.",
            "",
            f"- **Persona specificity** ({spec['users']} users, {spec['personas']} persona "
            f"adapters): RMSE under the user's own adapter {_f(spec['own_rmse'])}, under the "
            f"others {_f(spec['other_rmse'])}; the own adapter is the best for "
            f"{_f(spec['own_best_share'], percent=True)} of users by RMSE and for "
            f"{_f(spec.get('own_best_share_nll'), percent=True)} by NLL (chance "
            f"{_f(spec['chance'], percent=True)}).",
            f"- **Memory slope** (residual of a rating on the mean residual of the previous 3 "
            f"real ratings): real {_f(mem['real_slope'])} over {mem['real_rows']} test ratings "
            f"({_f(mem['real_slope_same_rows'])} on the simulated rows), simulated "
            f"{_f(mem['simulated_slope'])} over {mem['simulated_rows']} ({_f(mem['ratio'], 2)}x).",
            "",
            "| reward landscape (random unseen movies) | users | movies per user | "
            "within-user std | top-10 minus mean | share of variance between users |",
            "|---|---|---|---|---|---|",
        ]
        for name, r in land.items():
            lines.append(
                f"| {name} | {r['users']} | {r['items_per_user']:.0f} | {_f(r['within_user_std'])} | "
                f"{_f(r['top_minus_mean'])} | {_f(r['between_user_share'], percent=True)} |"
            )
        if "sequential" in studies:
            from persona_gym.evaluation.sequential_study import sequential_table

            lines += ["", "## Sequential fidelity", "", sequential_table(studies["sequential"])]
    lines += [
        "",
        "Plots: [histograms](histograms.png), [calibration](calibration.png), "
        "[per-persona RMSE](persona_rmse.png). All figures: `results.json`.",
        "",
    ]
    return "\n".join(lines)


def _save_png(path: Path, fig) -> None:
    import matplotlib.pyplot as plt

    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def write_plots(results: dict, out: Path) -> None:
    """histograms.png, calibration.png, persona_rmse.png (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [c for c in results["configs"] if c["status"] == "ok"]
    best = _best(results)
    x = np.arange(1, 6)
    # rating histograms of the main configuration: overall and per persona
    if best is not None:
        groups = best["expected"].get("per_group", {})
        panels = [("all users", best["expected"])] + [
            (f"persona {p}", g) for p, g in groups.items()
        ]
        fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3), squeeze=False)
        for ax, (title, figures) in zip(axes[0], panels, strict=True):
            ax.bar(x - 0.27, figures["histogram_real"], 0.27, label="real")
            ax.bar(
                x, figures["histogram_pred_mean_distribution"], 0.27, label="predicted (mean dist.)"
            )
            ax.bar(
                x + 0.27, figures["histogram_pred_rounded"], 0.27, label="predicted (rounded E[r])"
            )
            ax.set_title(title)
            ax.set_xticks(x)
            ax.set_xlabel("rating")
        axes[0][0].set_ylabel("share")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"Rating histograms, {best['spec']}", y=1.04)
        _save_png(out / "histograms.png", fig)
    # reliability diagram of every configuration
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect")
    for c in ok:
        rel = c["expected"]["reliability"]
        conf, acc = np.asarray(rel["confidence"], float), np.asarray(rel["accuracy"], float)
        keep = np.isfinite(conf)
        ax.plot(
            conf[keep], acc[keep], "o-", ms=3, label=f"{c['spec']} (ECE {c['expected']['ece']:.3f})"
        )
    ax.set_xlabel("confidence (max probability)")
    ax.set_ylabel("accuracy (argmax = real)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6)
    ax.set_title("Reliability (top-label)")
    _save_png(out / "calibration.png", fig)
    # per-persona RMSE bars of every configuration
    personas = sorted({p for c in ok for p in c["expected"].get("per_group", {})}, key=str)
    bars: list[tuple[str, dict, str | None]] = [
        (c["spec"], c["expected"].get("per_group", {}), None) for c in ok
    ]
    for name, pattern in (("item mean", "//"), ("matrix factorisation", "xx")):
        b = results["baselines"].get(name)
        if b:
            bars.append((f"baseline: {name}", b["evaluated_rows"].get("per_group", {}), pattern))
    fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * len(bars) * max(len(personas), 1) + 2), 3.5))
    width = 0.8 / max(len(bars), 1)
    for n, (label, groups, hatch) in enumerate(bars):
        ax.bar(
            np.arange(len(personas)) + n * width,
            [groups.get(p, {}).get("rmse", np.nan) for p in personas],
            width,
            label=label,
            hatch=hatch,
            color="white" if hatch else None,
            edgecolor="black" if hatch else None,
        )
    ax.set_xticks(np.arange(len(personas)) + 0.4 - width / 2)
    ax.set_xticklabels([f"persona {p}" for p in personas])
    ax.set_ylabel("RMSE (expected rating)")
    ax.legend(fontsize=6, ncol=2)
    _save_png(out / "persona_rmse.png", fig)


def _strict_json(value):
    """NaN/inf → None, numpy → Python, so results.json is strict JSON."""
    if isinstance(value, dict):
        return {str(k): _strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict_json(v) for v in value]
    if isinstance(value, np.ndarray):
        return _strict_json(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_report(results: dict, predictions: pd.DataFrame | None, out: str | Path) -> None:
    """Write report.md, results.json, predictions.parquet and the plots into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", _strict_json(results))
    if predictions is not None:
        atomic_write_parquet(out / "predictions.parquet", predictions)
    write_plots(results, out)
    atomic_write_text(out / "report.md", render_markdown(results))
