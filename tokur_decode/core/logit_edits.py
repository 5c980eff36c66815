"""Backend-neutral logit edits of the actions: pure tensor functions of a step's scores.

The transformers processors (:mod:`tokur_decode.hf.actions`) and the vLLM processor
(:mod:`tokur_decode.vllm`) call these same functions; only the bookkeeping of rows
differs. Each takes ``scores`` ``[B, V]`` and ``fired`` ``[B]`` (bool) and leaves the
rows that did not fire untouched. No host synchronisation.

Example:
    >>> import torch
    >>> scores = torch.tensor([[0.0, 1.0, 2.0], [5.0, 0.0, 0.0]])
    >>> fired = torch.tensor([True, False])
    >>> eos = torch.tensor([False, True, False])
    >>> out, blocked = force_eos(scores, fired, eos)
    >>> out.tolist()
    [[-inf, 0.0, -inf], [5.0, 0.0, 0.0]]
    >>> veto(scores, fired).tolist()
    [[0.0, 1.0, -inf], [5.0, 0.0, 0.0]]
"""

from __future__ import annotations

import math

import torch

__all__ = ["adaptive_temperature", "force_eos", "force_token", "token_logits", "veto"]


def force_eos(
    scores: torch.Tensor, fired: torch.Tensor, eos_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Stop: rows that fired keep only their EOS tokens (logit 0, every other ``-inf``).

    ``eos_mask`` (bool, ``[V]`` shared by all rows or ``[B, V]`` per row) marks the EOS
    ids. A row whose EOS tokens are all ``-inf`` already (an earlier processor, e.g. a
    grammar, forbids stopping) is left alone; it is reported in the second result,
    ``blocked`` ``[B]``.
    """
    eos_allowed = scores.masked_fill(~eos_mask, -math.inf).amax(dim=-1) > -math.inf
    forced = torch.zeros_like(scores).masked_fill(~eos_mask, -math.inf)
    stop = fired & eos_allowed
    return torch.where(stop.unsqueeze(-1), forced, scores), fired & ~eos_allowed


def token_logits(token: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[B, V]`` logits that can only emit ``token`` (``[B]`` ids): 0 there, ``-inf``
    elsewhere. Built once for :func:`force_token`."""
    forced = torch.full((token.shape[0], vocab), -math.inf, device=token.device)
    return forced.scatter_(1, token.unsqueeze(-1), 0.0)


def force_token(
    scores: torch.Tensor, fired: torch.Tensor, token: torch.Tensor, forced: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that fired emit their ``token`` (``[B]``): their scores become ``forced``
    (:func:`token_logits` of ``token``). A row whose token is ``-inf`` already (an
    earlier processor forbids it) is left alone and reported in ``blocked`` ``[B]``. One
    pass over ``scores``; the check reads one value per row.

    Example:
        >>> token = torch.tensor([0, 2])
        >>> scores = torch.tensor([[0.0, 1.0, 2.0], [1.0, 1.0, -math.inf]])
        >>> out, blocked = force_token(scores, torch.tensor([True, True]), token,
        ...                            token_logits(token, 3))
        >>> out.tolist(), blocked.tolist()
        ([[0.0, -inf, -inf], [1.0, 1.0, -inf]], [False, True])
    """
    allowed = scores.gather(-1, token.unsqueeze(-1)).squeeze(-1) > -math.inf
    act = fired & allowed
    return torch.where(act.unsqueeze(-1), forced.to(scores.dtype), scores), fired & ~allowed


def veto(scores: torch.Tensor, fired: torch.Tensor) -> torch.Tensor:
    """Resample by veto: rows that fired lose their argmax (the next best token wins
    under greedy decoding)."""
    top = scores.argmax(dim=-1, keepdim=True)
    vetoed = scores.scatter(-1, top, -math.inf)
    return torch.where(fired.unsqueeze(-1), vetoed, scores)


def adaptive_temperature(
    scores: torch.Tensor,
    fired: torch.Tensor,
    entropy: torch.Tensor,
    varentropy: torch.Tensor,
    rule: tuple[float, float, float, float, float, float],
) -> torch.Tensor:
    """Entropix-style resampling: rows that fired are divided by
    ``clamp(t0 + a * entropy + b * varentropy, t_min, t_max)`` and lose the tokens below
    ``min_p * p_max``; ``rule = (t0, a, b, t_min, t_max, min_p)``.

    Example:
        >>> import torch
        >>> s = torch.tensor([[4.0, 2.0, -9.0]])
        >>> adaptive_temperature(s, torch.tensor([True]), torch.ones(1), torch.zeros(1),
        ...                      (1.0, 1.0, 0.0, 0.5, 2.0, 0.05)).tolist()
        [[2.0, 1.0, -inf]]
    """
    t0, a, b, t_min, t_max, min_p = rule
    temp = (t0 + a * entropy + b * varentropy).clamp(t_min, t_max)
    scaled = scores / temp.unsqueeze(-1)
    lp = torch.log_softmax(scaled.float(), dim=-1)
    keep = lp >= lp.amax(dim=-1, keepdim=True) + math.log(max(min_p, 1e-30))
    adapted = scaled.masked_fill(~keep, -math.inf)
    return torch.where(fired.unsqueeze(-1), adapted, scores)
