"""Reports of experiment runs: ``metrics.json``, ``report.md`` and PNG plots in the run
folder, and the headline table in the terminal.

Detection (:func:`write_detection`): ROC and risk-coverage curves of the headline
scores, a per-token uncertainty heat map of one answer, and a reliability diagram when
a probability score (verbalized confidence) exists. Scaling (:func:`write_scaling`):
accuracy versus N and versus tokens spent, with 95% intervals.

Example:
    >>> from tokur_decode.experiments.metrics import Interval
    >>> _cell(Interval(0.71, 0.6, 0.8).to_dict())
    '0.710 [0.600, 0.800]'
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..core.aggregate import REDUCERS
from . import plots
from .metrics import COVERAGES, RISKS, TOP_P, Interval
from .plots import number
from .scoring import BASELINE, LENGTH, PROBABILITY_SCORES

__all__ = [
    "detection_tables",
    "print_detection",
    "print_scaling",
    "scaling_tables",
    "write_detection",
    "write_scaling",
]

_DEFINITIONS = (
    "Positive class = **wrong** answer, score = uncertainty (confidences negated). "
    "AUROC: `roc_auc_score(wrong, uncertainty)` (equals TokUR's AUROC of correct vs "
    "confidence). AUPRC: average precision of detecting wrong answers "
    "(scikit-learn's step-wise sum, not the trapezoid rule; chance = error rate). "
    "Top-p: accuracy of the max(1, floor(p N)) most confident answers. PRR: prediction "
    "rejection ratio (1 = oracle, 0 = random). Selective prediction: risk@c, the error "
    "rate of the most confident fraction c; coverage@r, the largest fraction answered "
    "with error rate at most r; AURC, the area under the risk-coverage curve (lower is "
    "better). `probe`: a logistic regression over every response score, cross-fitted "
    "(5 folds: no item is scored by a probe that saw it). Ties count as random order. "
    "Brackets: 95% percentile bootstrap over items (scipy.stats.bootstrap)."
)


def _cell(d: dict, spec: str = ".3f") -> str:
    return format(Interval.from_dict(d), spec)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(head) - 1)
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join(align) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _json(path: Path, obj) -> None:
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [clean(v) for v in x]
        return x

    path.write_text(json.dumps(clean(obj), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _label(score: str) -> str:
    if score == BASELINE:
        return f"{score} (baseline: mean log-prob)"
    return f"{score} (baseline: length)" if score == LENGTH else score


# --------------------------------------------------------------------------- detection


def detection_tables(summary: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
    """The report's tables as ``{title: (header, rows)}``."""
    tables = {}
    tables["Accuracy"] = (
        ["dataset", "items", "accuracy"],
        [[name, str(d["n"]), _cell(d["accuracy"])] for name, d in summary["datasets"].items()],
    )
    head = ["score", "AUROC", "AUPRC", "PRR", *(f"Top-{p:g}" for p in TOP_P)]
    tables["Wrong-answer detection (all datasets pooled)"] = (
        head,
        [
            [_label(h["score"]), _cell(h["auroc"]), _cell(h["auprc"]), _cell(h["prr"])]
            + [_cell(h[f"top_{p}"], ".2f") for p in TOP_P]
            for h in summary["headline"]
        ],
    )
    groups = list(summary["datasets"])
    tables["AUROC per dataset"] = (
        ["score", *groups],
        [
            [h["score"], *(number(summary["auroc"][h["score"]][g]) for g in groups)]
            for h in summary["headline"]
        ],
    )
    outputs = list(dict.fromkeys(s.split(":")[0] for s in summary["auroc"] if ":" in s))
    tables["AUROC of every aggregate (pooled)"] = (
        ["output", *REDUCERS],
        [
            [o, *(number(summary["auroc"].get(f"{o}:{r}", {}).get("all")) for r in REDUCERS)]
            for o in outputs
        ],
    )
    head = ["score", "AURC", *(f"risk@{c:g}" for c in COVERAGES)]
    head += [f"coverage@{r:g}" for r in RISKS]
    keys = ["aurc", *(f"risk@{c}" for c in COVERAGES), *(f"coverage@{r}" for r in RISKS)]
    for group, rows in summary.get("selective", {}).items():
        title = "all datasets pooled" if group == "all" else group
        tables[f"Selective prediction ({title})"] = (
            head,
            [[_label(row["score"]), *(_cell(row[k], ".2f") for k in keys)] for row in rows],
        )
    if "tokur_seeds" in summary:
        tables.update(_seed_table(summary))
    if summary["ece"]:
        tables["Calibration (ECE, 10 bins)"] = (
            ["score", "ECE"],
            [[name, _cell(v)] for name, v in summary["ece"].items()],
        )
    return tables


