"""Processor-level actions: logits processors that act on rows whose trigger fires.

Both work in a plain ``model.generate(logits_processor=[...])``; put an
:class:`~tokur_decode.hf.UncertaintyMonitor` first in the list to record the raw
signals, then the action. Each action computes the one signal its trigger reads (one
fused pass), keeps its state as tensors on the logits' device (no host
synchronisation), and records, per row and step, whether it fired and the value that
was compared (:meth:`TriggeredAction.events` after generation).

* :class:`StopOnTrigger`: force EOS (every other logit ``-inf``) for rows whose trigger
  fired. A row whose EOS an earlier processor (a grammar) forbids is left alone and
  recorded as ``blocked``.
* :class:`ResampleOnTrigger`: change the fired rows' distribution for that step:
  ``"veto"`` removes the argmax; ``"adaptive"`` (entropix-style) divides the logits by
  ``clamp(temperature + entropy_coef * H + varentropy_coef * varentropy, min, max)`` and
  drops tokens below ``min_p * p_max``. ``"adaptive"`` only matters when sampling
  (``do_sample=True``; deterministic under ``torch.manual_seed``); greedy decoding keeps
  the argmax of a rescaled row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from ..core.events import Fire
from ..core.logit_edits import adaptive_temperature, force_eos, veto
from ..core.policy import Trigger, TriggerState
from ..core.signals import REGISTRY, SignalSpec, signal_of_output
from ..core.trace import StepBuffer
from ..strategies.actions import ResampleConfig
from .clock import StepClock
from .monitor import as_id_list

__all__ = ["ResampleOnTrigger", "StopOnTrigger", "TriggeredAction"]

#: The resample rule's defaults (one place:
#: :class:`tokur_decode.strategies.actions.ResampleConfig`).
_RULE = ResampleConfig()


class TriggeredAction(LogitsProcessor):
    """Base class: evaluates ``trigger`` on the step's logits, calls :meth:`act`.

    ``thresholds`` (one per row of the batch) overrides ``trigger.threshold`` row by
    row, e.g. thresholds calibrated per prompt for DeepConf online.
    """

    supports_continuous_batching = False
    action = "none"
    #: Extra per-step 0/1 facts a subclass records beside ``fired`` and ``value``.
    record_names: tuple[str, ...] = ()

    def __init__(
        self,
        trigger: Trigger,
        extra_signals: Sequence[str] = (),
        *,
        thresholds: Sequence[float] | None = None,
        **signal_params,
    ) -> None:
        if not isinstance(trigger, Trigger):
            raise ValueError(f"trigger must be a Trigger, got {type(trigger).__name__}")
        if trigger.threshold is None and thresholds is None:
            raise ValueError(f"threshold: the trigger on {trigger.signal!r} is not calibrated")
        if thresholds is not None and not all(math.isfinite(t) for t in thresholds):
            raise ValueError("thresholds: must be finite numbers, one per row")
        name = signal_of_output(trigger.signal)
        if REGISTRY[name].needs_samples:
            raise ValueError(
                "trigger: TokUR signals need perturbed samples; use them for selection"
            )
        self.trigger = trigger
        self.thresholds = None if thresholds is None else [float(t) for t in thresholds]
        self.spec = SignalSpec([name, *extra_signals], **signal_params)
        self.clock = StepClock()
        self._state: TriggerState | None = None
        self._record: StepBuffer | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step, new = self.clock.tick(input_ids)
        if new:
            self._state = TriggerState(
                self.trigger, input_ids.shape[0], scores.device, self.thresholds
            )
            names = ("fired", "value", *self.record_names)
            self._record = StepBuffer(names, input_ids.shape[0], scores.device)
            self._start(input_ids.shape[0], scores.device)
        values = self.spec(scores)
        value = values[self.trigger.signal]
        fired = self._state.update(value, step)
        scores, facts = self.act(scores, fired, values)
        record = {"fired": fired.float(), "value": self._state.smoothed_value}
        self._record.write(step, {**record, **{k: v.float() for k, v in facts.items()}})
        return scores

    def _start(self, batch: int, device) -> None:
        """Per-generation state of a subclass."""

    def act(self, scores, fired, values):  # pragma: no cover - abstract
        """``(new scores, {name in record_names: bool [B]})`` for this step."""
        raise NotImplementedError

    def events(self, lengths: torch.Tensor | None = None) -> list[list[dict]]:
        """Per row, the steps where the action fired (within ``lengths`` if given), with the
        signal, the compared value, the threshold and the action."""
        if self._record is None:
            return []
        view = self._record.view(self.clock.steps)
        record = {name: values.cpu() for name, values in view.items()}
        fired = record["fired"].bool()
        limit = lengths.cpu().tolist() if lengths is not None else [fired.shape[1]] * fired.shape[0]
        return [
            [
                self._event({name: float(v[i, step]) for name, v in record.items()}, step, i)
                for step in fired[i, : limit[i]].nonzero().flatten().tolist()
            ]
            for i in range(fired.shape[0])
        ]

    def _event(self, facts: dict[str, float], step: int, row: int) -> dict:
        threshold = None if self.thresholds is None else self.thresholds[row]
        return Fire.of(
            self.trigger,
            self.action,
            step=step,
            value=facts["value"],
            threshold=threshold,
            blocked=bool(facts.get("blocked")),
        ).to_dict()


class StopOnTrigger(TriggeredAction):
    """Force EOS for rows whose trigger fired (stop / abstain).

    Example:
        >>> import torch
        >>> from tokur_decode.core.policy import Trigger
        >>> stop = StopOnTrigger(Trigger("entropy", threshold=0.5), eos_token_id=3)
        >>> scores = torch.tensor([[0.0] * 5, [9.0, 0, 0, 0, 0]])
        >>> out = stop(torch.ones(2, 4, dtype=torch.long), scores)
        >>> out[0].tolist()     # high entropy: only EOS remains
        [-inf, -inf, -inf, 0.0, -inf]
        >>> out[1, 0].item()    # confident row untouched
        9.0
    """

    action = "stop"
    record_names = ("blocked",)

    def __init__(
        self, trigger: Trigger, eos_token_id: int | Sequence[int], **signal_params
    ) -> None:
        super().__init__(trigger, **signal_params)
        self.eos_token_ids = as_id_list(eos_token_id, "eos_token_id")
        if not self.eos_token_ids:
            raise ValueError("eos_token_id: a stop needs at least one EOS id")

    def _start(self, batch: int, device) -> None:
        self._eos_mask = None

    def act(self, scores, fired, values):
        if self._eos_mask is None:
            eos = torch.tensor(self.eos_token_ids, device=scores.device)
            mask = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
            self._eos_mask = mask.index_fill(0, eos, True)
        stopped, blocked = force_eos(scores, fired, self._eos_mask)
        return stopped, {"blocked": blocked}


class ResampleOnTrigger(TriggeredAction):
    """Change the distribution of rows whose trigger fired, for that step.

    Args:
        trigger: when to act.
        mode: ``"veto"`` (remove the argmax) or ``"adaptive"`` (entropix-style
            temperature from entropy and varentropy, then min-p).
        temperature, entropy_coef, varentropy_coef, min_temperature, max_temperature,
            min_p: the adaptive rule (see the module docstring).

    Example:
        >>> import torch
        >>> from tokur_decode.core.policy import Trigger
        >>> veto = ResampleOnTrigger(Trigger("max_prob", threshold=0.9, direction="below"))
        >>> veto(torch.ones(1, 2, dtype=torch.long), torch.tensor([[2.0, 1.0, 0.0]])).tolist()
        [[-inf, 1.0, 0.0]]
    """

    action = "resample"

    def __init__(
        self,
        trigger: Trigger,
        mode: str = _RULE.mode,
        *,
        temperature: float = _RULE.temperature,
        entropy_coef: float = _RULE.entropy_coef,
        varentropy_coef: float = _RULE.varentropy_coef,
        min_temperature: float = _RULE.min_temperature,
        max_temperature: float = _RULE.max_temperature,
        min_p: float = _RULE.min_p,
        **signal_params,
    ) -> None:
        config = ResampleConfig(  # checks the rule, as a recipe's [action] table is checked
            mode=mode,
            temperature=temperature,
            entropy_coef=entropy_coef,
            varentropy_coef=varentropy_coef,
            min_temperature=min_temperature,
            max_temperature=max_temperature,
            min_p=min_p,
        )
        extra = ("entropy", "varentropy") if mode == "adaptive" else ()
        super().__init__(trigger, extra_signals=extra, **signal_params)
        self.mode = mode
        self.rule = config.rule

    def act(self, scores, fired, values):
        if self.mode == "veto":
            return veto(scores, fired), {}
        entropy, varentropy = values["entropy"], values["varentropy"]
        return adaptive_temperature(scores, fired, entropy, varentropy, self.rule), {}
