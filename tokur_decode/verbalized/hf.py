"""The transformers backend of :func:`tokur_decode.verbalized.ask`: Outlines' regex
logits processor and the :class:`~tokur_decode.hf.UncertaintyMonitor` in one
``logits_processor`` list, and the scoring of the confidence number's continuations.

Outlines is imported only here and only when a constrained question is asked.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ..hf.generation import encode_prompts, sampling_kwargs
from ..hf.monitor import UncertaintyMonitor
from .format import (
    Parsed,
    build_prompt,
    char_span_to_tokens,
    format_regex,
    is_abstention,
    max_format_tokens,
    parse_response,
    token_offsets,
)
from .result import VerbalizedResult

__all__ = ["MASK_ORDERS", "VERBALIZED_SIGNALS", "ask_transformers", "constraint_processor"]

#: Where the monitor sits relative to Outlines' mask. ``monitor-first`` (default): the
#: signals describe the model's raw distribution; ``mask-first``: the distribution the
#: constrained decoder draws from (masked tokens have probability 0).
MASK_ORDERS = {
    "monitor-first": "raw logits (the monitor runs before the Outlines mask)",
    "mask-first": "logits after the Outlines mask (masked tokens have probability 0)",
}

#: What the monitor records by default: the answer-span scores need chosen_logprob,
#: max_prob and entropy; chosen_prob and LogTokU feed the CLI table.
VERBALIZED_SIGNALS = ("max_prob", "chosen_prob", "chosen_logprob", "entropy", "logtoku")
_REQUIRED = ("max_prob", "chosen_logprob", "entropy")

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


def _signal_names(signals: Iterable[str] | str | None) -> tuple[str, ...]:
    if signals is None:
        return VERBALIZED_SIGNALS
    names = (signals,) if isinstance(signals, str) else tuple(signals)
    if "tokur" in names:
        raise ValueError("signals: 'tokur' is not supported with verbalized questions")
    if "all" in names:
        return names
    return names + tuple(n for n in _REQUIRED if n not in names)


def ask_transformers(
    model,
    tokenizer,
    questions: Sequence[str],
    *,
    template: str,
    constrained: bool,
    mask_order: str,
    signals,
    max_answer_chars: int,
    max_new_tokens: int | None,
    temperature: float,
    top_p: float,
    seed: int | None,
    chat: bool | None,
    expected: bool,
    signal_params: dict,
) -> list[VerbalizedResult]:
    """One batched ``generate`` for all ``questions`` (see :func:`~tokur_decode.verbalized.ask`
    for the parameters, validated here)."""
    if mask_order not in MASK_ORDERS:
        raise ValueError(f"mask_order: choose from {list(MASK_ORDERS)}, got {mask_order!r}")
    bound = max_format_tokens(max_answer_chars)
    if max_new_tokens is None:
        max_new_tokens = bound
    elif max_new_tokens < (bound if constrained else 1):
        raise ValueError(
            f"max_new_tokens must be >= {bound if constrained else 1}"
            + (f" (the constrained format can take {bound} tokens)" if constrained else "")
            + f", got {max_new_tokens}"
        )
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    prompts = [build_prompt(q, template) for q in questions]
    eos = tokenizer.eos_token_id
    monitor = UncertaintyMonitor(_signal_names(signals), eos_token_id=eos, **signal_params)
    processors = [monitor]
    if constrained:
        mask = constraint_processor(tokenizer, max_answer_chars)
        processors = [monitor, mask] if mask_order == "monitor-first" else [mask, monitor]
    enc = encode_prompts(tokenizer, prompts, chat=chat, device=model.device)
    if seed is not None:
        torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            logits_processor=processors,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            **sampling_kwargs(temperature, top_p),
        )
    trace = monitor.trace(out, tokenizer)
    trace.meta.update(
        mask_order=mask_order if constrained else None,
        measured_on=MASK_ORDERS[mask_order] if constrained else "raw logits (no constraint)",
        constrained=constrained,
        format=format_regex(max_answer_chars) if constrained else None,
    )
    rows = []
    for row in range(len(questions)):
        ids = trace.token_ids[row, : int(trace.lengths[row])].tolist()
        rows.append(_parse(tokenizer, ids[:-1] if ids and ids[-1] == eos else ids))
    # Score the number's continuations only where it starts at a token boundary.
    starts = [number.start if expected and aligned else None for *_, number, aligned in rows]
    logprobs = (
        confidence_logprobs(model, tokenizer, out, enc["attention_mask"], starts)
        if any(s is not None for s in starts)
        else [None] * len(questions)
    )
    return [
        VerbalizedResult(
            question=question,
            text=text,
            answer=parsed.answer,
            confidence=parsed.confidence,
            abstained=is_abstention(parsed.answer),
            trace=trace[row],
            answer_span=answer,
            confidence_span=number,
            confidence_logprobs=logprobs[row],
            parse_error=parsed.error,
        )
        for row, (question, (text, parsed, answer, number, _)) in enumerate(
            zip(questions, rows, strict=True)
        )
    ]


def _parse(tokenizer, ids: list[int]) -> tuple[str, Parsed, range, range, bool]:
    """The response's text, its parse, the answer and number token spans, and whether
    the number starts at a token boundary."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    parsed = parse_response(text)
    if parsed.error is not None:
        return text, parsed, range(0), range(0), False
    offsets = token_offsets(tokenizer, ids)
    answer = char_span_to_tokens(offsets, *parsed.answer_chars)
    number = char_span_to_tokens(offsets, *parsed.confidence_chars)
    return text, parsed, answer, number, offsets[number.start][0] == parsed.confidence_chars[0]


