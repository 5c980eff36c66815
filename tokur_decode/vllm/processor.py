"""The vLLM (V1 interface) logits processor: signals, traces and actions per request.

vLLM builds one :class:`UncertaintyProcessor` per engine worker (register the class with
``LLM(logits_processors=[UncertaintyProcessor])``); requests opt in through
``SamplingParams(extra_args=uncertainty_args(...))`` (:mod:`tokur_decode.vllm.args`).

This adapter maps V1's batch churn (``BatchUpdate``: removed, added and moved rows) onto
the :class:`~tokur_decode.vllm.processor_core.ProcessorCore`, which does the work.
Requests are recognised by their ``SamplingParams`` object (the worker keeps the same
one for a request's life); a request that leaves the batch without finishing keeps its
state until it comes back.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from . import internals
from .processor_core import KEYS, ProcessorCore, validate_params

__all__ = ["KEYS", "UncertaintyProcessor"]


class UncertaintyProcessor(LogitsProcessor):
    """Records uncertainty signals of opted-in requests and acts on them (V1 interface).

    Example:
        >>> from vllm import SamplingParams
        >>> from tokur_decode.vllm import llm, read_traces, uncertainty_args
        >>> engine = llm(model_path)  # LLM(...) with this processor, traces on  # doctest: +SKIP
        >>> params = SamplingParams(max_tokens=64, extra_args=uncertainty_args(
        ...     signals=["entropy", "logtoku"], strategy="logtoku-abstain"))  # doctest: +SKIP
        >>> traces = read_traces(engine, engine.generate(prompts, params))  # doctest: +SKIP
    """

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """See :func:`tokur_decode.vllm.processor_core.validate_params`."""
        validate_params(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.core = ProcessorCore(vllm_config, device, is_pin_memory)

    def is_argmax_invariant(self) -> bool:
        """``False``: vLLM skips argmax-invariant processors for greedy batches and hands
        them temperature-scaled logits; the signals need the raw logits at every step,
        and the stop and resample actions change the argmax."""
        return False

    def bind(self, runner) -> None:
        """Called by the worker extension: lets the processor name requests (traces are
        kept only once bound) and tell a finished request from a preempted one."""
        self.core.runner = runner
        ids = internals.v1_request_ids(runner)
        for row, req in self.core.rows.items():
            req.req_id = ids[row]

    def collect(self, request_ids=None) -> list[dict]:
        """See :meth:`~tokur_decode.vllm.processor_core.ProcessorCore.collect`."""
        return self.core.collect(request_ids)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        rows = self.core.rows
        for row in batch_update.removed:
            self._leave(row)
        for row, params, _prompt, outputs in batch_update.added:
            self._leave(row)  # an add may replace a removed request (not in `removed`)
            self._enter(row, params, outputs)
        for a, b, kind in batch_update.moved:
            if kind == MoveDirectionality.SWAP:
                ra, rb = rows.pop(a, None), rows.pop(b, None)
                if rb is not None:
                    rows[a] = rb
            else:  # a one-way move replaces b's request (a removal vLLM folded in)
                self._leave(b)
                ra = rows.pop(a, None)
            if ra is not None:
                rows[b] = ra
        if self.core.runner is not None:  # named by their final rows (adds may have moved)
            ids = internals.v1_request_ids(self.core.runner)
            for row, req in rows.items():
                req.req_id = ids[row]
        self.core.regroup()

    def _enter(self, row: int, params, outputs: list[int]) -> None:
        core = self.core
        req = core.request_of(params) or core.new_request(params, outputs)
        if req is None:
            return
        req.outputs = outputs  # a resumed request may come back with a new list
        core.rows[row] = req

    def _leave(self, row: int) -> None:
        core = self.core
        req = core.rows.pop(row, None)
        if req is None:
            return
        if core.runner is not None and internals.is_scheduled(core.runner, req.req_id):
            core.hold(req)  # preempted or not scheduled this step: it keeps its slot
            return
        core.drop(req)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        core = self.core
        for g in core.groups:
            pos = [len(out) for out in g.outputs]
            last = [out[-1] if out else 0 for out in g.outputs] if g.chosen else []
            core.apply_group(g, logits, core.tensor(pos), core.tensor(last), max(pos))
        return logits
