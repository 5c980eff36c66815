"""transformers adapters: the monitoring logits processor, the stop and resample
processors, monitored generation, and TokUR's perturbed samples.

Example:
    >>> from tokur_decode.hf import UncertaintyMonitor
    >>> UncertaintyMonitor(["entropy"]).spec.output_names
    ('entropy',)
"""

from .actions import ResampleOnTrigger, StopOnTrigger
from .backend import HFBackend
from .generation import generate
from .monitor import UncertaintyMonitor
from .tokur import PerturbedModel, perturbed

__all__ = [
    "HFBackend",
    "PerturbedModel",
    "ResampleOnTrigger",
    "StopOnTrigger",
    "UncertaintyMonitor",
    "generate",
    "perturbed",
]
