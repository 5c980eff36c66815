"""Shared fixtures: the real embedded model (session-wide) and tiny random models."""

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


@contextlib.contextmanager
def vllm_engine(build, **env):
    """A vLLM engine from ``build()`` for one test module: a 1 GiB KV cache (plus ``env``)
    in the environment while it lives, shut down and the environment restored after."""
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **env}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    llm = build()
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
