"""Branching inside our decoding loop: fork a row into its step's top-``k`` alternatives.

The policy :class:`~.controller.Controller` runs for a branch recipe (CoT-decoding at
the first token, or forks where a trigger fires); the candidates it makes are chosen
among by the caller (:func:`tokur_decode.hf.generate`).

Example:
    >>> from tokur_decode.core.policy import Trigger
    >>> BranchPolicy(3, Trigger("entropy", threshold=2.0)).k
    3
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..core.events import Fork
from ..core.policy import Trigger, TriggerState
from ..strategies import actions
from ..strategies.candidates import fork_tokens

if TYPE_CHECKING:
    from .controller import Controller

__all__ = ["BranchPolicy"]


class BranchPolicy:
    """Fork a row into its step's top-``k`` alternatives, each continued as its own row.

    Args:
        k: alternatives per branch point (the row's own choice is the first one, so
            ``k = 1`` changes nothing). Alternatives with probability 0 are skipped.
        trigger: branch where it fires; ``None`` branches at the first token
            (CoT-decoding).
        max_branch_points: forks per prompt at most.
        token_budget: per prompt, a fork happens only if all of the prompt's rows
            running to ``max_new_tokens`` stay within this many tokens (``None``: no cap).

    A trigger restarts (patience, window) at every step where it fired, whether the row
    forked or not (the cap or the budget can refuse a fork); the forked rows' trigger
    watches from the next step on.

    After :meth:`Controller.run`, ``origin[i]`` is the prompt of row ``i`` and
    ``events[p]`` lists prompt ``p``'s forks (``candidate``: the forking row's index
    among the prompt's candidates).
    """

    extra_steps = 0

    def __init__(
        self,
        k: int = actions.BranchConfig.k,
        trigger: Trigger | None = None,
        *,
        max_branch_points: int = actions.BranchConfig.max_branch_points,
        token_budget: int | None = None,
    ) -> None:
        for name, value in (("k", k), ("max_branch_points", max_branch_points)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if token_budget is not None and (
            isinstance(token_budget, bool) or not isinstance(token_budget, int) or token_budget < 1
        ):
            raise ValueError(f"token_budget must be None or an integer >= 1, got {token_budget!r}")
        if trigger is not None and trigger.threshold is None:
            raise ValueError(f"threshold: the trigger on {trigger.signal!r} is not calibrated")
        self.k = k
        self.trigger = trigger
        self.max_branch_points = max_branch_points
        self.token_budget = token_budget

    def start(self, ctrl: Controller) -> None:
        batch = ctrl.batch_size
        self.origin = list(range(batch))
        self.points = [0] * batch
        self.events: list[list[dict]] = [[] for _ in range(batch)]
        if self.trigger is not None:
            ctrl.monitor.check_step_output(self.trigger.signal)
        self.state = (
            TriggerState(self.trigger, batch, ctrl.device) if self.trigger is not None else None
        )

    def step(self, ctrl: Controller, step: int) -> None:
        live = ~ctrl.finished
        if self.state is None:
            if step > 0:
                return
            fired, values = live, None
        else:
            fired = self.state.update(ctrl.monitor.latest(self.trigger.signal), step, live)
            values = self.state.smoothed_value
        if not bool(fired.any()):
            return
        rows = fired.nonzero().flatten().tolist()
        scores = ctrl.scores[rows]
        top_values, top_ids = scores.topk(min(self.k, scores.shape[-1]), dim=-1)
        usable = (top_values > -math.inf).tolist()
        top_ids = top_ids.tolist()
        remaining = ctrl.max_new_tokens - step
        used = ctrl.n_answer.tolist()  # grows with the rows forked at this step
        running = live.tolist()
        index, forced = list(range(ctrl.batch_size)), {}
        for j, row in enumerate(rows):
            prompt = self.origin[row]
            if self.points[prompt] >= self.max_branch_points:
                continue
            mine = [i for i, o in enumerate(self.origin) if o == prompt]
            forked = fork_tokens(
                [t for t, ok in zip(top_ids[j], usable[j], strict=True) if ok],
                self.token_budget,
                spent=sum(used[i] for i in mine),
                running=sum(running[i] for i in mine),
                remaining=remaining,
            )
            if len(forked) < 2:
                continue
            self.points[prompt] += 1
            forced[row] = forked[0]
            for token in forked[1:]:
                forced[len(index)] = token
                index.append(row)
                self.origin.append(prompt)
                used.append(used[row])
                running.append(True)
            value = float(values[row]) if values is not None else None
            fork = Fork.of(
                self.trigger,
                step=step,
                candidate=mine.index(row),
                value=value,
                forked_ids=forked,
            )
            self.events[prompt].append(fork.to_dict())
        if len(index) > ctrl.batch_size:
            ctrl.select_rows(index)
            if self.state is not None:
                self.state.select_rows(torch.tensor(index, device=ctrl.device))
        if forced:
            rows_forced = torch.tensor(list(forced), device=ctrl.device)
            ctrl.force[rows_forced] = True
            ctrl.forced_token[rows_forced] = torch.tensor(list(forced.values()), device=ctrl.device)
        if self.state is not None:  # every fire is handled once: forked or not, it restarts
            handled = torch.zeros_like(ctrl.force)
            handled[rows] = True
            self.state.reset_rows(handled | ctrl.force)
