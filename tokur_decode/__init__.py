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
    >>> from tokur_decode import Trigger, signals
    >>> Trigger("entropy", threshold=2.0).signal, signals.__name__
    ('entropy', 'tokur_decode.core.signals')
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: The public names: what the README's examples use, each from where it is defined.
_LAZY = {
    "SignalSpec": "tokur_decode.core.signals",
    "compute_signals": "tokur_decode.core.signals",
    "Trigger": "tokur_decode.core.policy",
    "PerturbationConfig": "tokur_decode.core.perturbation",
    "Strategy": "tokur_decode.strategies.recipe",
    "Trace": "tokur_decode.core.trace",
    "UncertaintyMonitor": "tokur_decode.hf",
    "StopOnTrigger": "tokur_decode.hf",
    "ResampleOnTrigger": "tokur_decode.hf",
    "perturbed": "tokur_decode.hf",
    "generate": "tokur_decode.hf",
    "load_default": "tokur_decode.models",
    "parse_response": "tokur_decode.core.packing",
    "RemoteBackend": "tokur_decode.vllm.remote",  # needs no vLLM installed
}
#: Public modules (the signal functions, the response-level aggregates).
_MODULES = {
    "signals": "tokur_decode.core.signals",
    "aggregate": "tokur_decode.core.aggregate",
}

__all__ = ["__version__", *_LAZY, *_MODULES]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'tokur_decode' has no attribute {name!r}")
