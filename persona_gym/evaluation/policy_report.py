"""The report of ``persona-gym evaluate-policy``: a table, bars with intervals, files.

:func:`write_report` writes ``results.json``, ``policies.png`` and ``report.md`` from the
results of :func:`agents.evaluate.evaluate_policies`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from persona_gym.evaluation.policy import MIN_AGREEMENT_POLICIES
from persona_gym.io import atomic_write_json, atomic_write_text

__all__ = ["LOGGED_METRICS", "SIM_METRICS", "format_table", "plot_policies", "write_report"]

SIM_METRICS = ("return", "mean_rating", "share_ge4", "churn", "coverage", "diversity", "novelty")
LOGGED_METRICS = ("hit_rate", "ndcg", "hit_rating", "replay")


def format_table(results: dict[str, Any]) -> str:
    """A markdown table: one row per policy, value [low, high] per metric."""

    def cell(entry):
        return (
            "-" if not entry else f"{entry['mean']:.3f} [{entry['low']:.3f}, {entry['high']:.3f}]"
        )

    logged = any("logged" in p for p in results["policies"].values())
    head = ["policy", *SIM_METRICS] + (list(LOGGED_METRICS) if logged else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, entry in results["policies"].items():
        row = [name] + [cell(entry["simulator"][m]) for m in SIM_METRICS]
        if logged:
            row += [cell(entry.get("logged", {}).get(m)) for m in LOGGED_METRICS]
        lines.append("| " + " | ".join(row) + " |")
    lines += _differences(results)
    gap = results.get("gap_closed", {})
    if gap:
        lines += [
            "",
            "Gap closed toward simulator-greedy, (policy − random) / (simulator-greedy − random): "
            + "; ".join(
                f"{n} {gap['mean_rating'][n]:.2f} (return {gap.get('return', {}).get(n, float('nan')):.2f})"
                for n in gap.get("mean_rating", {})
            ),
        ]
    for key, value in results.get("agreement", {}).items():
        lines.append(
            f"\nAgreement {key}: Kendall tau {value['kendall_tau']:.2f} "
            f"(p={value['kendall_p']:.2f}), Spearman rho {value['spearman_rho']:.2f} "
            f"over {value['n_policies']} policies"
        )
    n_logged = sum("logged" in p for p in results["policies"].values())
    if not results.get("agreement") and 2 <= n_logged < MIN_AGREEMENT_POLICIES:
        lines.append(
            "\nNo rank agreement between the simulator's ordering and the logged one: it needs "
            f"at least {MIN_AGREEMENT_POLICIES} policies evaluated on logged data ({n_logged} here)"
        )
    return "\n".join(lines)


def _differences(results: dict[str, Any]) -> list[str]:
    """Lines on each policy vs the next one by mean rating: their paired difference, and
    whether the two can be told apart at 95%."""
    diffs = {(d["a"], d["b"], d["metric"]): d for d in results.get("differences", [])}
    if not diffs:
        return []
    ranked = sorted(
        results["policies"],
        key=lambda n: -results["policies"][n]["simulator"]["mean_rating"]["mean"],
    )
    lines = [
        "",
        "Paired differences (same users and draws; 95% bootstrap over episodes), each policy "
        "vs the next by mean rating:",
    ]
    for a, b in zip(ranked, ranked[1:], strict=False):
        parts = []
        for metric in ("mean_rating", "return"):
            d = diffs.get((a, b, metric))
            sign = 1.0
            if d is None:
                d, sign = diffs[(b, a, metric)], -1.0
            low, high = sorted((sign * d["low"], sign * d["high"]))
            verdict = "" if d["distinguishable"] else " **not distinguishable**"
            parts.append(f"{metric} {sign * d['mean']:+.3f} [{low:+.3f}, {high:+.3f}]{verdict}")
        lines.append(f"- {a} − {b}: " + "; ".join(parts))
    return lines


def plot_policies(results: dict[str, Any], path: Path) -> Path:
    """Each policy's value with its 95% interval, one panel per metric (axes fitted to the values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["policies"])
    panels = [("simulator", m) for m in SIM_METRICS] + [("logged", m) for m in LOGGED_METRICS]
    panels = [
        (s, m) for s, m in panels if any(results["policies"][n].get(s, {}).get(m) for n in names)
    ]
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, (section, metric) in zip(axes.flat, panels, strict=False):
        entries = [results["policies"][n].get(section, {}).get(metric) or {} for n in names]
        means = [e.get("mean", np.nan) for e in entries]
        errors = [
            [max(m - e.get("low", m), 0.0) for m, e in zip(means, entries, strict=True)],
            [max(e.get("high", m) - m, 0.0) for m, e in zip(means, entries, strict=True)],
        ]
        # points with intervals on an axis fitted to them: bars from 0 hide differences of 0.1
        ax.errorbar(range(len(names)), means, yerr=errors, fmt="o", capsize=3, color="tab:blue")
        ax.grid(axis="y", alpha=0.3)
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        ax.set_title(f"{metric} ({section})", fontsize=8)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(results: dict[str, Any], out: Path, header: str = "") -> Path:
    """``results.json``, ``policies.png`` and ``report.md`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    plot_policies(results, out / "policies.png")
    text = (
        f"# Policy evaluation\n\n{header}\n\nValues: mean [95% bootstrap interval].\n\n"
        f"{format_table(results)}\n\n![policies](policies.png)\n"
    )
    atomic_write_text(out / "report.md", text)
    return out / "report.md"
