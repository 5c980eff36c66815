"""Test-time scaling: accuracy versus the number of sampled candidates N, and versus
the tokens they cost, for voting and selection by each uncertainty score.

Generation happens once (:func:`run_scaling`): per item ``N_max`` sampled candidates
(batched, seeded) with every signal the strategies need, and one greedy answer. The
analysis (:func:`summarize`) then draws, for each ``N``, ``repeats`` random ordered
subsets of ``N`` candidates per item (seeded by the item) and applies each method:

* ``greedy`` (the extra greedy answer), ``majority`` vote, ``oracle`` (pass@N: some
  candidate is right; an upper bound);
* each recipe (``tokur_decode/strategies/recipes/*.toml``, best-of-n or
  deepconf-online) as configured, with its ``score``, ``reducer``, ``higher_is_better``,
  ``method`` and ``eta``, ``n`` = N;
* for each distinct recipe score, and each extra score the backend gives (e.g. the
  verbalized confidences of :class:`~tokur_decode.verbalized.VerbalizedBackend`):
  ``best-of-N`` (argmax), ``weighted vote`` (weights = softmax of the scores) and
  ``top-eta vote`` (majority among the ``eta`` most confident; the recipe's eta when
  < 1, else ``eta``);
* DeepConf online (recipe type ``deepconf-online``), simulated from the full traces:
  the first ``warmup`` candidates of the subset set the threshold (the ``100 - keep``
  percentile of their lowest group confidence,
  :func:`tokur_decode.core.policy.calibrate_from_traces`);
  each later one is cut at the first token where its ``window``-token group confidence
  (:class:`tokur_decode.core.policy.TriggerState`, from ``window`` tokens on) falls below it,
  as the online stop would; cut candidates leave the vote and count only the tokens
  decoded up to the cut. With ``N <= warmup`` it is the offline vote.

Tokens spent = tokens of the candidates used (greedy: its answer). Accuracy per item is
the mean over the repeats; intervals are 95% bootstraps over items.

Example:
    >>> methods = recipe_methods(["self-certainty-best-of-n", "deepconf-online"])
    >>> [m.name for m in methods][:3]
    ['self-certainty-best-of-n', 'deepconf-online', 'weighted vote self_certainty:mean']
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core import aggregate
from ..core.adaptive import drawn_until_settled
from ..core.policy import Trigger, TriggerState, calibrate_from_traces
from ..core.select import choose, vote
from ..core.signals import parse_signals, signal_of_output
from ..core.trace import Trace
from ..strategies.backend import Backend
from ..strategies.recipe import Strategy
from .data import Item
from .generations import Generation, generations
from .live import check_recipes, run_recipes, summarize_live
from .metrics import bootstrap
from .runner import RunResult, graded, process
from .scoring import trace_scores
from .store import RunStore

__all__ = ["Method", "extra_methods", "recipe_methods", "run_scaling", "summarize"]

_SWEPT = ("best-of-n", "deepconf-online", "adaptive-sampling")


@dataclass(frozen=True)
class Method:
    """How N candidates become one answer.

    ``kind``: ``"select"`` (:func:`tokur_decode.core.select.choose` by ``score:reducer``
    with ``method``, ``eta``, ``eta_rule`` and ``borda_p``) or ``"deepconf-online"``
    (also ``warmup``, ``keep``, ``window``) or ``"adaptive-sampling"`` (``rule``,
    ``step`` answers per round, ``threshold``; the budget is N; majority of the drawn).
    """

    name: str
    kind: str
    score: str
    reducer: str
    higher_is_better: bool = True
    method: str = "argmax"
    eta: float = 1.0
    eta_rule: str = "deepconf"
    borda_p: float = 0.5
    warmup: int = 0
    keep: float = 100.0
    window: int = 2048
    variant: bool = False  # a generic selection by a recipe's score, not a recipe
    rule: str = ""  # adaptive sampling: its stopping rule, answers per round, threshold
    step: int = 0
    threshold: float = 0.95

    @property
    def label(self) -> str:
        """``score:reducer``, or the bare name of an extra score (no reducer)."""
        return f"{self.score}:{self.reducer}" if self.reducer else self.score

    def signals(self) -> set[str]:
        return {signal_of_output(self.score)} if self.reducer else set()


def recipe_methods(strategies: Sequence[str], *, eta: float = 0.5) -> list[Method]:
    """The recipes as configured, then best-of-N, weighted vote and top-``eta`` vote by
    each distinct recipe score (variants equal to a recipe are left out)."""
    if not 0 < eta <= 1:
        raise ValueError(f"eta must be in (0, 1], got {eta}")
    recipes = []
    for name in strategies:
        strat = Strategy.load(name)
        if strat.action not in _SWEPT:
            raise ValueError(
                f"strategies: {strat.name!r} is a {strat.action!r} recipe; the scaling runner "
                f"sweeps {' and '.join(_SWEPT)} recipes"
            )
        p = strat.config
        if strat.action == "adaptive-sampling":
            recipes.append(
                Method(
                    strat.name,
                    "adaptive-sampling",
                    score="",
                    reducer="",
                    rule=p.rule,
                    step=p.window,
                    threshold=float(p.threshold),
                )
            )
            continue
        common = dict(
            score=p.score,
            reducer=p.reducer,
            higher_is_better=p.higher_is_better,
            method=p.method,
            eta=float(p.eta),
            eta_rule=p.eta_rule,
            borda_p=float(p.borda_p),
        )
        if strat.action == "deepconf-online":
            extra = dict(warmup=p.warmup, keep=float(p.keep), window=p.window)
            recipes.append(Method(strat.name, "deepconf-online", **common, **extra))
        else:
            recipes.append(Method(strat.name, "select", **common))
    out = list(recipes)
    seen = {(m.kind, m.label, m.higher_is_better, m.method, m.eta, m.eta_rule) for m in recipes}
    for m in recipes:
        if m.kind == "adaptive-sampling":
            continue
        for v in _variants(m, eta):
            key = ("select", v.label, v.higher_is_better, v.method, v.eta, v.eta_rule)
            if key not in seen:
                seen.add(key)
                out.append(v)
    return out


def extra_methods(names: Sequence[str], *, eta: float = 0.5) -> list[Method]:
    """Best-of-N, weighted vote and top-``eta`` vote by each extra score (a backend's
    response-level confidence, e.g. ``verbalized_combined``; candidates without it rank
    last).

    Example:
        >>> [m.name for m in extra_methods(["verbalized_confidence"])]
        ['best-of-N verbalized_confidence', 'weighted vote verbalized_confidence', \
'Borda vote verbalized_confidence', 'top-0.5 vote verbalized_confidence']
    """
    return [v for name in names for v in _variants(Method(name, "select", name, ""), eta)]


def _variants(m: Method, eta: float) -> list[Method]:
    """Best-of-N, weighted vote, Borda vote and top-eta vote by ``m``'s score (the
    recipe's eta when below 1, else ``eta``; the recipe's eta rule and Borda power)."""
    keep = m.eta if m.eta < 1 else eta
    return [
        Method(
            f"{title} {m.label}",
            "select",
            m.score,
            m.reducer,
            m.higher_is_better,
            method,
            keep_eta,
            eta_rule=m.eta_rule,
            borda_p=m.borda_p,
            window=m.window,
            variant=True,
        )
        for title, method, keep_eta in (
            ("best-of-N", "argmax", 1.0),
            ("weighted vote", "weighted-softmax", 1.0),
            ("Borda vote", "borda", 1.0),
            (f"top-{keep:g} vote", "majority", keep),
        )
    ]


def _temperature(strategies: Sequence[str]) -> float:
    values = {float(Strategy.load(s).config.temperature) for s in strategies}
    if len(values) != 1:
        raise ValueError(
            f"temperature: the recipes sample at {sorted(values)}; candidates are generated "
            "once, so give one temperature"
        )
    return values.pop()


def _candidate(item: Item, gen: Generation, row: int, scores: dict) -> dict:
    trace = gen.trace[row]
    return {
        **graded(item, gen.texts[row]),
        "n_tokens": int(trace.lengths[0]),
        "scores": scores,
        "extra": dict(gen.extra[row]),
        "values": {name: trace.values(name)[0] for name in trace.names},
    }


def run_scaling(
    items: Sequence[Item],
    backend: Backend,
    *,
    out: str | Path,
    ns: Sequence[int] = (1, 2, 4, 8),
    strategies: Sequence[str] = ("self-certainty-best-of-n", "deepconf-online"),
    signals: str | Sequence[str] | None = None,
    temperature: float | None = None,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
    repeats: int = 20,
    eta: float = 0.5,
    batch_size: int = 2,
    n_resamples: int = 1000,
    progress: bool = True,
    live: Sequence[str] = (),
) -> RunResult:
    """Generate ``max(ns)`` candidates and a greedy answer per item (skipping items
    ``out`` already has); return the records of all ``items`` and their :func:`summarize`.

    ``signals`` (default: the recipes' signals and what their scores need) are recorded
    for every candidate; ``temperature`` defaults to the recipes' (they must agree).
    ``live``: recipes (or ``"greedy"``) also run for real on each batch, timed
    (:mod:`~tokur_decode.experiments.live`); their table is ``summary["live"]``.
    """
    live = check_recipes(live)
    if live and "verbalized" in backend.describe():
        raise ValueError("live: recipes run on a decoding backend (not --verbalized)")
    ns = sorted(set(ns))
    if not ns or ns[0] < 1:
        raise ValueError(f"n: candidate counts must be >= 1, got {list(ns)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    methods = recipe_methods(strategies, eta=eta)
    needed = {s for m in methods for s in m.signals()}
    recorded = needed | {s for name in strategies for s in Strategy.load(name).signals}
    names = parse_signals(signals if signals is not None else sorted(recorded))
    missing = needed - set(names)
    if missing:
        raise ValueError(f"signals: the strategies need {sorted(missing)} as well")
    temperature = _temperature(strategies) if temperature is None else temperature
    if not temperature > 0:
        raise ValueError(
            f"temperature: candidates are sampled, so it must be > 0, got {temperature}"
        )
    n_max = ns[-1]
    config = {
        "kind": "scale",
        "n_max": n_max,
        "signals": list(names),
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
        "data": sorted({item.dataset for item in items}),
        **({"live": live} if live else {}),
        **backend.describe(),
    }
    store = RunStore(out, config)

    def work(batch: list[Item], first: int) -> list[dict]:
        prompts = [item.messages for item in batch]
        settings = dict(signals=names, max_new_tokens=max_new_tokens, seed=seed + first)
        sampled = generations(
            backend, prompts, n=n_max, temperature=temperature, top_p=top_p, **settings
        )
        greedy = generations(backend, prompts, **settings)
        ran = (
            run_recipes(backend, batch, live, max_new_tokens=max_new_tokens, seed=seed + first)
            if live
            else [None] * len(batch)
        )
        records = []
        for item, gen, g, timed in zip(batch, sampled, greedy, ran, strict=True):
            scores = trace_scores(gen.trace)
            records.append(
                {
                    "key": item.key,
                    **item.to_dict(),
                    "greedy": {**graded(item, g.texts[0]), "n_tokens": int(g.trace.lengths[0])},
                    "candidates": [_candidate(item, gen, i, scores[i]) for i in range(n_max)],
                    **({"live": timed} if timed is not None else {}),
                }
            )
        return records

    records = process(store, items, work, batch_size=batch_size, desc="scale", progress=progress)
    extras = sorted({k for rec in records for c in rec["candidates"] for k in c["extra"]})
    methods += extra_methods(extras, eta=eta)
    summary = summarize(
        records, ns=ns, methods=methods, repeats=repeats, seed=seed, n_resamples=n_resamples
    )
    if live:
        summary["live"] = summarize_live(records, n_resamples=n_resamples, seed=seed)
    return RunResult(records, summary)


# --------------------------------------------------------------------------- analysis


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
