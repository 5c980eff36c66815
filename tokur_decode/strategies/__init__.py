"""Strategies: recipes and the procedures that run them on any backend.

:class:`~tokur_decode.strategies.recipe.Strategy` (recipes: TOML, dict, shipped names),
:func:`~tokur_decode.strategies.run.generate` (every action type, written once against
:class:`~tokur_decode.strategies.backend.Backend`), the choice among candidates
(:mod:`~tokur_decode.strategies.candidates`). This layer imports only the core; the
backends (:mod:`tokur_decode.hf`, :mod:`tokur_decode.vllm`) are adapters of it.

Example:
    >>> from tokur_decode.strategies import Strategy, available
    >>> Strategy.load("logtoku-abstain").action, "cot-branch" in available()
    ('stop', True)
"""

from .backend import Backend, Decoded, Sampling
from .recipe import Strategy, available
from .run import generate

__all__ = ["Backend", "Decoded", "Sampling", "Strategy", "available", "generate"]