def confidence_logprobs(
    model, tokenizer, output, prompt_mask: torch.Tensor, starts: Sequence[int | None]
) -> list[np.ndarray | None]:
    """Per row, ``[101]`` float64 log-probabilities that the constrained decoder, sampling
    at temperature 1 from the raw model where the generated number starts, states
    ``n = 0..100`` (``None`` where ``starts`` is ``None``).

    At each position of the number the model's next-token distribution is renormalised
    over the continuations the format allows there: the first digit 0-9; after 1-9
    another digit or the end; after 10 a 0 or the end; the end is forced after 0, after
    two other digits and after 100. ``exp`` of the 101 values sums to 1. Numbers are
    taken in their canonical tokenization: for SmolLM2 (and every tokenizer that splits
    digits) it is the only one, so this is exactly the constrained decoder's law.

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
    eos = tokenizer.eos_token_id
    completions = [
        tuple(tokenizer.encode(str(n), add_special_tokens=False)) + (eos,) for n in range(101)
    ]
    allowed: dict[tuple, set] = {}  # prefix -> the tokens the format allows after it
    for c in completions:
        for k in range(len(c)):
            allowed.setdefault(c[:k], set()).add(c[k])
    branching = [prefix for prefix, nxt in allowed.items() if len(nxt) > 1]
    # The tree: the root (the token before the number, prefix ()), then every prefix
    # leading to a branching one, parents first.
    fed = sorted({b[:k] for b in branching for k in range(1, len(b) + 1)}, key=len)
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
    tree = torch.tensor([prefix[-1] for prefix in fed], device=device).expand(batch, -1)
    ids = torch.cat([output.sequences.gather(1, root[:, None]), tree], dim=1)
    positions = prefix_keys.sum(1, keepdim=True) + depth.to(device)
    used = sorted({t for c in completions for t in c})
    column = {t: i for i, t in enumerate(used)}
    with torch.inference_mode():
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            cache_position=torch.arange(cached, cached + size, device=device),
            use_cache=True,
        ).logits
        picked = logits[..., used].double().cpu().numpy()  # [B, tree, used tokens]
    # log q(t | prefix): the logit of t minus the logsumexp over the allowed tokens.
    terms = {}
    for prefix in branching:
        cols = [column[t] for t in sorted(allowed[prefix])]
        z = picked[:, node[prefix], cols]
        z = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
        terms.update({(prefix, t): z[:, j] for j, t in enumerate(sorted(allowed[prefix]))})
    zero = np.zeros(batch)
    total = np.stack(
        [sum((terms.get((c[:k], c[k]), zero) for k in range(len(c))), zero) for c in completions],
        axis=1,
    )
    return [None if s is None else total[b] for b, s in enumerate(starts)]
