"""Shared fixtures: the real embedded model (session-wide) and tiny random models."""

from __future__ import annotations

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
