"""The transformers backend of :func:`tokur_decode.verbalized.ask`: Outlines' regex
logits processor and the :class:`~tokur_decode.hf.UncertaintyMonitor` in one
``logits_processor`` list, and the scoring of the confidence number's continuations.

Outlines is imported only here and only when a constrained question is asked.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import torch

from ..core.text import encode_prompts
from ..hf.backend import sampling_kwargs
from ..hf.monitor import UncertaintyMonitor
from .asking import Asking
from .format import (
    build_prompt,
    confidence_tree,
    format_regex,
    locate,
)
from .result import VerbalizedResult, constraint_meta

__all__ = ["ask_transformers", "confidence_logprobs", "constraint_processor"]

# Outlines indexes per tokenizer (weakly held) and regex: building one takes about a second.
_INDEXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _index(tokenizer, regex: str):
    """Outlines-core ``Index`` of ``regex`` over the tokenizer's vocabulary, without its
    special tokens (EOS aside), empty tokens and the multi-character tokens that contain
    a newline or a colon. The last rule puts a token boundary at both ends of the answer,
    so its span never shares a token with the format (``\\n`` and ``:`` are tokens of
    their own in byte-level vocabularies such as SmolLM2's)."""
    from outlines.backends.outlines_core import OutlinesCoreBackend
    from outlines.models.transformers import TransformerTokenizer
    from outlines_core import Index

    per_tokenizer = _INDEXES.setdefault(tokenizer, {})
    if regex not in per_tokenizer:
        special = set(tokenizer.all_special_ids) | {
            i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special
        }
        special.discard(tokenizer.eos_token_id)
        to_text = TransformerTokenizer(tokenizer).convert_token_to_string
        kept = {}
        for token, i in tokenizer.get_vocab().items():
            text = to_text(token)
            if i in special or not text or (len(text) > 1 and ("\n" in text or ":" in text)):
                continue
            kept[token] = i
        vocabulary = OutlinesCoreBackend.create_outlines_core_vocabulary(
            kept, tokenizer.eos_token_id, tokenizer.eos_token, to_text
        )
        per_tokenizer[regex] = Index(regex, vocabulary)
    return per_tokenizer[regex]


def constraint_processor(tokenizer, max_answer_chars: int = 100):
    """A fresh Outlines logits processor (``OutlinesCoreLogitsProcessor``) constraining
    generation to :func:`~tokur_decode.verbalized.format.format_regex` then EOS.

    It keeps one guide per row and reads each row's last token on the host at every
    step (grammar state lives on the host); use one per ``generate`` call.

    Example:
        >>> from tokur_decode.models import load_default
        >>> model, tok = load_default()                                   # doctest: +SKIP
        >>> mask = constraint_processor(tok)                              # doctest: +SKIP
        >>> model.generate(**enc, logits_processor=[monitor, mask], ...)  # doctest: +SKIP
    """
    from outlines.backends.outlines_core import OutlinesCoreLogitsProcessor

    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer: needs an eos_token_id (the format ends with EOS)")
    return OutlinesCoreLogitsProcessor(_index(tokenizer, format_regex(max_answer_chars)), "torch")


def ask_transformers(
    model,
    tokenizer,
    questions: Sequence[str],
    asking: Asking,
) -> list[VerbalizedResult]:
    """One batched ``generate`` for all ``questions``, as ``asking`` says."""
    prompts = [build_prompt(q, asking.template) for q in questions]
    eos = tokenizer.eos_token_id
    monitor = UncertaintyMonitor(asking.signals, eos_token_id=eos, **asking.signal_params)
    processors = [monitor]
    if asking.constrained:
        mask = constraint_processor(tokenizer, asking.max_answer_chars)
        processors = [monitor, mask] if asking.mask_order == "monitor-first" else [mask, monitor]
    enc = encode_prompts(tokenizer, prompts, chat=asking.chat, device=model.device)
    if asking.seed is not None:
        torch.manual_seed(asking.seed)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=asking.max_new_tokens,
            logits_processor=processors,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            **sampling_kwargs(asking.temperature, asking.top_p),
        )
    trace = monitor.trace(out, tokenizer)
    trace.meta.update(
        constraint_meta(asking.constrained, asking.mask_order, asking.max_answer_chars)
    )
    rows = [
        locate(tokenizer, trace.token_ids[row, : int(trace.lengths[row])].tolist())
        for row in range(len(questions))
    ]
    # Score the number's continuations only where it starts at a token boundary.
    starts = [
        r.confidence_span.start if asking.expected and r.number_aligned else None for r in rows
    ]
    logprobs = (
        confidence_logprobs(model, tokenizer, out, enc["attention_mask"], starts)
        if any(s is not None for s in starts)
        else [None] * len(questions)
    )
    return [
        VerbalizedResult.located(question, found, trace[row], logprobs[row])
        for row, (question, found) in enumerate(zip(questions, rows, strict=True))
    ]


