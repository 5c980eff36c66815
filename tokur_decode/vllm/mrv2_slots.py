"""The uncertainty processor's bookkeeping under vLLM's Model Runner V2 (MRV2: the
default on GPU builds from vLLM 0.31, the only runner from 0.34).

MRV2's contract (``vllm/v1/worker/gpu/sample/logits_processor/interface.py``, the same
in 0.31 to 0.34) differs from V1's in what it tells a processor, and
:class:`MRV2Slots` maps it onto the
:class:`~tokur_decode.vllm.processor_core.ProcessorCore`:

* **Persistent vLLM slots, recycled without notice.** ``add_request(slot, params)``
  announces a request; nothing announces that one left. A request ends when its slot
  is given to another (its output tokens are read back from the slot then: the new
  occupant's writes are still staged), when the caller collects it, or, for
  ``collect()`` of everything, when it was not in the last step's batch. A request
  re-added under its id after a preemption takes its recorded steps back (its trigger
  starts afresh).
* **Rows reordered every step** (``ctx.idx_mapping_np``: row -> slot, on the host): the
  row -> request map and the groups are rebuilt only when that layout changes. Once
  the worker extension binds the runner, the layout is taken from the batch MRV2
  builds before the forward (:func:`~tokur_decode.vllm.internals.on_batch`), so that
  TokUR's model knows which rows ask for its samples, as under V1.
* **A row's step** is computed on the device: ``max(0, ctx.pos + 1 - prompt_len)`` (a
  chunked prefill's partial chunks are step 0, overwritten by the last); its last
  output token is ``all_token_ids[slot, ctx.pos]``.
* **Speculative decoding** gives a request one row per draft token, and which of them
  are accepted is known only after sampling: refused when the processor is built,
  naming ``speculative_config`` (:func:`tokur_decode.vllm.engine_args` refuses it
  before the engine starts).
* **Thinking-budget forcing** runs after the processors and wins: a stop whose EOS it
  overrode is recorded as such (``blocked``), found from the token that was emitted.

Example:
    >>> from tokur_decode.vllm import UncertaintyProcessor                   # doctest: +SKIP
    >>> llm = LLM(model=path, logits_processors=[UncertaintyProcessor],
    ...           worker_extension_cls="tokur_decode.vllm.worker.TraceExtension")  # doctest: +SKIP
"""

from __future__ import annotations

import numpy as np
import torch

from . import internals
from .processor_core import ProcessorCore, TrackedRequest

__all__ = ["MRV2Slots"]


class MRV2Slots:
    """vLLM's persistent slots and per-step rows -> the core's requests."""

    def __init__(self, vllm_config, req_states) -> None:
        if getattr(vllm_config, "speculative_config", None) is not None:
            raise ValueError(
                "speculative_config: tokur-decode's processor records one row per request "
                "and step; under speculative decoding a request has one row per draft "
                "token and which are accepted is known only after sampling"
            )
        device = torch.device(req_states.device)
        self.core = ProcessorCore(vllm_config, device, pin_memory=device.type == "cuda")
        self.states = req_states
        self._by_slot: dict[int, TrackedRequest] = {}  # vLLM slot -> opted-in request
        self._prompt: dict[int, int] = {}  # vLLM slot -> its request's prompt length
        self._layout: np.ndarray | None = None  # the last step's idx_mapping
        self._dirty = True  # requests came or went since the groups were built

    def bind(self, runner) -> None:
        """Name the requests through the runner's slots (traces are kept once bound) and
        learn each step's rows before the forward."""
        self.core.runner = runner
        for slot, req in self._by_slot.items():
            req.req_id = internals.mrv2_request_id(runner, slot)
        internals.on_batch(runner, self.lay_out)

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

    def peek(self, starts: dict[str, int]) -> list[dict]:
        """See :meth:`~tokur_decode.vllm.processor_core.ProcessorCore.peek`."""
        return self.core.peek(starts)

    def add_request(self, slot: int, sampling_params) -> bool:
        old = self._by_slot.pop(slot, None)
        if old is not None:
            self._end(old, slot)
        req = self.core.new_request(sampling_params, [])
        if req is None:
            return False
        runner = self.core.runner
        if runner is not None:
            req.req_id = internals.mrv2_request_id(runner, slot)
            for other_slot, other in list(self._by_slot.items()):  # its preempted self
                if other.req_id == req.req_id:
                    del self._by_slot[other_slot]
                    self._end(other, other_slot)
            self.core.resume(req)  # preempted and back: its steps so far
        self._by_slot[slot] = req
        self._prompt[slot] = int(self.states.prompt_len.np[slot])
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

    def lay_out(self, idx: np.ndarray) -> None:
        """This step's rows (row -> vLLM slot): requests that were in the last batch and
        are not in this one complete their pending values; the groups are rebuilt when
        the layout changed."""
        if not self._dirty and np.array_equal(idx, self._layout):
            return
        self._left(set(idx.tolist()))
        self._layout, self._dirty = np.array(idx, copy=True), False
        by_slot = self._by_slot
        core = self.core
        core.rows = {row: by_slot[s] for row, s in enumerate(idx.tolist()) if s in by_slot}
        core.regroup()

    def _left(self, staying: set[int]) -> None:
        """Complete the pending values of the requests that were in the last batch and
        are not in this one (their slots still hold their tokens), on the device. A slot
        given to a new request since has nothing pending."""
        core, states = self.core, self.states
        gone = [] if self._layout is None else set(self._layout.tolist()) - staying
        for slot in gone:
            req = self._by_slot.get(slot)
            if req is None:
                continue
            total = states.total_len.gpu[slot : slot + 1].long()
            last = states.all_token_ids.gpu[slot].index_select(0, total - 1).long()
            core.hold(req, total - self._prompt[slot], last)

    def apply(self, logits: torch.Tensor, ctx) -> torch.Tensor:
        self.lay_out(ctx.idx_mapping_np)
        core = self.core
        if not core.groups:
            return logits
        prompt = self.states.prompt_len.gpu
        idx = ctx.idx_mapping_np
        top = int((ctx.seq_lens_upper_bound_np - self.states.prompt_len.np[idx]).max())
        for g in core.groups:
            slots = ctx.idx_mapping.index_select(0, g.rows).long()
            at = ctx.pos.index_select(0, g.rows).long()
            pos = (at + 1 - prompt.index_select(0, slots).long()).clamp_min(0)
            last = self.states.all_token_ids.gpu[slots, at].long()
            core.apply_group(g, logits, pos, last, max(top, 0))
        return logits
