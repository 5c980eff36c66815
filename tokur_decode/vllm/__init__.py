"""vLLM integration: uncertainty signals, traces and actions inside stock vLLM.

Register :class:`UncertaintyProcessor` on the engine (:class:`UncertaintyProcessorV2` on
an engine running vLLM's Model Runner V2, ``VLLM_USE_V2_MODEL_RUNNER=1``), opt requests in with
:func:`uncertainty_args` (flat ``extra_args`` keys, also ``vllm_xargs`` over HTTP), read
each request's :class:`~tokur_decode.core.trace.Trace` with :func:`read_traces`.
:func:`llm` builds an engine with both the processor and the worker extension that
returns traces (:mod:`tokur_decode.vllm.worker`). :func:`generate` answers prompts on
such an engine with the transformers path's result type (``tokur-decode generate
--backend vllm``). :func:`tokur_engine_args` adds TokUR's perturbed samples (the
``"tokur"`` signal; :mod:`tokur_decode.vllm.tokur`).

This package imports ``vllm`` (absolute imports: the top-level ``vllm`` package, never
this one).

Example:
    >>> from vllm import SamplingParams
    >>> import tokur_decode.vllm as tv
    >>> engine = tv.llm(enforce_eager=True, max_model_len=1024)    # doctest: +SKIP
    >>> params = SamplingParams(max_tokens=64, temperature=0, extra_args=tv.uncertainty_args(
    ...     signals=["entropy", "logtoku"], strategy="logtoku-abstain"))
    >>> outs = engine.generate(["Who won the 1937 Tour de France?"], params)  # doctest: +SKIP
    >>> tv.read_traces(engine, outs)[0].meta["actions"]            # doctest: +SKIP
    [[{'action': 'stop', 'step': 3, 'signal': 'logtoku_epistemic', ...}]]
"""

from ..core.text import prompt_token_ids
from .args import RequestSettings, parse_settings, uncertainty_args
from .backend import VLLMBackend
from .client import EXTENSION, PROCESSOR, enable_traces, engine_args, llm, read_traces
from .generation import generate
from .processor import UncertaintyProcessor
from .tokur import tokur_engine_args
from .worker import TraceExtension

try:  # Model Runner V2 (GPU builds from vLLM 0.31): import-light, absent before
    from .processor_v2 import UncertaintyProcessorV2
except ImportError:  # pragma: no cover
    UncertaintyProcessorV2 = None

__all__ = [
    "EXTENSION",
    "PROCESSOR",
    "RequestSettings",
    "TraceExtension",
    "UncertaintyProcessor",
    "UncertaintyProcessorV2",
    "VLLMBackend",
    "enable_traces",
    "engine_args",
    "generate",
    "llm",
    "parse_settings",
    "prompt_token_ids",
    "read_traces",
    "tokur_engine_args",
    "uncertainty_args",
]
