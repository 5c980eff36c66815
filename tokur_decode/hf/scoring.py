"""Scoring text already generated: every signal of every response token, TokUR included.

:func:`score` teacher-forces each response through the model: ``generate`` runs with the
monitor first and :class:`ForcedTokens` after it, which makes each row emit its saved
response token by token (then EOS). So each token's values are measured exactly as they
were during generation: the same cached forward passes, the same logits (the monitor
sees them before the forcing), and with TokUR the same perturbed passes drawing the same
noise stream (the values equal those of a generation of the same text, with the same
batch and seed). It costs what generating the text cost, one decoding step per token;
rows are batched.

Example:
    >>> from tokur_decode.models import load_default
    >>> model, tok = load_default()                                        # doctest: +SKIP
    >>> ids = tok("Paris.", add_special_tokens=False).input_ids            # doctest: +SKIP
    >>> trace = score(model, tok, ["Capital of France?"], [ids], signals=["entropy"])
    ...                                                                    # doctest: +SKIP
    >>> trace.lengths.tolist()                                             # doctest: +SKIP
    [2]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from transformers import LogitsProcessor

from ..core.perturbation import checked_options
from ..core.signals import parse_signals, wants_samples
from ..core.text import decode_rows, encode_prompts
from ..core.trace import Trace
from .monitor import UncertaintyMonitor
from .tokur import perturbed

__all__ = ["ForcedTokens", "score"]


class ForcedTokens(LogitsProcessor):
    """Make row ``i`` emit ``responses[i]`` and then ``eos`` (put it after the
    monitor, which then records the unforced logits)."""

    def __init__(self, responses: Sequence[Sequence[int]], eos: int, device) -> None:
        width = max((len(r) for r in responses), default=0) + 1
        table = torch.full((len(responses), width), eos, dtype=torch.long)
        for i, response in enumerate(responses):
            table[i, : len(response)] = torch.tensor(list(response), dtype=torch.long)
        self.table = table.to(device)
        self.prompt_len: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        step = min(input_ids.shape[1] - self.prompt_len, self.table.shape[1] - 1)
        forced = torch.full_like(scores, -float("inf"))
        return forced.scatter_(1, self.table[:, step : step + 1], 0.0)


def score(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    responses: Sequence[Sequence[int]],
    *,
    signals: Iterable[str] | str = "all",
    tokur: dict | None = None,
    chat: bool | None = None,
    batch_size: int = 8,
    alternatives: int = 0,
    **signal_params,
) -> Trace:
    """The trace of each saved response (token ids, after its prompt), one row each,
    with every ``signals`` value per token; ``tokur``: :func:`~tokur_decode.hf.perturbed`
    options when ``"tokur"`` is a signal (its ``seed`` picks the noise stream).

    Raises:
        ValueError: naming the parameter (mismatched lengths, bad ids, bad options).
    """
    names = parse_signals(signals)
    if len(prompts) != len(responses):
        raise ValueError(f"responses: {len(responses)} responses for {len(prompts)} prompts")
    if batch_size < 1:
        raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
    vocab = model.get_output_embeddings().weight.shape[0]
    for i, response in enumerate(responses):
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in response):
            raise ValueError(f"responses: response {i} has a token id outside 0..{vocab - 1}")
    tokur = checked_options(tokur)
    eos = tokenizer.eos_token_id
    parts = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(responses[start : start + batch_size])
        parts.append(
            _score_batch(
                model,
                tokenizer,
                list(prompts[start : start + batch_size]),
                chunk,
                names,
                tokur,
                chat,
                eos,
                alternatives,
                signal_params,
            )
        )
    return Trace.concat(parts)


def _score_batch(
    model, tokenizer, prompts, responses, names, tokur, chat, eos, alternatives, signal_params
) -> Trace:
    enc = encode_prompts(tokenizer, prompts, chat=chat, device=model.device)
    forced = ForcedTokens(responses, eos, model.device)
    context = perturbed(model, **(tokur or {})) if wants_samples(names) else None
    with context or contextlib.nullcontext() as source, torch.inference_mode():
        monitor = UncertaintyMonitor(
            names,
            eos_token_id=eos,
            sample_source=source,
            alternatives=alternatives,
            **signal_params,
        )
        out = model.generate(
            **enc,
            max_new_tokens=forced.table.shape[1],
            min_new_tokens=1,
            logits_processor=[monitor, forced],
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
            return_dict_in_generate=True,
        )
        full = monitor.trace(out, tokenizer)
    # a response is scored up to its first EOS (generate ends a row there)
    kept = [next((i + 1 for i, t in enumerate(r) if t == eos), len(r)) for r in responses]
    lengths = torch.tensor(kept, device=full.lengths.device)
    tokens, texts = decode_rows(tokenizer, full.token_ids, lengths)
    return Trace(
        signals=full.signals,
        token_ids=full.token_ids,
        lengths=lengths,
        tokens=tokens,
        texts=texts,
        meta={**full.meta, "scored": "teacher-forced saved responses"},
        alternatives=full.alternatives,
    )
