"""``tokur-decode calibrate``: a labelled ``eval`` run in, an abstention recipe with a
guarantee out (:mod:`tokur_decode.experiments.abstention`).

    tokur-decode eval --data tasks:capitals,tasks:arithmetic,tasks:legs --out runs/detect
    tokur-decode calibrate runs/detect --risk 0.2 --delta 0.1 --out my-rule.toml
    tokur-decode generate --strategy my-rule.toml "What is the capital of Peru?"
    tokur-decode calibrate runs/detect --risk 0.3 --recipe logtoku-abstain --out lt.toml
"""

from __future__ import annotations

import json
import sys

from .common import flags, integer

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit an abstention rule with a guaranteed error rate on a labelled eval run",
        description="Choose a score and a threshold on a labelled eval run so that, with "
        "probability at least 1 - delta, at most --risk of the answers kept are wrong "
        "(Learn then Test with MAPIE). Writes the recipe (--out, .toml), its report (.json) "
        "and a risk-coverage plot (.png) next to it; nothing when calibration fails.",
    )
    p.add_argument("run", help="an eval run folder (its results.jsonl has scores and grades)")
    p.add_argument(
        "--risk", type=float, required=True, help="error rate allowed among the answers kept"
    )
    p.add_argument(
        "--delta", type=float, default=0.1, help="probability that the guarantee fails (0.1)"
    )
    p.add_argument(
        "--score",
        help="the score to abstain on (e.g. chosen_logprob:mean, probe); default: chosen on "
        "the held-back part",
    )
    p.add_argument(
        "--recipe",
        help="calibrate the trigger threshold of this abstaining stop recipe (e.g. "
        "logtoku-abstain) instead: the recipe comes back with the certified threshold",
    )
    p.add_argument(
        "--holdout",
        type=float,
        default=0.3,
        help="fraction of items held back to choose the score and the thresholds (0.3)",
    )
    p.add_argument("--seed", type=integer(0, 2**32 - 1), default=0, help="seed of the split (0)")
    p.add_argument("--abstain-text", default="I don't know.", help="the answer when abstaining")
    p.add_argument("--out", required=True, help="the recipe to write (.toml)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args) -> int:
    from pathlib import Path

    from ..experiments.abstention import calibrate_run, write_rule

    out = Path(args.out)
    if out.suffix != ".toml":
        raise ValueError(f"--out: the recipe is a .toml file, got {out}")
    if not out.parent.is_dir():  # before calibrating, not after
        raise ValueError(f"--out: the folder {out.parent} does not exist")
    settings = flags(args, "risk", "delta", "score", "recipe", "holdout", "seed", "abstain_text")
    result = calibrate_run(args.run, name=out.stem, **settings)
    files = write_rule(result, out)
    report = result.report()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print(report)
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stderr)  # stdout: the report
    return 0


def _print(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]Rule[/bold]: {report['rule']}")
    console.print(f"[bold]Guarantee[/bold]: {report['guarantee']}")
    console.print(
        f"Calibration part: {report['n_calibration']} items, {report['coverage']:.0%} kept, "
        f"error among kept {report['calibration_risk']:.3f}, p-value {report['p_value']:.3g}; "
        f"the score was chosen on {report['n_selection']} held-back items"
    )
    table = Table(title="Candidates on the held-back part", title_justify="left")
    for head in ("score", f"coverage at risk {report['risk']:g}", "AURC"):
        table.add_column(head, justify="left" if head == "score" else "right")
    ranked = sorted(
        report["candidates"].items(),
        key=lambda kv: (-kv[1]["selection_coverage"], kv[1]["selection_aurc"]),
    )
    for name, c in ranked[:8]:
        table.add_row(name, f"{c['selection_coverage']:.2f}", f"{c['selection_aurc']:.3f}")
    console.print(table)
    for name, why in report["skipped"].items():
        console.print(f"skipped {name}: {why}")
