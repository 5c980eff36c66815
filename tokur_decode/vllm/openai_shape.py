"""A served trace in the shapes OpenAI clients already read.

vLLM's server answers a request that asks for ``logprobs`` with one entry per generated
token: ``choices[i]["logprobs"]["content"][j]`` (``token``, ``logprob``, ``bytes``,
``top_logprobs``) for a chat completion, parallel lists (``tokens``, ``token_logprobs``,
...) for a completion. :func:`add_to_logprobs` puts each token's signals beside them:
``content[j]["tokur"] = {"entropy": ..., ...}`` (chat), ``logprobs["tokur"][j]``
(completion); where the client asked for ``logprobs`` but not ``top_logprobs`` and the
request recorded alternatives (``tokur_alternatives``), those fill ``top_logprobs``.
:func:`summary_of` gives the response-level scores a recipe or ``calibrate`` reads.

Example:
    >>> trace = {"token_ids": [7], "tokens": ["Paris"], "signals": {"entropy": [0.25]}}
    >>> choice = {"logprobs": {"content": [{"token": "Paris", "logprob": -0.1,
    ...     "bytes": [80], "top_logprobs": []}]}}
    >>> add_to_logprobs(choice, trace, fill_top=False)
    >>> choice["logprobs"]["content"][0]["tokur"]
    {'entropy': 0.25}
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from ..core.trace import Trace

__all__ = ["add_to_logprobs", "summary_of"]

#: What vLLM writes for a log-probability of zero probability (JSON has no -inf).
_NO_PROBABILITY = -9999.0


def summary_of(trace: Mapping[str, Any]) -> dict[str, float]:
    """The response-level scores of one served trace (:meth:`Trace.summary`)."""
    ids = trace["token_ids"]
    signals = {
        k: torch.tensor([v], dtype=torch.float32).reshape(1, len(ids))
        for k, v in trace["signals"].items()
    }
    one = Trace(
        signals=signals,
        token_ids=torch.tensor([ids], dtype=torch.long).reshape(1, len(ids)),
        lengths=torch.tensor([len(ids)]),
    )
    return one.summary()[0] if ids else {"n_tokens": 0}


def _token_signals(trace: Mapping[str, Any], j: int) -> dict[str, float]:
    return {k: v[j] for k, v in trace["signals"].items() if j < len(v)}


def _top_logprobs(trace: Mapping[str, Any], j: int) -> list[dict[str, Any]]:
    alt = trace["alternatives"]
    if j >= len(alt["ids"]):
        return []
    return [
        {
            "token": text,
            "logprob": math.log(p) if p > 0 else _NO_PROBABILITY,
            "bytes": list(text.encode("utf-8")),
        }
        for text, p in zip(alt["tokens"][j], alt["probs"][j], strict=True)
    ]


def add_to_logprobs(choice: dict[str, Any], trace: Mapping[str, Any], *, fill_top: bool) -> None:
    """Each token's signals into ``choice["logprobs"]`` (in place; nothing when the
    client did not ask for log-probabilities); ``fill_top``: ``top_logprobs`` from the
    trace's alternatives where vLLM's are empty."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return
    content = logprobs.get("content")
    if isinstance(content, list):  # chat completion
        top = fill_top and "alternatives" in trace
        for j, entry in enumerate(content):
            entry["tokur"] = _token_signals(trace, j)
            if top and not entry.get("top_logprobs"):
                entry["top_logprobs"] = _top_logprobs(trace, j)
    elif isinstance(logprobs.get("tokens"), list):  # completion
        logprobs["tokur"] = [_token_signals(trace, j) for j in range(len(logprobs["tokens"]))]
