"""Uncertainty as a production signal, on vLLM's ``/metrics`` (Prometheus).

The trace middleware (:mod:`tokur_decode.vllm.server`) records every opted-in response
it sends, in the ``prometheus_client`` registry vLLM's server exposes, named like vLLM's
own families (``vllm:...``) but prefixed ``tokur:``, labelled by ``model_name`` and, where
a family has several kinds, by a label from a fixed set (no per-request labels):

===============================  =========================================================
``tokur:requests_total``         opted-in responses traced
``tokur:tokens_total``           tokens traced; ``tokur:tokur_tokens_total`` those with
                                 TokUR's samples (each step's M perturbed rows)
``tokur:response_score``         histogram of each response-level score the requests
                                 recorded (label ``score``: ``mean_entropy``,
                                 ``logtoku_topk_mean``, ``naive``, ...)
``tokur:actions_total``          actions taken (labels ``action``: stop, resample, ...;
                                 ``outcome``: taken, blocked, overridden)
``tokur:trace_bytes_total``      bytes of the traces sent (JSON or packed)
===============================  =========================================================

A Grafana dashboard over them: ``docs/grafana-tokur.json``.

Example:
    >>> sorted(FAMILIES)[:2]
    ['tokur:actions', 'tokur:requests']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import REGISTRY, Counter, Histogram

from ..core.events import BLOCKED, OVERRIDDEN

__all__ = ["FAMILIES", "record_response"]

#: Scores span probabilities (0-1), entropies (nats) and DeepConf's confidences (0-20).
_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0)


def _family(kind, name: str, text: str, labels: tuple[str, ...], **kwargs):
    """The metric ``name``, created once per process (a second import, as a test's,
    finds it in the registry)."""
    existing = REGISTRY._names_to_collectors.get(name)
    return existing if existing is not None else kind(name, text, labels, **kwargs)


#: name -> family (``prometheus_client`` adds ``_total`` to counters' samples).
FAMILIES = {
    "tokur:requests": _family(
        Counter, "tokur:requests", "Opted-in responses traced.", ("model_name",)
    ),
    "tokur:tokens": _family(Counter, "tokur:tokens", "Tokens traced.", ("model_name",)),
    "tokur:tokur_tokens": _family(
        Counter,
        "tokur:tokur_tokens",
        "Tokens traced with TokUR's perturbed samples.",
        ("model_name",),
    ),
    "tokur:response_score": _family(
        Histogram,
        "tokur:response_score",
        "Response-level uncertainty scores of the traced responses.",
        ("model_name", "score"),
        buckets=_BUCKETS,
    ),
    "tokur:actions": _family(
        Counter,
        "tokur:actions",
        "Actions the uncertainty triggers took.",
        ("model_name", "action", "outcome"),
    ),
    "tokur:trace_bytes": _family(
        Counter, "tokur:trace_bytes", "Bytes of the traces sent.", ("model_name",)
    ),
}

_OUTCOMES = {None: "taken", BLOCKED: "blocked", OVERRIDDEN: "overridden"}


def record_response(
    model: str, trace: Mapping[str, Any], summary: Mapping[str, float], size: int
) -> None:
    """Count one traced response: its tokens, scores, actions and trace bytes."""
    n = len(trace["token_ids"]) if isinstance(trace["token_ids"], list) else 0
    FAMILIES["tokur:requests"].labels(model).inc()
    FAMILIES["tokur:tokens"].labels(model).inc(summary.get("n_tokens", n))
    if "tokur_total" in trace["signals"]:
        FAMILIES["tokur:tokur_tokens"].labels(model).inc(summary.get("n_tokens", n))
    for score, value in summary.items():
        if score != "n_tokens" and value == value:  # NaN (TokUR without its model): skipped
            FAMILIES["tokur:response_score"].labels(model, score).observe(value)
    for event in trace.get("events", []):
        outcome = _OUTCOMES.get(event.get("blocked"), "blocked")
        FAMILIES["tokur:actions"].labels(model, str(event.get("action")), outcome).inc()
    FAMILIES["tokur:trace_bytes"].labels(model).inc(size)
