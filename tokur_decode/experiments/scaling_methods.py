"""The methods of a scaling run: how N candidates become one answer.

* ``greedy`` (the extra greedy answer), ``majority`` vote, ``oracle`` (pass@N: some
  candidate is right; an upper bound);
* each recipe (``tokur_decode/strategies/recipes/*.toml``: best-of-n, deepconf-online
  or adaptive-sampling) as configured, with its ``score``, ``reducer``,
  ``higher_is_better``, ``method`` and ``eta``, ``n`` = N;
* for each distinct recipe score, and each extra score the backend gives (e.g. the
  verbalized confidences of :class:`~tokur_decode.verbalized.VerbalizedBackend`):
  ``best-of-N`` (argmax), ``weighted vote`` (weights = softmax of the scores) and
  ``top-eta vote`` (majority among the ``eta`` most confident; the recipe's eta when
  < 1, else ``eta``).

Example:
    >>> methods = recipe_methods(["self-certainty-best-of-n", "deepconf-online"])
    >>> [m.name for m in methods][:3]
    ['self-certainty-best-of-n', 'deepconf-online', 'weighted vote self_certainty:mean']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..core.signals import signal_of_output
from ..strategies.recipe import Strategy

__all__ = ["Method", "extra_methods", "recipe_methods", "recipes_temperature"]


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


def recipes_temperature(strategies: Sequence[str]) -> float:
    values = {float(Strategy.load(s).config.temperature) for s in strategies}
    if len(values) != 1:
        raise ValueError(
            f"temperature: the recipes sample at {sorted(values)}; candidates are generated "
            "once, so give one temperature"
        )
    return values.pop()
