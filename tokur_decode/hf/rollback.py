"""Rolling back inside our decoding loop: take a row's last tokens back and redraw them.

The policy :class:`~.controller.Controller` runs for a rollback recipe.

Example:
    >>> from tokur_decode.core.policy import Trigger
    >>> RollbackPolicy(Trigger("entropy", threshold=2.0, window=4), rewind=3).extra_steps
    16
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from ..core.events import Rewind
from ..core.policy import Trigger, TriggerState
from ..strategies import actions

if TYPE_CHECKING:
    from .controller import Controller

__all__ = ["RollbackPolicy"]


class RollbackPolicy:
    """Take back a row's last tokens when its trigger fires and regenerate them.

    When the trigger fires for a row with retries left, its last ``rewind`` answer
    tokens are taken back and regenerated at ``temperature``. Once the new continuation
    is as long as the old one (or ends), the two are compared by the mean of the
    trigger's signal over their tokens plus the distribution that follows them (for an
    ``"above"`` trigger lower is better); the better one stays. The trigger restarts
    for the row afterwards.

    Args:
        trigger: when to roll back (typically a ``window`` mean, e.g. of entropy).
        rewind: answer tokens taken back.
        temperature: sampling temperature of the regeneration (> 0).
        max_retries: rollbacks per row at most.
    """

    def __init__(
        self,
        trigger: Trigger,
        *,
        rewind: int = actions.RollbackConfig.rewind,
        temperature: float = actions.RollbackConfig.temperature,
        max_retries: int = actions.RollbackConfig.max_retries,
    ) -> None:
        if not isinstance(trigger, Trigger):
            raise ValueError(f"trigger must be a Trigger, got {type(trigger).__name__}")
        if trigger.threshold is None:
            raise ValueError(f"threshold: the trigger on {trigger.signal!r} is not calibrated")
        for name, value in (("rewind", rewind), ("max_retries", max_retries)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.trigger = trigger
        self.rewind = rewind
        self.temperature = temperature
        self.max_retries = max_retries
        # Each retry costs at most one fed-again column, the regenerated tokens, and a
        # restore (one more fed-again column and the discarded regeneration).
        self.extra_steps = max_retries * (2 * rewind + 2)

    def start(self, ctrl: Controller) -> None:
        ctrl.monitor.check_step_output(self.trigger.signal)
        self.retries = [0] * ctrl.batch_size
        self.attempts: dict[int, dict] = {}
        self._rewinds: list[list[Rewind]] = [[] for _ in range(ctrl.batch_size)]
        self.state = TriggerState(self.trigger, ctrl.batch_size, ctrl.device)
        self._sign = 1.0 if self.trigger.direction == "above" else -1.0

    @property
    def events(self) -> list[list[dict]]:
        """Per row, its roll-backs (:class:`~tokur_decode.core.events.Rewind`) as dicts."""
        return [[event.to_dict() for event in row] for row in self._rewinds]

    def _badness(self, ctrl: Controller, row: int, steps: Sequence[int]) -> float:
        values = ctrl.monitor.values(self.trigger.signal)[row, list(steps)]
        return self._sign * float(values.mean())

    def step(self, ctrl: Controller, step: int) -> None:
        if self.attempts:
            self._settle(ctrl, step)
        busy = torch.zeros_like(ctrl.finished)
        if self.attempts:
            busy[list(self.attempts)] = True
        active = ~ctrl.finished & ~ctrl.refeed & ~busy
        fired = self.state.update(ctrl.monitor.latest(self.trigger.signal), step, active)
        if not bool(fired.any()):
            return
        for row in fired.nonzero().flatten().tolist():
            old = ctrl.answer_steps(row)[-self.rewind :]
            if self.retries[row] >= self.max_retries or not old:
                continue
            self.retries[row] += 1
            event = Rewind(
                step=len(ctrl.answer_steps(row)),
                signal=self.trigger.signal,
                value=float(self.state.smoothed_value[row]),
                threshold=self.trigger.threshold,
                direction=self.trigger.direction,
                rewound=len(old),
                retry=self.retries[row],
                rewound_ids=ctrl.tokens[row, [ctrl.prompt_len + s for s in old]].tolist(),
            )
            self._rewinds[row].append(event)
            self.attempts[row] = {
                "old": old,
                "old_badness": self._badness(ctrl, row, [*old, step]),
                "from": step,
                "event": event,
            }
            ctrl.take_back(row, old)
            ctrl.set_temperature(row, self.temperature)

    def _settle(self, ctrl: Controller, step: int) -> None:
        """Compare finished regenerations with what they replaced; keep the better."""
        finished = ctrl.finished.tolist()
        for row, attempt in list(self.attempts.items()):
            new = [s for s in ctrl.answer_steps(row) if s > attempt["from"]]
            if len(new) < len(attempt["old"]) and not finished[row]:
                continue
            del self.attempts[row]
            scored = new if finished[row] else [*new, step]
            badness = self._badness(ctrl, row, scored) if scored else math.inf
            keep_new = badness < attempt["old_badness"]
            event = attempt["event"]
            event.kept = "new" if keep_new else "old"
            event.old_score = self._sign * attempt["old_badness"]
            event.new_score = self._sign * badness if scored else None
            if not keep_new:
                ctrl.put_back(row, attempt["old"], new)
            ctrl.set_temperature(row, ctrl.base_temperature)
            self.state.reset_rows(torch.arange(ctrl.batch_size, device=ctrl.device) == row)
