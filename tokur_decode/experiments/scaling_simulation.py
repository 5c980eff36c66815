"""The offline analysis of a scaling run: each method applied to random subsets of each
item's candidates, accuracy and tokens per N.

:func:`summarize` draws, for each ``N``, ``repeats`` random ordered subsets of ``N``
candidates per item (seeded by the item) and applies each
:class:`~tokur_decode.experiments.scaling_methods.Method`. DeepConf online is simulated
from the full traces: the first ``warmup`` candidates of the subset set the threshold
(the ``100 - keep`` percentile of their lowest group confidence,
:func:`tokur_decode.core.policy.calibrate_from_traces`); each later one is cut at the
first token where its ``window``-token group confidence
(:class:`tokur_decode.core.policy.TriggerState`, from ``window`` tokens on) falls below
it, as the online stop would; cut candidates leave the vote and count only the tokens
decoded up to the cut. With ``N <= warmup`` it is the offline vote. Adaptive sampling
draws until its rule says the vote is settled.

Tokens spent = tokens of the candidates used (greedy: its answer). Accuracy per item is
the mean over the repeats; intervals are 95% bootstraps over items.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np
import torch

from ..core import aggregate
from ..core.adaptive import drawn_until_settled
from ..core.policy import Trigger, TriggerState, calibrate_from_traces
from ..core.select import choose, vote
from ..core.trace import Trace
from .metrics import bootstrap
from .scaling_methods import Method

__all__ = ["summarize"]


def _padded(rows: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows])
    values = torch.zeros(len(rows), max(1, int(lengths.max())))
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.tensor(r)
    return values, lengths


def _confidences(cands: list[dict], m: Method) -> np.ndarray:
    """Each candidate's score for ``m``, oriented so that higher is more confident."""
    if m.reducer.startswith("deepconf") and m.window != 2048:
        values, lengths = _padded([c["values"][m.score] for c in cands])
        raw = aggregate.reduce(m.reducer, values, lengths, window=m.window).tolist()
    elif not m.reducer:  # an extra score; candidates without it rank last
        present = [c["extra"][m.label] for c in cands if m.label in c["extra"]]
        floor = min(present, default=0.0) - 1.0
        raw = [c["extra"].get(m.label, floor) for c in cands]
    else:
        raw = [c["scores"][m.label] for c in cands]
    return np.asarray(raw) if m.higher_is_better else -np.asarray(raw)


def _pick(answers: list, conf: np.ndarray, m: Method) -> int:
    return choose(answers, conf.tolist(), m.method, m.eta, eta_rule=m.eta_rule, borda_p=m.borda_p)


def _deepconf_online(cands, conf, subsets: np.ndarray, m: Method) -> tuple[np.ndarray, np.ndarray]:
    """Correctness and tokens of DeepConf online for each ordered subset (row)."""
    n = subsets.shape[1]
    lengths = np.array([c["n_tokens"] for c in cands])
    answers = [c["prediction"] for c in cands]
    correct = np.zeros(len(subsets))
    tokens = np.zeros(len(subsets))
    if n <= m.warmup:
        for r, idx in enumerate(subsets):
            pick = idx[_pick([answers[i] for i in idx], conf[idx], m)]
            correct[r], tokens[r] = cands[pick]["correct"], lengths[idx].sum()
        return correct, tokens
    base = Trigger("deepconf", direction="below", window=m.window, min_tokens=m.window)
    thresholds = []
    for idx in subsets:
        warm_values, warm_lengths = _padded(
            [cands[i]["values"]["deepconf"] for i in idx[: m.warmup]]
        )
        warm = Trace({"deepconf": warm_values}, torch.zeros_like(warm_values).long(), warm_lengths)
        thresholds += [calibrate_from_traces(base, warm, 100 - m.keep).threshold] * (n - m.warmup)
    later = subsets[:, m.warmup :].reshape(-1)
    values, later_lengths = _padded([cands[i]["values"]["deepconf"] for i in later])
    state = TriggerState(base, len(later), "cpu", thresholds=thresholds)
    cut_at = torch.full((len(later),), -1)
    for step in range(values.shape[1]):
        fired = state.update(values[:, step], step, active=later_lengths > step)
        cut_at = torch.where((cut_at < 0) & fired, step, cut_at)
    cut = (cut_at >= 0).numpy().reshape(len(subsets), -1)
    spent = torch.where(cut_at >= 0, cut_at + 1, later_lengths).numpy().reshape(len(subsets), -1)
    for r, idx in enumerate(subsets):
        kept = list(idx[: m.warmup]) + [
            i for i, c in zip(idx[m.warmup :], cut[r], strict=True) if not c
        ]
        pick = kept[_pick([answers[i] for i in kept], conf[kept], m)]
        correct[r] = cands[pick]["correct"]
        tokens[r] = lengths[idx[: m.warmup]].sum() + spent[r].sum()
    return correct, tokens


