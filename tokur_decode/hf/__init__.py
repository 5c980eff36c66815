"""transformers adapters: logits processors (and, later, the controller loop).

Example:
    >>> from tokur_decode.hf import UncertaintyMonitor
    >>> UncertaintyMonitor(["entropy"]).spec.output_names
    ('entropy',)
"""

from .monitor import DEFAULT_SIGNALS, UncertaintyMonitor

__all__ = ["DEFAULT_SIGNALS", "UncertaintyMonitor"]
