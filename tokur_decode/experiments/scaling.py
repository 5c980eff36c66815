"""Test-time scaling: accuracy versus the number of sampled candidates N, and versus
the tokens they cost, for voting and selection by each uncertainty score.

Generation happens once (:func:`run_scaling`): per item ``N_max`` sampled candidates
(batched, seeded) with every signal the strategies need, and one greedy answer. The
methods (:mod:`~tokur_decode.experiments.scaling_methods`) are then applied offline to
random subsets of the candidates (:func:`~tokur_decode.experiments.scaling_simulation.
summarize`).

Example:
    >>> from tokur_decode.experiments.scaling_methods import recipe_methods
    >>> [m.name for m in recipe_methods(["self-consistency"])][:1]
    ['self-consistency']
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..core.signals import parse_signals
from ..strategies.backend import Backend
from ..strategies.recipe import Strategy
from .data import Item
from .generations import Generation, generations
from .live import check_recipes, run_recipes, summarize_live
from .runner import RunResult, graded, process
from .scaling_methods import extra_methods, recipe_methods, recipes_temperature
from .scaling_simulation import summarize
from .scoring import trace_scores
from .store import RunStore

__all__ = ["run_scaling"]


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
    if live and "verbalized" in backend.describe():
        raise ValueError("live: recipes run on a decoding backend (not --verbalized)")
    live = check_recipes(live, backend)
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
    temperature = recipes_temperature(strategies) if temperature is None else temperature
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
