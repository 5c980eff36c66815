"""Prompts in, texts out: the tokenizer conventions every backend shares.

Prompts are encoded once, the same way for transformers and vLLM (chat template by
default), so both backends see the same token ids; answers are decoded without special
tokens; voting compares answers normalised by :func:`normalize_answer`.

Example:
    >>> normalize_answer("  Paris. ")
    'paris'
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["decode_rows", "encode_prompts", "normalize_answer", "prompt_token_ids"]


def encode_prompts(
    tokenizer, prompts: Sequence[str | list[dict]], *, chat: bool | None = None, device=None
):
    """Tokenise ``prompts`` as a left-padded batch.

    ``chat=None`` uses the tokenizer's chat template when it has one (each prompt as a
    user message, generation prompt appended); ``True`` requires one; ``False`` feeds
    the raw text. A prompt may also be a list of chat messages (a system prompt and the
    user message), which needs the template.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ValueError("chat: the tokenizer has no chat template; pass chat=False")
    use_chat = has_template if chat is None else chat
    if not use_chat and any(not isinstance(p, str) for p in prompts):
        raise ValueError("prompts: chat messages (a system prompt) need the chat template")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if use_chat:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}] if isinstance(p, str) else list(p),
                add_generation_prompt=True,
                tokenize=False,
            )
            for p in prompts
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    empty = [i for i, n in enumerate(enc["attention_mask"].sum(-1).tolist()) if n == 0]
    if empty:
        raise ValueError(
            f"prompts: prompt {empty[0]} is empty and has no chat template around it "
            "(give it text, or chat=True)"
        )
    return enc.to(device) if device is not None else enc


def prompt_token_ids(
    tokenizer, prompts: Sequence[str | list[dict]], chat: bool | None = None
) -> list[list[int]]:
    """``prompts`` as :func:`encode_prompts` encodes them, one unpadded token-id list
    each (what an engine that takes token ids, e.g. ``vllm.TokensPrompt``, needs)."""
    enc = encode_prompts(tokenizer, list(prompts), chat=chat)
    return [
        ids[mask.bool()].tolist()
        for ids, mask in zip(enc.input_ids, enc.attention_mask, strict=True)
    ]


def decode_rows(tokenizer, token_ids: torch.Tensor, lengths: torch.Tensor):
    """``(tokens, texts)``: each valid token's text and each response without special
    tokens; ``(None, None)`` without a tokenizer."""
    if tokenizer is None:
        return None, None
    ids = token_ids.cpu().tolist()
    n = lengths.cpu().tolist()
    tokens = [[tokenizer.decode([t]) for t in row[:k]] for row, k in zip(ids, n, strict=True)]
    texts = [
        tokenizer.decode(row[:k], skip_special_tokens=True) for row, k in zip(ids, n, strict=True)
    ]
    return tokens, texts


def normalize_answer(text: str) -> str:
    """Default answer extraction for voting: the text, stripped, lower-cased, without a
    trailing period."""
    return text.strip().rstrip(".").strip().lower()
