"""Worker extension: the route by which traces leave vLLM's worker process.

vLLM runs logits processors inside its worker (a separate process by default). Passing
``worker_extension_cls="tokur_decode.vllm.worker.TraceExtension"`` to ``LLM`` mixes
these methods into the worker, and ``llm.collective_rpc(name, args=...)`` calls them
there (:func:`tokur_decode.vllm.llm` and :func:`tokur_decode.vllm.read_traces` do it
for you):

* ``tokur_bind()`` hands the model runner (V1 or MRV2) to every
  :class:`UncertaintyProcessor`, so that it names requests by their vLLM request id,
  tells a finished request from a preempted one and, under MRV2, learns each step's
  rows before the forward; traces are kept only once bound.
* ``tokur_collect(request_ids)`` returns the finished traces (plain Python values) and
  forgets them.
* ``tokur_peek(starts)`` returns what is recorded so far of live requests (a streaming
  server's per-chunk read), forgetting nothing.
* ``tokur_stats()`` counts the opted-in requests seen, those tracked now and the
  finished traces waiting to be collected, and says whether the worker has TokUR's
  model (what the server's ``GET /v1/tokur/stats`` shows).
* ``tokur_check(mode)`` (diagnostics of a TokUR engine's batched mode, e.g. on new
  hardware): returns what the checks found so far, forgets it, and sets the mode.
"""

from __future__ import annotations

from . import internals
from .processor import UncertaintyProcessor
from .tokur import link_of

__all__ = ["TraceExtension"]


class TraceExtension:
    """Methods mixed into vLLM's worker class (``LLM(worker_extension_cls=...)``)."""

    def _tokur_processors(self) -> list:
        procs = internals.logits_processors(self.model_runner)
        return [p for p in procs if isinstance(p, UncertaintyProcessor)]

    def tokur_bind(self) -> int:
        """Bind every uncertainty processor of this worker; returns how many."""
        procs = self._tokur_processors()
        for proc in procs:
            proc.bind(self.model_runner)
        return len(procs)

    def tokur_collect(self, request_ids: list[str] | None = None) -> list[dict]:
        """Finished traces whose vLLM request id is in ``request_ids`` (all if None)."""
        return [t for proc in self._tokur_processors() for t in proc.collect(request_ids)]

    def tokur_peek(self, starts: dict[str, int]) -> list[dict]:
        """What is recorded so far of the requests in ``starts`` (vLLM request id ->
        first step wanted), forgetting nothing: a streaming server's per-chunk read."""
        return [t for proc in self._tokur_processors() for t in proc.peek(starts)]

    def tokur_stats(self) -> dict:
        """``{"requests", "tracked", "unread"}`` (see ``ProcessorCore.stats``) summed
        over this worker's processors, and whether the worker has TokUR's model
        (``"tokur"``)."""
        stats = [proc.core.stats() for proc in self._tokur_processors()]
        counts = {key: sum(s[key] for s in stats) for key in ("requests", "tracked", "unread")}
        return {**counts, "tokur": link_of(self.vllm_config).config is not None}

    def tokur_check(self, mode: str | None = None) -> dict:
        """Diagnostics of TokUR's batched mode. While ``mode`` is ``"on"``, every step
        with asking rows runs the batched forward and then the M passes with the same
        noise, and records how far apart their clean and perturbed hidden states and
        the KV caches they leave are (largest and relative differences; they agree to
        the dtype's rounding, not bit for bit); ``"broken"`` does the same with
        the copies attending to the clean token instead of themselves (a control that
        must show a difference); ``None`` turns it off. Returns ``{"steps",
        "batched_steps", "checks"}`` so far and forgets the checks."""
        if mode not in (None, "on", "broken"):
            raise ValueError(f"mode: None, 'on' or 'broken', got {mode!r}")
        link = link_of(self.vllm_config)
        found = {"steps": link.steps, "batched_steps": link.batched_steps, "checks": link.checks}
        link.check, link.checks = mode, []
        return found
