"""Wrong-answer detection: one greedy answer per item, every signal recorded in the same
pass, every aggregate scored, and how well each score tells wrong answers from right.

:func:`run_detection` generates (resumably) into a run folder; :func:`summarize`
computes the metrics from the records alone (see :mod:`tokur_decode.experiments.metrics`
for the definitions: positive class = wrong answer, score = uncertainty).

Example:
    >>> from tokur_decode.experiments import data
    >>> from tokur_decode.hf import HFBackend
    >>> from tokur_decode.models import load_default
    >>> backend = HFBackend.deferred(load_default, model_name="embedded", batch_size=8)
    >>> items = data.load_many("tasks:capitals,tasks:arithmetic", limit=10)
    >>> result = run_detection(items, backend, out="runs/detect",
    ...                        signals="all", max_new_tokens=24)         # doctest: +SKIP
    >>> result.summary["headline"][0]["auroc"]                         # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.probe import PROBE
from ..core.signals import parse_signals, wants_samples
from ..strategies.backend import Backend
from .data import Item
from .generations import Generation, generations
from .metrics import auroc, bootstrap, detection_metrics, ece, selective_metrics
from .probe import fit_probe, probe_features
from .runner import RunResult, graded, process
from .scoring import LENGTH, PROBABILITY_SCORES, headline_scores, trace_scores, uncertainty
from .seeds import seed_statistics, tokur_scores
from .store import RunStore

__all__ = ["record", "run_detection", "summarize"]


def record(item: Item, gen: Generation, row: int = 0) -> dict:
    """The result line of one response: the item, the answer and its grade, every
    score, and the per-token values of every signal."""
    trace = gen.trace[row]
    return {
        "key": item.key,
        **item.to_dict(),
        **graded(item, gen.texts[row]),
        "n_tokens": int(trace.lengths[0]),
        "token_ids": trace.token_ids[0].tolist(),
        "scores": trace_scores(trace)[0],
        "extra": dict(gen.extra[row]),
        "tokens": trace.tokens[0] if trace.tokens is not None else None,
        "values": {name: trace.values(name)[0] for name in trace.names},
    }


def run_detection(
    items: Sequence[Item],
    backend: Backend,
    *,
    out: str | Path,
    signals: str | Sequence[str] = "all,tokur",
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 8,
    n_resamples: int = 1000,
    progress: bool = True,
    tokur_seeds: Sequence[int] | None = None,
) -> RunResult:
    """Generate a greedy answer per item (skipping items ``out`` already has); return
    the records of all ``items`` and their :func:`summarize`.

    ``tokur_seeds`` (TokUR's evaluation: 96, 89, 64; the transformers backend): the
    answers are generated with the first seed's noise and TokUR measured again on them
    with each other seed (:mod:`tokur_decode.experiments.seeds`); each record keeps
    every seed's TokUR scores and the summary their statistics over the seeds.

    ``seed`` seeds generation (TokUR's noise has its own seed in the backend) and the
    bootstrap.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    names = parse_signals(signals)
    config = {
        "kind": "detect",
        "signals": list(names),
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "tokur_seeds": None if tokur_seeds is None else [int(s) for s in tokur_seeds],
        "data": sorted({item.dataset for item in items}),
        **backend.describe(),
    }
    if tokur_seeds is not None:
        _check_seeds(tokur_seeds, names, backend)
    store = RunStore(out, config)

    def work(batch: list[Item], first: int) -> list[dict]:
        prompts = [item.messages for item in batch]
        gens = generations(
            backend, prompts, signals=names, max_new_tokens=max_new_tokens, seed=seed + first
        )
        records = [record(item, gen) for item, gen in zip(batch, gens, strict=True)]
        if tokur_seeds is not None:
            _measure_seeds(backend, prompts, records, tokur_seeds)
        return records

    records = process(store, items, work, batch_size=batch_size, desc="eval", progress=progress)
    summary = summarize(records, n_resamples=n_resamples, seed=seed, progress=progress)
    return RunResult(records, summary)


def _check_seeds(seeds: Sequence[int], names: Sequence[str], backend) -> None:
    if not wants_samples(names):
        raise ValueError("tokur_seeds: needs 'tokur' among the signals")
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(f"tokur_seeds: at least two different seeds, got {list(seeds)}")
    described = backend.describe()
    if described["backend"] != "hf" or "verbalized" in described:
        raise ValueError("tokur_seeds: runs on the transformers backend (--backend hf)")
    if described["tokur"].get("seed", 0) != seeds[0]:
        raise ValueError("tokur_seeds: the backend's TokUR seed must be the first seed")


def _measure_seeds(backend, prompts, records: list[dict], seeds: Sequence[int]) -> None:
    """Each record's TokUR scores under every seed (the first: as generated)."""
    responses = [r["token_ids"][: r["n_tokens"]] for r in records]
    for r in records:
        r["tokur_seeds"] = {str(seeds[0]): tokur_scores(r["scores"])}
    for s in seeds[1:]:
        trace = backend.score(prompts, responses, signals=["tokur"], tokur_seed=s)
        for r, scores in zip(records, trace_scores(trace), strict=True):
            r["tokur_seeds"][str(s)] = tokur_scores(scores)


def score_table(records: list[dict], probe: dict | None = None) -> dict[str, np.ndarray]:
    """Every score of the records as uncertainties (scores some record lacks are left
    out), the answer length as the trivial baseline, and the probe's cross-fitted
    probability of a wrong answer when ``probe`` (``summary["probe"]``) has one."""
    table = _scores(records)
    if probe and "cross_fitted" in probe:
        table[PROBE] = np.asarray(probe["cross_fitted"], dtype=np.float64)
    return table


def _probe(records: list[dict], correct: np.ndarray, seed: int) -> dict:
    """``summary["probe"]``: the probe fitted on every item and its cross-fitted
    scores, or why there is none."""
    try:
        fit = fit_probe(probe_features(records), correct, seed=seed)
    except ValueError as exc:
        return {"skipped": str(exc)}
    return {"model": fit.probe.to_dict(), "cross_fitted": fit.cross_fitted.tolist()}


def _scores(records: list[dict]) -> dict[str, np.ndarray]:
    names = [n for n in records[0]["scores"]] + list(records[0]["extra"])
    table = {LENGTH: np.array([float(r["n_tokens"]) for r in records])}
    for name in names:
        values = [{**r["scores"], **r["extra"]}.get(name) for r in records]
        if all(v is not None for v in values):
            table[name] = np.array([uncertainty(name, v) for v in values])
    return table


def summarize(
    records: list[dict], *, n_resamples: int = 1000, seed: int = 0, progress: bool = False
) -> dict:
    """Detection metrics of ``records`` (from :func:`record`), JSON-able.

    Returns ``n``, ``datasets`` (items and accuracy with interval per dataset and
    ``"all"``), ``headline`` (per headline score: AUROC, AUPRC, PRR, Top-p accuracy
    with 95% intervals, pooled over the datasets), ``auroc`` (point AUROC of every score,
    pooled and per dataset), ``ece`` (calibration error of probability scores) and
    ``one_class`` (why nothing separates right from wrong answers, when every answer is
    right or every one wrong; else ``None``), ``selective`` (per dataset and ``"all"``,
    per headline score: AURC, risk at coverages, coverage at risks, with intervals) and
    ``probe`` (a logistic probe over the response scores, :func:`~.probe.fit_probe`: its
    numbers and its cross-fitted scores, which join the scores as ``"probe"``; or why it
    was skipped). ``progress`` shows a bar over the bootstrap intervals (the slow part).
    """
    if not records:
        raise ValueError("records: nothing to summarize")
    correct = np.array([r["correct"] for r in records], dtype=bool)
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    groups = {"all": np.ones(len(records), dtype=bool)} | {
        d: np.array([r["dataset"] == d for r in records]) for d in datasets
    }
    probe = _probe(records, correct, seed)
    scores = score_table(records, probe)
    one_class = None
    if correct.all() or not correct.any():
        which = "right" if correct.all() else "wrong"
        one_class = f"every answer is {which}: detection metrics (AUROC, ...) are undefined"
    summary: dict = {
        "n": len(records),
        "one_class": one_class,
        "datasets": {},
        "headline": [],
        "auroc": {},
        "ece": {},
        "selective": {name: [] for name in groups},
        "probe": probe,
    }
    for name, mask in groups.items():
        (acc,) = bootstrap(np.mean, correct[mask], n_resamples=n_resamples, seed=seed)
        summary["datasets"][name] = {"n": int(mask.sum()), "accuracy": acc.to_dict()}
    from tqdm.auto import tqdm

    headline = headline_scores(scores)
    for name in tqdm(headline, desc="bootstrap intervals", disable=not progress, leave=False):
        metrics = detection_metrics(correct, scores[name], n_resamples=n_resamples, seed=seed)
        summary["headline"].append({"score": name, **{k: v.to_dict() for k, v in metrics.items()}})
        for group, mask in groups.items():
            selective = selective_metrics(
                correct[mask], scores[name][mask], n_resamples=n_resamples, seed=seed
            )
            summary["selective"][group].append(
                {"score": name, **{k: v.to_dict() for k, v in selective.items()}}
            )
    for name, values in scores.items():
        summary["auroc"][name] = {g: auroc(correct[m], values[m]) for g, m in groups.items()}
    if "tokur_seeds" in records[0] and one_class is None:
        summary["tokur_seeds"] = seed_statistics(records)
    for name in PROBABILITY_SCORES & set(scores):
        (value,) = bootstrap(
            lambda c, u: ece(c, -u), correct, scores[name], n_resamples=n_resamples, seed=seed
        )
        summary["ece"][name] = value.to_dict()
    return summary
