"""transformers adapters: the monitoring logits processor, monitored generation, and
TokUR's perturbed samples.

Example:
    >>> from tokur_decode.hf import UncertaintyMonitor
    >>> UncertaintyMonitor(["entropy"]).spec.output_names
    ('entropy',)
"""

from .generation import GenerationResult, encode_prompts, generate
from .monitor import DEFAULT_SIGNALS, SAMPLE_SIGNALS, UncertaintyMonitor
from .tokur import PerturbedModel, perturbed

__all__ = [
    "DEFAULT_SIGNALS",
    "SAMPLE_SIGNALS",
    "GenerationResult",
    "PerturbedModel",
    "UncertaintyMonitor",
    "encode_prompts",
    "generate",
    "perturbed",
]