def write_detection(
    out: str | Path, records: list[dict], summary: dict, command: str
) -> list[Path]:
    """Write ``metrics.json``, ``report.md`` and the plots; return the files written."""
    out = Path(out)
    files = {
        "metrics": out / "metrics.json",
        "report": out / "report.md",
        "roc": out / "roc.png",
        "risk": out / "risk_coverage.png",
        "heatmap": out / "heatmap.png",
    }
    if "model" in summary.get("probe", {}):
        files["probe"] = out / "probe.json"
        _json(files["probe"], summary["probe"]["model"])
    _json(files["metrics"], summary)
    plots.roc_plot(records, summary, files["roc"])
    plots.risk_coverage_plot(records, summary, files["risk"])
    plots.heatmap_plot(records, files["heatmap"])
    probability = sorted(PROBABILITY_SCORES & set(records[0]["extra"]))
    if probability:
        files["reliability"] = out / "reliability.png"
        plots.reliability_plot(records, probability, files["reliability"])
    parts = [f"# Wrong-answer detection\n\n    {command}\n", _DEFINITIONS]
    if summary.get("one_class"):
        parts.append(f"**n/a below: {summary['one_class']}.**")
    for title, (head, rows) in detection_tables(summary).items():
        parts.append(f"## {title}\n\n{_md_table(head, rows)}")
    parts.append(
        "## Plots\n\n"
        + "\n".join(f"![{k}]({p.name})" for k, p in files.items() if p.suffix == ".png")
    )
    files["report"].write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return list(files.values())


# --------------------------------------------------------------------------- scaling


def scaling_tables(summary: dict) -> dict[str, tuple[list[str], list[list[str]]]]:
    """Accuracy and tokens per method and N as ``{title: (header, rows)}``."""
    ns = [str(n) for n in summary["ns"]]
    methods = summary["methods"]
    acc = [[name, *(_cell(methods[name][n]["accuracy"]) for n in ns)] for name in methods]
    tok = [[name, *(f"{methods[name][n]['tokens']:.1f}" for n in ns)] for name in methods]
    head = ["method", *(f"N={n}" for n in ns)]
    return {
        f"Accuracy versus N ({summary['n']} items, {summary['repeats']} subsets each)": (head, acc),
        "Tokens generated per item": (head, tok),
    }


def live_table(live: dict) -> tuple[str, list[str], list[list[str]]]:
    """The recipes run live: ``(title, header, rows)``."""

    def ratio(x: float | None) -> str:
        return "" if x is None else f"{x:.2f}x"

    head = ["recipe", "accuracy", "tokens/item", "seconds/item", "tokens", "seconds", "load"]
    rows = [
        [
            name,
            _cell(m["accuracy"]),
            f"{m['tokens']:.1f}",
            f"{m['seconds']:.2f}",
            ratio(m.get("tokens_vs_majority")),
            ratio(m.get("seconds_vs_majority")),
            f"{m['load']:.1f}",
        ]
        for name, m in live["methods"].items()
    ]
    title = f"Recipes run live ({live['n']} items; tokens and seconds also against majority@8)"
    return title, head, rows


