"""Recipes run for real and timed: accuracy, tokens and wall-clock seconds per item
(``tokur-decode scale --live``).

The scaling simulation (:mod:`~tokur_decode.experiments.scaling`) answers "what would
N candidates give" from one pool of samples; methods that decide while decoding
(particle filtering resamples between steps, adaptive sampling draws until the vote
is settled) must run. :func:`run_recipes` runs each recipe on a batch of items through
the strategy layer (:func:`tokur_decode.strategies.generate`) and records per item
whether it was right, the tokens the recipe decoded for it (its own count where it
reports one: particle filtering, adaptive sampling, DeepConf online; else its
candidates' tokens, else the answer's) and the batch's wall-clock seconds shared
evenly among its items. :func:`summarize_live` gives accuracy with 95% bootstrap
intervals over items, mean tokens and seconds, and each against the majority vote's.

Example:
    >>> rec = {"live": {"greedy": {"correct": True, "tokens": 10, "seconds": 0.5, "load": 1.0}}}
    >>> summarize_live([rec, rec], n_resamples=10)["methods"]["greedy"]["tokens"]
    10.0
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np

from ..core.result import GenerationResult
from ..strategies.recipe import Strategy
from .data import Item
from .metrics import bootstrap
from .runner import graded

__all__ = ["GREEDY", "MAJORITY", "check_recipes", "run_recipes", "summarize_live"]

#: The live name of plain greedy decoding (no recipe).
GREEDY = "greedy"
#: The recipe the others are compared with (majority@8).
MAJORITY = "self-consistency"


def check_recipes(names: Sequence[str], backend=None) -> list[str]:
    """The live recipe names, validated (``greedy`` or a loadable recipe that
    ``backend``, when given, can run), once each, before anything is sampled.

    Raises:
        ValueError: naming ``live`` (a recipe the backend cannot run: particle filtering
            over HTTP was refused only after the candidate pool was sampled).
    """
    from ..strategies.run import plan

    out = list(dict.fromkeys(names))
    for name in out:
        if name != GREEDY:
            try:
                Strategy.load(name)
                if backend is not None:
                    plan(backend.acts, "q", strategy=name, backend_name=type(backend).__name__)
            except ValueError as exc:
                raise ValueError(f"live: {exc}") from exc
    return out


def _tokens(result: GenerationResult, i: int) -> int:
    actions = result.actions[i] if result.actions else []
    counted = [a["tokens"] for a in actions if "tokens" in a]
    if counted:
        return int(counted[-1])
    if result.candidates:
        return int(result.candidates[i].lengths.sum())
    return int(result.trace.lengths[i])


def run_recipes(
    adapter, items: Sequence[Item], names: Sequence[str], *, max_new_tokens: int, seed: int
) -> list[dict]:
    """Per item, ``{recipe: {"correct", "prediction", "tokens", "seconds", "load"}}`` for
    every recipe of ``names`` run on the strategy-layer backend ``adapter`` over
    ``items`` in one call each (``load``: the machine's one-minute load average when
    the call ended)."""
    from ..strategies.run import generate

    prompts = [item.messages for item in items]
    out: list[dict] = [{} for _ in items]
    for name in names:
        start = time.perf_counter()
        result = generate(
            adapter,
            prompts,
            strategy=None if name == GREEDY else name,
            max_new_tokens=max_new_tokens,
            seed=seed,
        )
        seconds = (time.perf_counter() - start) / len(items)
        load = os.getloadavg()[0]
        for i, item in enumerate(items):
            g = graded(item, result.texts[i])
            out[i][name] = {
                "correct": g["correct"],
                "prediction": g["prediction"],
                "tokens": _tokens(result, i),
                "seconds": seconds,
                "load": load,
            }
    return out


def summarize_live(records: list[dict], *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """``{"n": items, "methods": {name: {"accuracy": interval, "tokens", "seconds",
    "load", "tokens_vs_majority", "seconds_vs_majority"}}}`` over the records' ``live``
    results: means per item (``load``: the mean load average the runs ended at; the
    ratios only when :data:`MAJORITY` ran)."""
    names = list(records[0]["live"])
    table: dict[str, dict] = {}
    for name in names:
        rows = [rec["live"][name] for rec in records]
        right = np.array([float(r["correct"]) for r in rows])
        (iv,) = bootstrap(np.mean, right, n_resamples=n_resamples, seed=seed)
        table[name] = {
            "accuracy": iv.to_dict(),
            "tokens": float(np.mean([r["tokens"] for r in rows])),
            "seconds": float(np.mean([r["seconds"] for r in rows])),
            "load": float(np.mean([r["load"] for r in rows])),
        }
    if MAJORITY in table:
        base = table[MAJORITY]
        for row in table.values():
            row["tokens_vs_majority"] = row["tokens"] / base["tokens"] if base["tokens"] else None
            row["seconds_vs_majority"] = (
                row["seconds"] / base["seconds"] if base["seconds"] else None
            )
    return {"n": len(records), "methods": table}
