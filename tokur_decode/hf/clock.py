"""Step bookkeeping shared by the stateful logits processors."""

from __future__ import annotations

import torch

__all__ = ["StepClock"]


class StepClock:
    """Which decoding step a logits-processor call is, and whether a new ``generate``
    call started (detected from the batch size and the length of ``input_ids``).

    Example:
        >>> import torch
        >>> clock = StepClock()
        >>> ids = torch.ones(2, 5, dtype=torch.long)
        >>> clock.tick(ids), clock.tick(torch.cat([ids, ids[:, :1]], dim=1))
        ((0, True), (1, False))
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.batch_size = -1
        self.prompt_len = 0
        self.steps = 0

    def tick(self, input_ids: torch.Tensor) -> tuple[int, bool]:
        """``(step, new_generation)`` for this call; advances the clock."""
        batch, length = input_ids.shape
        new = batch != self.batch_size or length != self.prompt_len + self.steps
        if new:
            self.batch_size, self.prompt_len, self.steps = batch, length, 0
        step = self.steps
        self.steps += 1
        return step, new
