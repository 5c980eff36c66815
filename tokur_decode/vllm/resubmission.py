"""Answers grown by re-submitted requests: vLLM cannot fork or pause a running request,
so branching (:mod:`~tokur_decode.vllm.branching`) and particles advancing in steps
(:mod:`~tokur_decode.vllm.particles`) send prompt + answer-so-far again and again (the
engine's prefix cache holds the shared prefix). A :class:`Candidate` is one answer
as it grows; :func:`answers_trace` makes their :class:`~tokur_decode.core.trace.Trace`.

Example:
    >>> import torch
    >>> from tokur_decode.core.trace import Trace
    >>> answer = Candidate(prompt=0)
    >>> answer.extend(Trace({"entropy": torch.tensor([[0.5, 1.0]])}, torch.tensor([[7, 8]]),
    ...                     torch.tensor([2])), 2)
    >>> copy = answer.fork()
    >>> copy.ids, answers_trace([answer, Candidate(0)], None, {}).lengths.tolist()
    ([7, 8], [2, 0])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.text import decode_rows
from ..core.trace import Trace

__all__ = ["Candidate", "answers_trace"]


@dataclass(eq=False)
class Candidate:
    """One answer of a prompt as it grows over the rounds."""

    prompt: int
    ids: list[int] = field(default_factory=list)  # answer tokens so far
    signals: dict[str, list[float]] = field(default_factory=dict)  # their steps' values
    done: bool = False
    fire: dict | None = None  # {"step", "alternatives", "value"} of an unhandled fire

    def fork(self) -> Candidate:
        """A copy that grows on its own (not done, no fire)."""
        signals = {name: list(values) for name, values in self.signals.items()}
        return Candidate(self.prompt, list(self.ids), signals)

    def extend(self, trace: Trace, steps: int) -> None:
        """Append the first ``steps`` steps of the single-row ``trace``."""
        self.ids += trace.token_ids[0, :steps].tolist()
        for name, values in trace.signals.items():
            self.signals.setdefault(name, []).extend(values[0, :steps].tolist())


def answers_trace(rows: list[Candidate], tokenizer, meta: dict) -> Trace:
    """The trace of ``rows`` (texts decoded when a ``tokenizer`` is given); every
    signal any row recorded, zeros where a row has none."""
    width = max(len(c.ids) for c in rows)
    lengths = torch.tensor([len(c.ids) for c in rows])

    def padded(values: list[list]) -> torch.Tensor:
        return torch.tensor([list(v) + [0] * (width - len(v)) for v in values]).reshape(
            len(values), width
        )

    ids = padded([c.ids for c in rows]).long()
    tokens, texts = decode_rows(tokenizer, ids, lengths)
    names = dict.fromkeys(name for c in rows for name in c.signals)
    return Trace(
        signals={n: padded([c.signals.get(n, []) for c in rows]).float() for n in names},
        token_ids=ids,
        lengths=lengths,
        tokens=tokens,
        texts=texts,
        meta=dict(meta),
    )
