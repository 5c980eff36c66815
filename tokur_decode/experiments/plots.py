"""The PNG plots of experiment runs (matplotlib, Agg backend): ROC and risk-coverage curves,
a per-token uncertainty heat map, reliability diagrams, accuracy versus N and versus
tokens, and the abstention calibration plot."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..core.trace import uncertainty_scale
from .detection import score_table
from .metrics import Interval, reliability, risk_coverage
from .scoring import BASELINE, LENGTH

__all__ = [
    "calibration_plot",
    "heatmap_plot",
    "number",
    "reliability_plot",
    "risk_coverage_plot",
    "roc_plot",
    "scaling_plot",
]


def number(x: float | None) -> str:
    """``x`` to three decimals, ``n/a`` when missing or NaN (tables and legends)."""
    return "n/a" if x is None or math.isnan(x) else f"{x:.3f}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _unit_axes(ax, xlabel: str, ylabel: str, title: str) -> None:
    """Labels and title of a plot of rates: both axes from 0 to 1."""
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xlim=(0, 1), ylim=(0, 1.01))


def _colors(n: int):
    plt = _plt()
    cmap = plt.get_cmap("tab20")
    return [cmap(i % 20) for i in range(n)]


def _line_style(score: str, color) -> dict:
    """Baselines stand out: mean log-prob bold black, length dashed grey."""
    if score == BASELINE:
        return dict(lw=2.5, color="black")
    return dict(lw=2, ls="--", color="grey") if score == LENGTH else dict(lw=1.3, color=color)


def roc_plot(records, summary, path: Path) -> None:
    from sklearn.metrics import roc_curve

    plt = _plt()
    wrong = np.array([not r["correct"] for r in records])
    table = score_table(records, summary.get("probe"))
    fig, ax = plt.subplots(figsize=(10, 6))
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="random")
    for h, color in zip(summary["headline"], _colors(len(summary["headline"])), strict=True):
        if wrong.all() or not wrong.any():
            break
        fpr, tpr, _ = roc_curve(wrong, table[h["score"]])
        style = _line_style(h["score"], color)
        ax.plot(fpr, tpr, label=f"{h['score']} ({number(h['auroc']['value'])})", **style)
    _unit_axes(
        ax,
        "false positive rate (right answers flagged)",
        "true positive rate (wrong answers caught)",
        f"ROC: detecting wrong answers ({len(records)} items)",
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="score (AUROC)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def risk_coverage_plot(records, summary, path: Path) -> None:
    plt = _plt()
    correct = np.array([r["correct"] for r in records])
    table = score_table(records, summary.get("probe"))
    fig, ax = plt.subplots(figsize=(10, 6))
    coverage, oracle = risk_coverage(correct, ~correct)
    ax.plot(coverage, oracle, ls="--", color="grey", label="oracle")
    ax.axhline(correct.mean(), ls=":", color="grey", label="random")
    for h, color in zip(summary["headline"], _colors(len(summary["headline"])), strict=True):
        cov, acc = risk_coverage(correct, table[h["score"]])
        style = _line_style(h["score"], color)
        ax.plot(cov, acc, label=f"{h['score']} (PRR {number(h['prr']['value'])})", **style)
    _unit_axes(
        ax,
        "coverage (fraction answered, most confident first)",
        "accuracy of the answered",
        "Risk-coverage: accuracy when abstaining on the most uncertain",
    )
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def calibration_plot(result, path: Path) -> None:
    """The risk-coverage curve of a calibrated rule's score (error rate among the
    answers kept, least uncertain first) with the target risk and the rule's point
    (``result``: a :class:`~tokur_decode.experiments.abstention.CalibratedRun`)."""
    plt = _plt()
    rule = result.rule
    fig, ax = plt.subplots(figsize=(7, 5))
    coverage, accuracy = risk_coverage(result.correct, result.uncertainty)
    ax.plot(coverage, 1 - accuracy, color="C0", label=f"{rule.score} (all {rule.n_items} items)")
    ax.axhline(rule.risk, ls="--", color="C3", label=f"target risk {rule.risk:g}")
    ax.axhline(1 - result.correct.mean(), ls=":", color="grey", label="answer everything")
    ax.plot(
        [rule.coverage],
        [rule.calibration_risk],
        "o",
        color="C3",
        label=f"rule on the calibration part (coverage {rule.coverage:.2f})",
    )
    _unit_axes(
        ax,
        "coverage (fraction answered, least uncertain first)",
        "error rate among the answers kept",
        f"Calibrated abstention: risk {rule.risk:g}, delta {rule.delta:g}",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def _example(records: list[dict]) -> dict:
    """A wrong answer with several tokens if there is one, else the longest answer."""
    with_tokens = [r for r in records if r.get("tokens")]
    if not with_tokens:
        raise ValueError("records: no answer has per-token values")
    wrong = [r for r in with_tokens if not r["correct"] and r["n_tokens"] >= 4]
    return wrong[0] if wrong else max(with_tokens, key=lambda r: r["n_tokens"])


def heatmap_plot(records, path: Path) -> None:
    plt = _plt()
    rec = _example(records)
    names = list(rec["values"])
    grid = np.array([uncertainty_scale(n, rec["values"][n]) for n in names])
    tokens = [repr(t)[1:-1] for t in rec["tokens"]]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(tokens) + 3), 0.38 * len(names) + 2.2))
    im = ax.imshow(grid, cmap="RdYlGn_r", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(tokens)), tokens, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    verdict = "right" if rec["correct"] else f"wrong, gold {rec['answer']!r}"
    ax.set_title(f"{rec['question']}\nanswer ({verdict}): {rec['response'][:90]!r}", fontsize=9)
    fig.colorbar(im, ax=ax, label="uncertainty (per signal, 0 = most confident)", shrink=0.8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def reliability_plot(records, names: list[str], path: Path) -> None:
    plt = _plt()
    correct = np.array([r["correct"] for r in records])
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], ls=":", color="grey", label="perfect calibration")
    for name, color in zip(names, _colors(len(names)), strict=True):
        conf = np.array([r["extra"][name] for r in records])
        count, mean_conf, acc = reliability(correct, conf)
        used = count > 0
        ax.plot(mean_conf[used], acc[used], marker="o", color=color, label=name)
    ax.set(xlabel="stated confidence", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.set_title("Reliability diagram (10 bins)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def scaling_plot(summary: dict, path: Path, x: str) -> None:
    from matplotlib.ticker import NullFormatter

    plt = _plt()
    methods = summary["methods"]
    primary = summary["primary"]
    ns = [str(n) for n in summary["ns"]]
    fig, ax = plt.subplots(figsize=(10, 6))
    colors = dict(zip(methods, _colors(len(methods)), strict=True))
    colors |= {"greedy": "black", "oracle": "grey"}
    for name, rows in methods.items():
        ivs = [Interval.from_dict(rows[n]["accuracy"]) for n in ns]
        xs = [int(n) for n in ns] if x == "n" else [rows[n]["tokens"] for n in ns]
        ys = np.array([iv.value for iv in ivs])
        if name in primary:  # recipes, greedy and majority: bold, with their interval
            lo = np.array([iv.low for iv in ivs])
            hi = np.array([iv.high for iv in ivs])
            ls = ":" if name == "greedy" else "-"
            ax.plot(xs, ys, marker="o", ms=4, lw=2.2, ls=ls, color=colors[name], label=name)
            if np.all(np.isfinite(lo)):
                ax.fill_between(xs, lo, hi, alpha=0.10, color=colors[name])
        else:
            ax.plot(xs, ys, marker=".", lw=1, ls="--", color=colors[name], label=name)
    ax.set_xscale("log", base=2 if x == "n" else 10)
    if x == "n":
        ax.set_xticks([int(n) for n in ns], ns)
        ax.set_xlabel("N candidates")
    else:
        ticks = sorted({round(methods["majority"][n]["tokens"]) for n in ns})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("tokens generated per item (log scale)")
    ax.set_ylabel("accuracy (bands: 95% bootstrap interval)")
    ax.set_ylim(0, 1.01)
    ax.set_title(f"Test-time scaling ({summary['n']} items, {summary['repeats']} subsets each)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
