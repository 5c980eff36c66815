"""Caller-side helpers: build an engine with the processor, read traces back.

Example:
    >>> from vllm import SamplingParams
    >>> from tokur_decode.vllm import llm, read_traces, uncertainty_args
    >>> engine = llm(max_model_len=1024)                 # doctest: +SKIP
    >>> params = SamplingParams(max_tokens=32, temperature=0,
    ...                         extra_args=uncertainty_args(["entropy", "deepconf"]))
    >>> outs = engine.generate(["What is the capital of France?"], params)  # doctest: +SKIP
    >>> traces = read_traces(engine, outs)               # doctest: +SKIP
    >>> traces[0].signals["entropy"].shape               # doctest: +SKIP
    torch.Size([1, 8])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.trace import Trace

__all__ = ["EXTENSION", "PROCESSOR", "enable_traces", "engine_args", "llm", "read_traces"]

#: Qualified names to give vLLM (also usable on the ``vllm serve`` command line).
PROCESSOR = "tokur_decode.vllm.processor:UncertaintyProcessor"
EXTENSION = "tokur_decode.vllm.worker.TraceExtension"


def engine_args(**kwargs) -> dict:
    """``kwargs`` for ``vllm.LLM`` with the processor registered and the trace extension
    installed (other processors in ``logits_processors`` are kept).

    Example:
        >>> args = engine_args(model="m", enforce_eager=True)
        >>> args["logits_processors"]
        ['tokur_decode.vllm.processor:UncertaintyProcessor']
        >>> args["worker_extension_cls"]
        'tokur_decode.vllm.worker.TraceExtension'
    """
    procs = list(kwargs.pop("logits_processors", None) or [])
    if PROCESSOR not in procs:
        procs.append(PROCESSOR)
    ext = kwargs.pop("worker_extension_cls", None)
    if ext not in (None, "", EXTENSION):
        raise ValueError(f"worker_extension_cls: already {ext!r}; tokur-decode needs {EXTENSION}")
    return {**kwargs, "logits_processors": procs, "worker_extension_cls": EXTENSION}


def llm(model: str | None = None, **kwargs):
    """A ``vllm.LLM`` with the processor and traces enabled; ``model`` defaults to the
    embedded SmolLM2 folder (:func:`tokur_decode.models.default_model_path`)."""
    from vllm import LLM

    if model is None:
        from ..models import default_model_path

        model = str(default_model_path())
    engine = LLM(**engine_args(model=model, **kwargs))
    enable_traces(engine)
    return engine


def enable_traces(engine) -> None:
    """Bind the processors in ``engine``'s workers (needed once, before generating, for
    an engine built with :func:`engine_args` by hand)."""
    if not any(engine.collective_rpc("tokur_bind")):
        raise ValueError("engine: no UncertaintyProcessor registered (see engine_args)")


def read_traces(engine, outputs: Sequence, tokenizer=None) -> list[Trace | None]:
    """One :class:`~tokur_decode.core.trace.Trace` per ``RequestOutput`` (one row per
    completion, ``n > 1`` included), ``None`` for requests that did not opt in. The
    traces are fetched from the workers and forgotten there.

    ``trace.meta["actions"]`` lists, per row, the events where an action fired;
    ``trace.meta["request_id"]`` is the output's id.
    """
    ids = [out.request_id for out in outputs]
    found: dict[tuple[str, int], dict] = {}
    for worker in engine.collective_rpc("tokur_collect", args=(ids,)):
        for item in worker:
            found[(item["request_id"], item["index"])] = item
    tokenizer = tokenizer if tokenizer is not None else engine.get_tokenizer()
    traces: list[Trace | None] = []
    for out in outputs:
        items = [found.get((out.request_id, c.index)) for c in out.outputs]
        if any(item is None for item in items):
            traces.append(None)
            continue
        traces.append(_trace(items, [c.text for c in out.outputs], tokenizer, out.request_id))
    return traces


def _trace(items: list[dict], texts: list[str], tokenizer, request_id: str) -> Trace:
    lengths = [len(item["token_ids"]) for item in items]
    width = max(lengths, default=0)

    def padded(rows: list[list]) -> torch.Tensor:
        return torch.tensor([list(r) + [0] * (width - len(r)) for r in rows])

    names = list(items[0]["signals"])
    return Trace(
        signals={k: padded([item["signals"][k] for item in items]).float() for k in names},
        token_ids=padded([item["token_ids"] for item in items]).long(),
        lengths=torch.tensor(lengths),
        tokens=[[tokenizer.decode([t]) for t in item["token_ids"]] for item in items],
        texts=texts,
        meta={"request_id": request_id, "actions": [item["events"] for item in items]},
    )