def confidence_logprobs(
    model, tokenizer, output, prompt_mask: torch.Tensor, starts: Sequence[int | None]
) -> list[np.ndarray | None]:
    """Per row, ``[101]`` float64 log-probabilities that the constrained decoder, sampling
    at temperature 1 from the raw model where the generated number starts, states
    ``n = 0..100`` (``None`` where ``starts`` is ``None``).

    At each position of the number the model's next-token distribution is renormalised
    over the continuations the format allows there
    (:class:`~tokur_decode.verbalized.format.ConfidenceTree`); ``exp`` of the 101 values
    sums to 1.

    ``output`` is ``generate``'s output (``return_dict_in_generate=True``) for the
    left-padded prompts with attention mask ``prompt_mask``; ``starts[b]`` is the index
    of the number's first generated token in row ``b``. Cost: one forward of all rows on
    the generation's KV cache, of the token before the number (re-fed as the root, its
    cache slot masked out) and the completions' branching prefixes (SmolLM2: 1-9 and
    10, so 11 tokens per row), each attending to its row's prefix and its own ancestors
    through a 4-D attention mask. The cache is extended and must not be reused.
    """
    attn = getattr(model.config, "_attn_implementation", "eager")
    if attn not in ("sdpa", "eager"):
        raise ValueError(
            f"expected: scoring the confidence completions needs a custom 4-D attention "
            f"mask, which attn_implementation={attn!r} does not take; load the model with "
            f"'sdpa' or 'eager', or pass expected=False"
        )
    tree = confidence_tree(tokenizer)
    # Fed after the root (the token before the number, prefix ()): every prefix leading
    # to a branching one, parents first.
    fed = sorted({b[:k] for b in tree.branching for k in range(1, len(b) + 1)}, key=len)
    node = {(): 0, **{prefix: i + 1 for i, prefix in enumerate(fed)}}
    size = len(node)
    sees = torch.eye(size, dtype=torch.bool)  # a tree token sees itself and its ancestors
    depth = torch.zeros(size, dtype=torch.long)
    for prefix in fed:
        i, parent = node[prefix], node[prefix[:-1]]
        sees[i] |= sees[parent]
        depth[i] = depth[parent] + 1

    device = model.device
    cache = output.past_key_values
    batch, prompt_len = prompt_mask.shape
    cached = cache.get_seq_length()
    root = torch.tensor([prompt_len + (s or 1) - 1 for s in starts], device=device)
    slot = torch.arange(cached, device=device)
    real = torch.cat([prompt_mask.bool(), slot.new_ones(batch, cached - prompt_len).bool()], 1)
    prefix_keys = real & (slot < root[:, None])  # the root's own slot is re-fed instead
    mask = torch.cat(
        [
            prefix_keys[:, None].expand(batch, size, cached),
            sees.to(device).expand(batch, size, size),
        ],
        dim=2,
    )[:, None]
    if attn == "eager":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(
            ~mask, torch.finfo(dtype).min
        )
    fed_ids = torch.tensor([prefix[-1] for prefix in fed], device=device).expand(batch, -1)
    ids = torch.cat([output.sequences.gather(1, root[:, None]), fed_ids], dim=1)
    positions = prefix_keys.sum(1, keepdim=True) + depth.to(device)
    with torch.inference_mode():
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            cache_position=torch.arange(cached, cached + size, device=device),
            use_cache=True,
        ).logits
    scores = {
        prefix: logits[:, node[prefix], list(tree.allowed[prefix])].double().cpu().numpy()
        for prefix in tree.branching
    }
    total = tree.completion_logprobs(scores)
    return [None if s is None else total[b] for b, s in enumerate(starts)]
