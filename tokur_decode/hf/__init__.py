"""transformers adapters: the monitoring logits processor and monitored generation.

Example:
    >>> from tokur_decode.hf import UncertaintyMonitor
    >>> UncertaintyMonitor(["entropy"]).spec.output_names
    ('entropy',)
"""

from .generation import GenerationResult, encode_prompts, generate
from .monitor import DEFAULT_SIGNALS, UncertaintyMonitor

__all__ = [
    "DEFAULT_SIGNALS",
    "GenerationResult",
    "UncertaintyMonitor",
    "encode_prompts",
    "generate",
]
