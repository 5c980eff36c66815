"""tokur-decode: uncertainty-guided decoding for LLMs.

Token-level uncertainty signals (:mod:`tokur_decode.core.signals`), response-level
aggregates (:mod:`tokur_decode.core.aggregate`), traces (:mod:`tokur_decode.core.trace`), the
transformers monitor, TokUR and actions (:mod:`tokur_decode.hf`), triggers
(:mod:`tokur_decode.core.policy`) and strategy recipes (:mod:`tokur_decode.strategies.recipe`).
The names below are imported lazily, so ``import tokur_decode`` stays cheap.

Example:
    >>> import tokur_decode
    >>> tokur_decode.UncertaintyMonitor.__name__
    'UncertaintyMonitor'
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "SignalSpec": "tokur_decode.core.signals",
    "compute_signals": "tokur_decode.core.signals",
    "Strategy": "tokur_decode.strategies.recipe",
    "Trace": "tokur_decode.core.trace",
    "UncertaintyMonitor": "tokur_decode.hf",
    "generate": "tokur_decode.hf",
    "load_default": "tokur_decode.models",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tokur_decode' has no attribute {name!r}")
