"""Particles in transformers: :class:`HFParticles`, our decoding loop advancing in
reasoning steps (:meth:`tokur_decode.hf.controller.Controller.advance`).

Every particle of every prompt is one row of one batch; a step decodes until each row
has ended its step (or finished); resampling reorders the rows, their KV cache
included (``DynamicCache.reorder_cache``), so a copied particle continues from its
parent's cached prefix. Made by :meth:`tokur_decode.hf.HFBackend.particles`.

Example:
    >>> from tokur_decode.hf import HFBackend
    >>> from tokur_decode.models import load_default
    >>> from tokur_decode.strategies.backend import Request, Sampling, StepsAct
    >>> backend = HFBackend(*load_default())                              # doctest: +SKIP
    >>> request = Request(("entropy",), Sampling(temperature=0.7), n=4,
    ...                   act=StepsAct("\\n\\n", 32))
    >>> with backend.particles(["What is 2 + 2?"], request) as particles:  # doctest: +SKIP
    ...     step, done = particles.advance()
    ...     particles.select([0, 0, 1, 1])
    ...     step, done = particles.advance(hold=[False, True, False, True])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.steps import StepEnds
from ..core.trace import Trace
from ..strategies.backend import one_per_particle
from .controller import Controller

__all__ = ["HFParticles"]


class HFParticles:
    """:class:`~tokur_decode.strategies.backend.Particles` on a started
    :class:`~tokur_decode.hf.controller.Controller` (one row per particle)."""

    def __init__(self, controller: Controller, ends: StepEnds, max_tokens: int, tokenizer) -> None:
        self._ctrl, self._ends, self._max_tokens = controller, ends, max_tokens
        self._tokenizer = tokenizer
        self._answers: Trace | None = None  # decoded once per state of the rows

    @property
    def tokens(self) -> int:
        return int(self._ctrl.generated)

    def advance(self, hold: Sequence[bool] | None = None) -> tuple[Trace, list[bool]]:
        if hold is not None:
            hold = torch.tensor(
                one_per_particle(hold, self._ctrl.batch_size, "hold"), dtype=torch.bool
            )
        self._ctrl.advance(self._ends, self._max_tokens, hold)
        self._answers = None
        return self.trace().steps_from(self._ctrl.step_start), self._ctrl.finished.tolist()

    def select(self, index: Sequence[int]) -> None:
        self._ctrl.select_rows(one_per_particle(index, self._ctrl.batch_size, "index"))
        self._answers = None

    def trace(self) -> Trace:
        if self._answers is None:
            self._answers = self._ctrl.trace(self._tokenizer)
        return self._answers


def vocabulary_pieces(tokenizer) -> list[str]:
    """Each token id's text, as :func:`tokur_decode.core.text.decode_rows` decodes it."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))])


def step_ends(tokenizer, delimiter: str, size: int, device: torch.device) -> StepEnds:
    """:class:`~tokur_decode.core.steps.StepEnds` of ``tokenizer``'s vocabulary for
    logits of ``size`` columns (padded vocabularies included), on ``device``."""
    return StepEnds(vocabulary_pieces(tokenizer), delimiter, size=size).to(device)
