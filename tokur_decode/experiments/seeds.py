"""TokUR's detection numbers over noise seeds, as TokUR's evaluation reports them.

TokUR's values depend on the random perturbations: its paper reports each detection
metric as the mean and standard deviation over noise seeds (96, 89, 64). ``eval
--tokur-seeds 96,89,64`` generates every answer once (TokUR's first seed recorded with
it), then measures TokUR again on the same answers with each other seed (teacher
forcing: :func:`tokur_decode.hf.scoring.score`), and stores every seed's TokUR scores in
the record (``record["tokur_seeds"][seed]``). :func:`seed_statistics` gives, for every
TokUR score, each metric per seed and its mean and standard deviation (``numpy.std``,
``ddof=0``) over the seeds.

Example:
    >>> rows = [(True, 0.1, 0.3), (False, 0.9, 0.2), (True, 0.2, 0.1)]
    >>> records = [{"correct": c, "tokur_seeds": {"1": {"tokur_total:sum": u},
    ...                                            "2": {"tokur_total:sum": v}}}
    ...            for c, u, v in rows]
    >>> auroc = seed_statistics(records)["scores"]["tokur_total:sum"]["auroc"]
    >>> auroc["per_seed"], auroc["mean"], auroc["std"]
    ([1.0, 0.5], 0.75, 0.25)
"""

from __future__ import annotations

import numpy as np

from .metrics import DETECTION_METRICS, detection_values
from .scoring import uncertainty

__all__ = ["TOKUR_PREFIX", "seed_statistics", "tokur_scores"]

#: Scores that come from TokUR's samples (and so change with the noise seed).
TOKUR_PREFIX = "tokur_"


def tokur_scores(scores: dict[str, float]) -> dict[str, float]:
    """The TokUR scores of a record's ``scores``."""
    return {k: v for k, v in scores.items() if k.startswith(TOKUR_PREFIX)}


def seed_statistics(records: list[dict]) -> dict:
    """``{"seeds": [...], "scores": {score: {metric: {"per_seed", "mean", "std"}}}}`` of
    records that carry ``tokur_seeds`` (a metric undefined for a seed is NaN, and so is
    its mean)."""
    seeds = list(records[0]["tokur_seeds"])
    if any(list(r["tokur_seeds"]) != seeds for r in records):
        raise ValueError("records: every record must carry the same TokUR seeds")
    correct = np.array([r["correct"] for r in records], dtype=bool)
    names = list(records[0]["tokur_seeds"][seeds[0]])
    out: dict = {"seeds": [int(s) for s in seeds], "scores": {}}
    for name in names:
        per_seed = []
        for seed in seeds:
            u = [uncertainty(name, r["tokur_seeds"][seed][name]) for r in records]
            per_seed.append(detection_values(correct, u))
        out["scores"][name] = {
            metric: _stats([values[metric] for values in per_seed]) for metric in DETECTION_METRICS
        }
    return out


def _stats(values: list[float]) -> dict:
    array = np.asarray(values, dtype=np.float64)
    return {
        "per_seed": [float(v) for v in array],
        "mean": float(array.mean()),
        "std": float(array.std()),
    }
