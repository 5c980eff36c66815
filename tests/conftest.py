"""Shared fixtures: the real embedded model and the plain vLLM engine (session-wide), tiny
random models, and what an engine of a test needs in its environment."""

from __future__ import annotations

import contextlib
import gc
import os

import pytest
import torch


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded SmolLM2-135M-Instruct, float32 on CPU."""
    from transformers.utils import logging as hf_logging

    from tokur_decode.models import load_default

    hf_logging.disable_progress_bar()
    return load_default(device="cpu", dtype="float32")


@pytest.fixture
def tiny_llama():
    from tokur_decode.models import tiny_model

    return tiny_model("llama", vocab_size=128)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def worker_core() -> dict[str, str]:
    """Under ``pytest -n N`` (``make test``), the environment that binds a vLLM engine's
    OpenMP thread to this worker's own core; vLLM's automatic binding would put every
    worker's engine on the same core. Empty outside xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1", ...
    if not worker:
        return {}
    cores = sorted(os.sched_getaffinity(0))
    return {"VLLM_CPU_OMP_THREADS_BIND": str(cores[int(worker[2:]) % len(cores)])}


@pytest.fixture(scope="session")
def plain_engine():
    """The vLLM engine most engine modules share (started once a run; under xdist they
    are one group, ``conftest.py`` at the root): the embedded model in float32, seed 0,
    eager, 32-token KV blocks (the prefix cache then holds the prompts that branching
    sends again), Outlines for structured outputs (verbalized confidence)."""
    pytest.importorskip("vllm")
    from tokur_decode.verbalized import vllm_backend

    build = lambda: vllm_backend.engine(  # noqa: E731
        enforce_eager=True, max_model_len=1024, dtype="float32", seed=0, block_size=32
    )
    with vllm_engine(build) as llm:
        yield llm


@contextlib.contextmanager
def vllm_engine(build, kv_cache_gib: int | None = 1, **env):
    """A vLLM engine from ``build()``: a ``kv_cache_gib`` GiB KV cache (``None``: what
    ``build`` asks for, ``kv_cache_memory_bytes``), this worker's core
    (:func:`worker_core`) and ``env`` in the environment while it lives, shut down and
    the environment restored after."""
    from tokur_decode.vllm.client import shutdown

    kv = None if kv_cache_gib is None else str(kv_cache_gib)
    env = {"VLLM_CPU_KVCACHE_SPACE": kv, **worker_core(), **env}  # None: unset
    saved = {key: os.environ.get(key) for key in env}
    _set_environment(env)
    try:
        llm = build()
        try:
            yield llm
        finally:
            shutdown(llm)
            del llm
            gc.collect()
    finally:
        _set_environment(saved)


def _set_environment(values: dict[str, str | None]) -> None:
    """Set each variable, or unset it where its value is ``None``."""
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