def _adaptive(answers, right, lengths, subsets: np.ndarray, m: Method) -> tuple[float, float]:
    """Mean correctness and tokens of adaptive sampling over the ordered subsets: the
    candidates are drawn in their order, ``m.step`` at a time, until the rule settles."""
    correct, tokens = [], []
    for idx in subsets:
        drawn = idx[
            : drawn_until_settled(
                [answers[i] for i in idx], window=m.step, rule=m.rule, threshold=m.threshold
            )
        ]
        ballots = [answers[i] for i in drawn]
        winner = vote(ballots, method="majority")
        correct.append(right[drawn[ballots.index(winner)]])
        tokens.append(lengths[drawn].sum())
    return float(np.mean(correct)), float(np.mean(tokens))


def _per_item(rec: dict, n: int, methods: list[Method], repeats: int, seed: int) -> dict:
    """Mean correctness and tokens over ``repeats`` subsets of ``n`` candidates, per method."""
    cands = rec["candidates"]
    rng = np.random.default_rng([seed, zlib.crc32(rec["key"].encode()), n])
    subsets = np.stack([rng.permutation(len(cands))[:n] for _ in range(repeats)])
    answers = [c["prediction"] for c in cands]
    right = np.array([c["correct"] for c in cands], dtype=float)
    lengths = np.array([c["n_tokens"] for c in cands], dtype=float)
    spent = lengths[subsets].sum(axis=1)
    out = {
        "greedy": (float(rec["greedy"]["correct"]), float(rec["greedy"]["n_tokens"])),
        "oracle": (right[subsets].max(axis=1).mean(), spent.mean()),
    }
    winners = [vote([answers[i] for i in idx], method="majority") for idx in subsets]
    out["majority"] = (
        np.mean(
            [
                any(right[i] for i in idx if answers[i] == w)
                for idx, w in zip(subsets, winners, strict=True)
            ]
        ),
        spent.mean(),
    )
    for m in methods:
        if m.kind == "adaptive-sampling":
            out[m.name] = _adaptive(answers, right, lengths, subsets, m)
            continue
        conf = _confidences(cands, m)
        if m.kind == "deepconf-online":
            correct, tokens = _deepconf_online(cands, conf, subsets, m)
            out[m.name] = (correct.mean(), tokens.mean())
        else:
            picks = [idx[_pick([answers[i] for i in idx], conf[idx], m)] for idx in subsets]
            out[m.name] = (right[picks].mean(), spent.mean())
    return out


def summarize(
    records: list[dict],
    *,
    ns: Sequence[int],
    methods: list[Method],
    repeats: int = 20,
    seed: int = 0,
    n_resamples: int = 1000,
) -> dict:
    """Accuracy (mean over items of the per-item mean over ``repeats`` subsets, with a
    95% bootstrap interval over items) and mean tokens per item, per method and N.

    Returns ``{"n": items, "ns": [...], "repeats": ..., "primary": [greedy, majority and
    the recipes], "methods": {name: {str(N): {"accuracy": ..., "tokens": ...}}}}``
    (``greedy`` does not depend on N).
    """
    if not records:
        raise ValueError("records: nothing to summarize")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    n_max = len(records[0]["candidates"])
    if max(ns) > n_max:
        raise ValueError(f"n: {max(ns)} candidates asked for, the run has {n_max} per item")
    table: dict[str, dict] = {}
    for n in ns:
        per_item = [_per_item(rec, n, methods, repeats, seed) for rec in records]
        for name in per_item[0]:
            acc = np.array([p[name][0] for p in per_item])
            (iv,) = bootstrap(np.mean, acc, n_resamples=n_resamples, seed=seed)
            table.setdefault(name, {})[str(n)] = {
                "accuracy": iv.to_dict(),
                "tokens": float(np.mean([p[name][1] for p in per_item])),
            }
    primary = ["greedy", "majority", *(m.name for m in methods if not m.variant)]
    return {
        "n": len(records),
        "ns": list(ns),
        "repeats": repeats,
        "primary": primary,
        "methods": table,
    }