def write_scaling(out: str | Path, summary: dict, command: str) -> list[Path]:
    """Write ``metrics.json``, ``report.md`` and the two plots; return the files written."""
    out = Path(out)
    files = [
        out / "metrics.json",
        out / "report.md",
        out / "accuracy_vs_n.png",
        out / "accuracy_vs_tokens.png",
    ]
    _json(files[0], summary)
    plots.scaling_plot(summary, files[2], "n")
    plots.scaling_plot(summary, files[3], "tokens")
    parts = [
        f"# Test-time scaling\n\n    {command}\n",
        "Accuracy: mean over items of the per-item mean over random ordered subsets of N "
        "candidates; brackets: 95% percentile bootstrap over items. DeepConf online is "
        "simulated from the full traces (cut traces leave the vote and count the tokens "
        "decoded up to the cut); oracle = some candidate is right.",
    ]
    for title, (head, rows) in scaling_tables(summary).items():
        parts.append(f"## {title}\n\n{_md_table(head, rows)}")
    if "live" in summary:
        title, head, rows = live_table(summary["live"])
        parts.append(
            f"## {title}\n\nEach recipe run for real on every batch of items: tokens it "
            "decoded per item, wall-clock seconds of its batch shared among the items, the "
            f"one-minute load average when each run ended.\n\n{_md_table(head, rows)}"
        )
    parts.append(
        "## Plots\n\n![accuracy vs N](accuracy_vs_n.png)\n"
        "![accuracy vs tokens](accuracy_vs_tokens.png)"
    )
    files[1].write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    return files


# --------------------------------------------------------------------------- terminal


def _print(title: str, head: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, h in enumerate(head):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


def _seed_table(summary: dict) -> dict:
    """TokUR's headline scores over the noise seeds: mean +- std of each metric, beside
    the bootstrap interval of the first seed's AUROC."""
    seeds = summary["tokur_seeds"]
    stats = seeds["scores"]
    headline = {h["score"]: h for h in summary["headline"]}
    names = [n for n in headline if n in stats] or [n for n in stats if n.endswith(":sum")]

    def pm(d: dict) -> str:
        return "n/a" if math.isnan(d["mean"]) else f"{d['mean']:.3f} +- {d['std']:.3f}"

    head = ["score", "AUROC", "AUROC 95% CI (first seed)", "AUPRC", "PRR"]
    head += [f"Top-{p:g}" for p in TOP_P]
    rows = [
        [
            _label(n),
            pm(stats[n]["auroc"]),
            _cell(headline[n]["auroc"]) if n in headline else "",
            pm(stats[n]["auprc"]),
            pm(stats[n]["prr"]),
            *(pm(stats[n][f"top_{p}"]) for p in TOP_P),
        ]
        for n in names
    ]
    title = "TokUR over noise seeds " + ", ".join(map(str, seeds["seeds"])) + " (mean +- std)"
    return {title: (head, rows)}


def print_detection(summary: dict) -> None:
    """Accuracy and the headline detection table (AUROC, AUPRC, PRR), in the terminal."""
    tables = detection_tables(summary)
    _print("Accuracy", *tables["Accuracy"])
    if summary.get("one_class"):
        from rich.console import Console

        Console().print(f"[bold]n/a below: {summary['one_class']}.[/bold]")
    title = "Wrong-answer detection (all datasets pooled)"
    head, rows = tables[title]
    _print(title, head[:4], [row[:4] for row in rows])
    for title, (head, rows) in tables.items():
        if title.startswith("TokUR over noise seeds"):
            _print(title, head[:5], [row[:5] for row in rows])


def print_scaling(summary: dict) -> None:
    """The accuracy-versus-N table, in the terminal."""
    title, (head, rows) = next(iter(scaling_tables(summary).items()))
    _print(title, head, rows)
    if "live" in summary:
        _print(*live_table(summary["live"]))
