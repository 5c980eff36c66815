"""Monitored generation with transformers: prompts in, texts and a :class:`Trace` out."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ..trace import Trace
from .monitor import DEFAULT_SIGNALS, SAMPLE_SIGNALS, UncertaintyMonitor
from .tokur import perturbed

__all__ = ["GenerationResult", "encode_prompts", "generate"]


@dataclass
class GenerationResult:
    """What :func:`generate` returns: the responses and the trace of their signals."""

    texts: list[str]
    trace: Trace
    prompts: list[str]


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat: bool | None = None, device=None):
    """Tokenise ``prompts`` as a left-padded batch.

    ``chat=None`` uses the tokenizer's chat template when it has one (each prompt as a
    user message, generation prompt appended); ``True`` requires one; ``False`` feeds
    the raw text.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ValueError("chat: the tokenizer has no chat template; pass chat=False")
    use_chat = has_template if chat is None else chat
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if use_chat:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    return enc.to(device) if device is not None else enc


def generate(
    model,
    tokenizer,
    prompts: str | Sequence[str],
    *,
    signals: Iterable[str] | str = DEFAULT_SIGNALS,
    chat: bool | None = None,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    tokur: dict | None = None,
    **signal_params,
) -> GenerationResult:
    """Generate answers to ``prompts`` while recording uncertainty signals.

    ``temperature=0`` decodes greedily; otherwise samples (with ``top_p``), reproducibly
    under ``seed``. ``signal_params`` go to :class:`UncertaintyMonitor`. When
    ``signals`` include ``"tokur"``, generation runs inside :func:`perturbed` with the
    options in ``tokur`` (e.g. ``{"rank": 8, "sigma": 0.1, "samples": 10}``).

    Example:
        >>> from tokur_decode.models import load_default
        >>> model, tok = load_default()                                  # doctest: +SKIP
        >>> result = generate(model, tok, "What is the capital of France?")  # doctest: +SKIP
        >>> result.texts[0], result.trace.summary()[0]["naive"]          # doctest: +SKIP
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("prompts: at least one prompt is required")

    names = (signals,) if isinstance(signals, str) else tuple(signals)
    wants_tokur = any(n in SAMPLE_SIGNALS for n in names)
    if tokur and not wants_tokur:
        raise ValueError("tokur: options given but 'tokur' is not among the signals")
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    enc = encode_prompts(tokenizer, prompt_list, chat=chat, device=model.device)
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    if seed is not None:
        torch.manual_seed(seed)
    context = perturbed(model, **(tokur or {})) if wants_tokur else contextlib.nullcontext()
    with context as source, torch.inference_mode():
        monitor = UncertaintyMonitor(names, eos_token_id=eos, sample_source=source, **signal_params)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            logits_processor=[monitor],
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            **sampling,
        )
    trace = monitor.trace(out, tokenizer)
    return GenerationResult(texts=list(trace.texts or []), trace=trace, prompts=prompt_list)
