"""What a generation returns, whichever backend decoded it.

Example:
    >>> import torch
    >>> from tokur_decode.core.trace import Trace
    >>> trace = Trace(signals={"entropy": torch.tensor([[0.5, 0.1], [0.9, 0.0]])},
    ...               token_ids=torch.zeros(2, 2, dtype=torch.long),
    ...               lengths=torch.tensor([2, 1]), texts=["Paris.", "Lyon"])
    >>> result = GenerationResult.chosen(trace, ["Capital of France?"], [0], [[]], None)
    >>> result.texts, result.tokens_generated
    (['Paris.'], 3)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .trace import Trace

__all__ = ["GenerationResult"]


@dataclass
class GenerationResult:
    """What ``generate`` returns (:func:`tokur_decode.hf.generate`,
    :func:`tokur_decode.vllm.generate`).

    Attributes:
        texts: the final response per prompt (the abstention text for a stopped row
            when the strategy sets one).
        trace: signals of the returned responses, one row per prompt.
        actions: per prompt, every action taken and why (signal, value, threshold, step;
            for best-of-N the candidates' scores and the choice).
        prompts: the prompts as given.
        candidates: best-of-N, branch and DeepConf online: the trace of every
            candidate per prompt.
        tokens_generated: tokens the model decoded for all prompts: every candidate's
            and branch's, and tokens a rollback took back (the cost of the strategy).
    """

    texts: list[str]
    trace: Trace
    prompts: list[str]
    actions: list[list[dict]] = field(default_factory=list)
    candidates: list[Trace] | None = None
    tokens_generated: int = 0

    @property
    def traces(self) -> list[Trace]:
        """One single-row trace per prompt."""
        return list(self.trace)

    @classmethod
    def chosen(
        cls, trace: Trace, prompts, chosen, actions, candidates, tokens: int | None = None
    ) -> GenerationResult:
        """The ``chosen`` rows of the candidates' ``trace`` as the result; ``tokens``:
        what was decoded in all (default: every row of ``trace``)."""
        final = trace.select(chosen)
        return cls(
            texts=list(final.texts or []),
            trace=final,
            prompts=list(prompts),
            actions=actions,
            candidates=candidates,
            tokens_generated=int(trace.lengths.sum()) if tokens is None else tokens,
        )
