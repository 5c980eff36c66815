"""Monitored generation with transformers: prompts in; texts, traces and actions out.

:func:`generate` is :func:`tokur_decode.strategies.generate` on an
:class:`~tokur_decode.hf.HFBackend`.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.result import GenerationResult
from ..strategies import run
from .backend import HFBackend

__all__ = ["generate"]


def generate(
    model, tokenizer, prompts: str | Sequence[str], *, chat: bool | None = None, **options
) -> GenerationResult:
    """Generate answers to ``prompts`` while recording uncertainty signals, and act on
    them when a ``strategy`` (a shipped recipe name, a TOML path, a dict or a
    :class:`~tokur_decode.strategies.recipe.Strategy`) says so.

    ``options`` are those of :func:`tokur_decode.strategies.generate` (``strategy``,
    ``signals``, ``max_new_tokens``, ``temperature``, ``top_p``, ``seed``,
    ``threshold``, ``tokur``, ``extract``) and the signal pass's (``logtoku_k``,
    ``deepconf_k``, ``logtoku_evidence``), which with ``chat`` configure the
    :class:`~tokur_decode.hf.HFBackend`. When the signals include ``"tokur"``,
    generation runs inside :func:`~tokur_decode.hf.perturbed` with the options in
    ``tokur``, key by key over the strategy's ``[tokur]`` table, else its defaults.

    Example:
        >>> from tokur_decode.models import load_default
        >>> model, tok = load_default()                                  # doctest: +SKIP
        >>> result = generate(model, tok, "What is the capital of France?",
        ...                   strategy="logtoku-abstain")                 # doctest: +SKIP
        >>> result.texts[0], result.actions[0]                           # doctest: +SKIP
    """
    signal_params, options = run.split_options(options)
    backend = HFBackend(model, tokenizer, chat=chat, **signal_params)
    return run.generate(backend, prompts, **options)
