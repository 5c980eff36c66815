"""Typed action configurations: one frozen dataclass per action type of a recipe's
``[action]`` table, every default and every validation rule in one place.

:data:`ACTIONS` maps the ``type`` key to its class; :func:`action_config` builds one from
a TOML table, naming the key that is wrong. The strategy layer dispatches on the type
(:data:`tokur_decode.strategies.run.PROCEDURES`); backends read the parameters they
execute from these objects.

Example:
    >>> action_config({"type": "best-of-n", "n": 4, "score": "self_certainty"})
    BestOfNConfig(score='self_certainty', reducer='mean', higher_is_better=True, method='argmax', \
eta=1.0, eta_rule='deepconf', borda_p=0.5, n=4, temperature=0.7, top_p=1.0)
    >>> action_config({"type": "branch", "k": 0})
    Traceback (most recent call last):
    ...
    ValueError: action.k: must be >= 1, got 0
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import ClassVar

from ..core import aggregate
from ..core.adaptive import RULES as ADAPTIVE_RULES
from ..core.checks import check_top_p
from ..core.momentum import check_gate
from ..core.probe import PROBE, Probe
from ..core.scores import check_score_name, outputs_read
from ..core.select import ETA_RULES, METHODS
from ..core.signals import OUTPUTS, signal_of_output
from ..core.steps import DEFAULT_DELIMITER, check_delimiter

__all__ = [
    "ACTIONS",
    "AbstainConfig",
    "ActionConfig",
    "AdaptiveSamplingConfig",
    "BestOfNConfig",
    "BranchConfig",
    "DeepConfOnlineConfig",
    "NoActionConfig",
    "ParticleFilterConfig",
    "ResampleConfig",
    "RollbackConfig",
    "SelectionConfig",
    "StepRedrawConfig",
    "StepwiseConfig",
    "StopConfig",
    "action_config",
]


@dataclass(frozen=True)
class ActionConfig:
    """Base class: ``type`` is the recipe's ``action.type``; the class variables below
    are what the strategy layer and the backends ask of an action type (capability
    facts), so that no module keeps its own list of action names."""

    type: ClassVar[str]
    #: Whether the action reads a ``[trigger]`` table.
    needs_trigger: ClassVar[bool] = False
    #: Whether it samples candidates or particles (at the caller's temperature, else
    #: its own, which must be > 0); such an action has no trigger threshold to set.
    samples: ClassVar[bool] = False
    #: What one engine request runs for it (``"none"``, ``"stop"``, ``"resample"``);
    #: ``None``: it spans several requests (branch, abstain on a response score) or
    #: needs tokur-decode's own decoding loop (rollback).
    in_one_request: ClassVar[str | None] = None
    #: Whether its answers can record each step's top-``k`` alternatives.
    records_alternatives: ClassVar[bool] = True

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        self.check()

    def check(self) -> None:
        """Value rules beyond the types (``ValueError`` naming ``action.<key>``)."""

    def to_dict(self) -> dict:
        """The ``[action]`` table (with ``type``)."""
        table = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {
            "type": self.type,
            **{k: v.to_dict() if isinstance(v, Probe) else v for k, v in table.items()},
        }

    @property
    def uses_trigger(self) -> bool:
        return self.needs_trigger


@dataclass(frozen=True)
class NoActionConfig(ActionConfig):
    """Record the signals; do nothing."""

    type: ClassVar[str] = "none"
    in_one_request: ClassVar[str | None] = "none"


@dataclass(frozen=True)
class StopConfig(ActionConfig):
    """Stop (force EOS) where the trigger fires; the answer becomes ``abstain_text`` when
    set."""

    type: ClassVar[str] = "stop"
    in_one_request: ClassVar[str | None] = "stop"
    needs_trigger: ClassVar[bool] = True
    abstain_text: str | None = None


@dataclass(frozen=True)
class ResampleConfig(ActionConfig):
    """Change the distribution where the trigger fires: ``"veto"`` removes the argmax;
    ``"adaptive"`` (entropix-style) divides the logits by ``clamp(temperature +
    entropy_coef * H + varentropy_coef * varentropy, min_temperature, max_temperature)``
    and drops tokens below ``min_p * p_max``."""

    type: ClassVar[str] = "resample"
    in_one_request: ClassVar[str | None] = "resample"
    needs_trigger: ClassVar[bool] = True
    #: The adaptive rule's parameters, in the order the engines take them.
    RULE: ClassVar[tuple[str, ...]] = (
        "temperature",
        "entropy_coef",
        "varentropy_coef",
        "min_temperature",
        "max_temperature",
        "min_p",
    )
    mode: str = "veto"
    temperature: float = 1.0
    entropy_coef: float = 0.3
    varentropy_coef: float = 0.1
    min_temperature: float = 0.5
    max_temperature: float = 2.0
    min_p: float = 0.05

    def check(self) -> None:
        """The whole rule, once (the engines' processors take it checked)."""
        if self.mode not in ("veto", "adaptive"):
            raise ValueError(f"action.mode: 'veto' or 'adaptive', got {self.mode!r}")
        _positive(self, "temperature")
        _positive(self, "min_temperature")
        if not self.max_temperature >= self.min_temperature:
            raise ValueError(
                f"action.max_temperature: must be >= min_temperature "
                f"({self.min_temperature}), got {self.max_temperature}"
            )
        if not 0 <= self.min_p < 1:
            raise ValueError(f"action.min_p: must be in [0, 1), got {self.min_p}")

    @property
    def rule(self) -> tuple[float, ...]:
        return tuple(float(getattr(self, name)) for name in self.RULE)


@dataclass(frozen=True)
class SelectionConfig(ActionConfig):
    """How candidates are chosen: the ``reducer`` of output ``score`` per candidate
    (``higher_is_better``), then ``method`` (see :func:`tokur_decode.core.select.choose`)
    over the top ``eta`` fraction as ``eta_rule`` counts it (``"deepconf"``, ``"tokur"``
    or ``"ceil"``: :func:`tokur_decode.core.select.top_eta`); ``borda_p``: the power of
    the ``"borda"`` vote."""

    score: str = ""
    reducer: str = "mean"
    higher_is_better: bool = True
    method: str = "argmax"
    eta: float = 1.0
    eta_rule: str = "deepconf"
    borda_p: float = 0.5

    def check(self) -> None:
        if not self.score:
            raise ValueError("action.score: selection needs a score (a signal output)")
        signal_of_output(self.score)
        _known_reducer(self)
        if self.method not in METHODS:
            raise ValueError(f"action.method: unknown {self.method!r}; choose from {METHODS}")
        if not 0 < self.eta <= 1:
            raise ValueError(f"action.eta: must be in (0, 1], got {self.eta}")
        if self.eta_rule not in ETA_RULES:
            raise ValueError(f"action.eta_rule: unknown {self.eta_rule!r}; choose from {ETA_RULES}")
        if not (isinstance(self.borda_p, int | float) and self.borda_p > 0):
            raise ValueError(f"action.borda_p: must be > 0, got {self.borda_p!r}")


@dataclass(frozen=True)
class BestOfNConfig(SelectionConfig):
    """Sample ``n`` answers at ``temperature`` / ``top_p``; keep the selected one."""

    type: ClassVar[str] = "best-of-n"
    samples: ClassVar[bool] = True
    in_one_request: ClassVar[str | None] = "none"  # one request records, n candidates
    n: int = 8
    temperature: float = 0.7
    top_p: float = 1.0

    def check(self) -> None:
        super().check()
        _at_least_one(self, "n")
        _positive(self, "temperature")
        _top_p(self)


@dataclass(frozen=True)
class BranchConfig(SelectionConfig):
    """Fork into the top ``k`` tokens at the first token (``at = "first"``) or where the
    trigger fires (``"trigger"``), at most ``max_branch_points`` times per prompt, within
    ``token_budget`` tokens per prompt (0: no cap); keep the selected branch."""

    type: ClassVar[str] = "branch"
    score: str = "margin"
    k: int = 5
    at: str = "first"
    max_branch_points: int = 1
    token_budget: int = 0

    def check(self) -> None:
        super().check()
        _at_least_one(self, "k", "max_branch_points")
        if self.at not in ("first", "trigger"):
            raise ValueError(f"action.at: 'first' or 'trigger', got {self.at!r}")
        if self.token_budget < 0:
            raise ValueError(
                f"action.token_budget: must be >= 0 (0: no cap), got {self.token_budget}"
            )

    @property
    def uses_trigger(self) -> bool:
        return self.at == "trigger"


@dataclass(frozen=True)
class RollbackConfig(ActionConfig):
    """Where the trigger fires, take back ``rewind`` tokens and decode them again at
    ``temperature``, at most ``max_retries`` times per row."""

    type: ClassVar[str] = "rollback"
    needs_trigger: ClassVar[bool] = True
    rewind: int = 4
    temperature: float = 1.0
    max_retries: int = 2

    def check(self) -> None:
        _at_least_one(self, "rewind", "max_retries")
        _positive(self, "temperature")


@dataclass(frozen=True)
class DeepConfOnlineConfig(SelectionConfig):
    """DeepConf online (Fu et al. 2025): ``warmup`` of ``n`` answers calibrate a
    threshold (the ``100 - keep`` percentile of their lowest ``window``-token group
    confidence); the others stop below it; the survivors vote."""

    type: ClassVar[str] = "deepconf-online"
    samples: ClassVar[bool] = True
    in_one_request: ClassVar[str | None] = "stop"  # at a calibrated threshold
    score: str = "deepconf"
    reducer: str = "deepconf_lowest_group"
    method: str = "weighted"
    n: int = 8
    warmup: int = 4
    keep: float = 90
    window: int = 16
    temperature: float = 0.7
    top_p: float = 1.0

    def check(self) -> None:
        super().check()
        _at_least_one(self, "n", "warmup", "window")
        _positive(self, "temperature")
        _top_p(self)
        if self.warmup >= self.n:
            raise ValueError(f"action.warmup: must be < n ({self.n}), got {self.warmup}")
        if not 0 < self.keep <= 100:
            raise ValueError(f"action.keep: a percentage in (0, 100], got {self.keep}")


@dataclass(frozen=True)
class AdaptiveSamplingConfig(ActionConfig):
    """Sample answers ``window`` at a time, at most ``n``, until the vote is settled
    (``rule``: ``"esc"``, a window that agrees; ``"beta"``, Adaptive-Consistency's
    ``P(leader beats runner-up) >= threshold``: :mod:`tokur_decode.core.adaptive`); the
    answers drawn vote (majority)."""

    type: ClassVar[str] = "adaptive-sampling"
    samples: ClassVar[bool] = True
    rule: str = "esc"
    window: int = 4
    n: int = 16
    threshold: float = 0.95
    temperature: float = 0.7
    top_p: float = 1.0

    def check(self) -> None:
        if self.rule not in ADAPTIVE_RULES:
            raise ValueError(f"action.rule: {self.rule!r}; choose from {ADAPTIVE_RULES}")
        _at_least_one(self, "window", "n")
        if self.window > self.n:
            raise ValueError(f"action.window: at most n ({self.n}), got {self.window}")
        if not 0.5 < self.threshold < 1:
            raise ValueError(f"action.threshold: in (0.5, 1), got {self.threshold}")
        _positive(self, "temperature")
        _top_p(self)


@dataclass(frozen=True)
class StepwiseConfig(ActionConfig):
    """Base of the actions that sample answers a step at a time: ``n`` particles or
    draws, a step ``score`` (its ``reducer``) or a ``probe``, steps that end where their
    text contains ``delimiter`` or after ``step_tokens`` tokens, sampled at
    ``temperature`` / ``top_p``."""

    samples: ClassVar[bool] = True
    records_alternatives: ClassVar[bool] = False
    n: int = 8
    score: str = "entropy"
    reducer: str = "mean"
    probe: Probe | None = None
    delimiter: str = DEFAULT_DELIMITER
    step_tokens: int = 32
    temperature: float = 0.7
    top_p: float = 1.0

    def check(self) -> None:
        _known_reducer(self)
        check_delimiter(self.delimiter, "action.delimiter")
        _at_least_one(self, "step_tokens")
        _positive(self, "temperature")
        _top_p(self)


@dataclass(frozen=True)
class ParticleFilterConfig(StepwiseConfig):
    """Particle filtering over reasoning steps (:mod:`tokur_decode.core.particles`): ``n``
    particles per prompt, sampled at ``temperature`` / ``top_p``, advance one step at a
    time (a step ends where its text contains ``delimiter``, or after ``step_tokens``
    tokens). After each step a particle's answer so far is scored: the ``reducer`` of
    output ``score`` over all its tokens (a step reducer, e.g. ``step_mean_max``, over
    its steps), ``+`` for a confidence and ``-`` for an uncertainty as the signal
    registry says, over ``weight_temperature``; that is the particle's potential, and
    its log-weight moves by the potential's change (twisted sequential Monte Carlo: a
    particle never resampled ends weighted by its whole answer's score, whatever its
    length). When the effective sample size falls below ``ess_threshold * n`` the
    prompt's particles are resampled systematically and their weights reset. The
    finished particles vote, weighted by their final weights. ``score = "probe"`` with
    a ``probe``: the potential is minus the probe's probability that the answer so far
    is wrong."""

    type: ClassVar[str] = "particle-filter"
    weight_temperature: float = 1.0
    ess_threshold: float = 0.5

    def check(self) -> None:
        if not _probe_scored(self):
            signal_of_output(self.score)
        super().check()
        _at_least_one(self, "n")
        _positive(self, "weight_temperature")
        if not 0 <= self.ess_threshold <= 1:
            raise ValueError(f"action.ess_threshold: in [0, 1], got {self.ess_threshold}")

    @property
    def sign(self) -> float:
        """``+1`` when a larger step score is better (a confidence), else ``-1`` (an
        uncertainty, the probe's probability of a wrong answer)."""
        return -1.0 if self.probe is not None else 1.0 if OUTPUTS[self.score].confidence else -1.0

    @property
    def outputs(self) -> tuple[str, ...]:
        """The signal outputs the step score reads."""
        return self.probe.outputs if self.probe is not None else (self.score,)


@dataclass(frozen=True)
class StepRedrawConfig(StepwiseConfig):
    """Uncertainty-gated redrawing of reasoning steps (MUR, Yan et al. 2025): each answer
    is decoded one step at a time (a step ends where its text contains ``delimiter``,
    or after ``step_tokens`` tokens), sampled at ``temperature`` / ``top_p``. A step is
    scored by the ``reducer`` of output ``score`` over its tokens, signed so that higher
    is better (``chosen_logprob``: MUR's mean log-probability); the momentum of an
    answer's step scores is their exponential moving average (weight ``momentum`` on
    the past, divided by the weights' sum so that early steps are not read against
    zero). A step after the first whose score falls more than ``-ln(scaling_rate)``
    below the momentum of the earlier steps is redrawn ``n - 1`` more times from the
    same prefix, and the best scored of its ``n`` draws continues; the momentum takes
    the kept step's score. Confident steps cost one draw, so the extra tokens go where
    the model is unsure. With a ``probe`` (a wrong-answer probe calibrated on labelled
    answers, ``tokur-decode calibrate``) the probe is MUR's critic: the draw kept is the
    one whose answer so far it finds least likely wrong, while ``score`` still gates.

    Example:
        >>> action_config({"type": "step-redraw", "n": 4}).sign  # chosen_logprob: higher is better
        1.0
        >>> action_config({"type": "step-redraw", "n": 1})
        Traceback (most recent call last):
        ...
        ValueError: action.n: draws of an uncertain step, >= 2, got 1
    """

    type: ClassVar[str] = "step-redraw"
    n: int = 4
    score: str = "chosen_logprob"
    momentum: float = 0.9
    scaling_rate: float = 0.8

    def check(self) -> None:
        signal_of_output(self.score)
        super().check()
        if self.n < 2:
            raise ValueError(f"action.n: draws of an uncertain step, >= 2, got {self.n}")
        check_gate(self.momentum, self.scaling_rate, "action.")

    @property
    def sign(self) -> float:
        """``+1`` when a larger step score is better (a confidence), else ``-1``."""
        return 1.0 if OUTPUTS[self.score].confidence else -1.0

    @property
    def outputs(self) -> tuple[str, ...]:
        """The signal outputs the gate and the critic read."""
        return (self.score, *(self.probe.outputs if self.probe is not None else ()))


@dataclass(frozen=True)
class AbstainConfig(ActionConfig):
    """Answer, then replace the answer by ``abstain_text`` unless its response score
    passes the rule: ``score`` (a :mod:`tokur_decode.core.scores` name, or ``"probe"``
    with a ``probe``) ``>= threshold`` when ``keep = "above"``, ``<= threshold`` when
    ``"below"``. ``risk``, ``delta``, ``coverage`` and ``calibrated_on`` record the
    guarantee of a calibrated rule (``tokur-decode calibrate``): with probability at
    least ``1 - delta`` over the calibration data, at most a ``risk`` fraction of the
    answers kept are wrong, and about ``coverage`` of the answers are kept."""

    type: ClassVar[str] = "abstain"
    score: str = ""
    keep: str = "below"
    threshold: float = 0.0
    abstain_text: str = "I don't know."
    probe: Probe | None = None
    risk: float | None = None
    delta: float | None = None
    coverage: float | None = None
    calibrated_on: str = ""

    def check(self) -> None:
        if not self.score:
            raise ValueError("action.score: the rule needs a response score")
        if not _probe_scored(self):
            check_score_name(self.score)
        if self.keep not in ("above", "below"):
            raise ValueError(f"action.keep: 'above' or 'below', got {self.keep!r}")
        for name in ("risk", "delta", "coverage"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 1:
                raise ValueError(f"action.{name}: must be in [0, 1], got {value}")

    @property
    def outputs(self) -> tuple[str, ...]:
        """The signal outputs the rule's score reads."""
        return self.probe.outputs if self.probe is not None else outputs_read([self.score])

    def keeps(self, value: float) -> bool:
        """Whether an answer whose score is ``value`` is kept (NaN never is)."""
        return value >= self.threshold if self.keep == "above" else value <= self.threshold


#: Every action type, by its recipe name.
ACTIONS: dict[str, type[ActionConfig]] = {
    cls.type: cls
    for cls in (
        NoActionConfig,
        StopConfig,
        ResampleConfig,
        BestOfNConfig,
        BranchConfig,
        RollbackConfig,
        DeepConfOnlineConfig,
        AdaptiveSamplingConfig,
        ParticleFilterConfig,
        StepRedrawConfig,
        AbstainConfig,
    )
}


def action_config(table: dict) -> ActionConfig:
    """The typed configuration of a recipe's ``[action]`` table (``type`` included,
    default ``"none"``).

    Raises:
        ValueError: naming ``action.<key>``.
    """
    table = dict(table)
    kind = table.pop("type", "none")
    if kind not in ACTIONS:
        raise ValueError(f"action.type: unknown {kind!r}; choose from {sorted(ACTIONS)}")
    cls = ACTIONS[kind]
    allowed = [f.name for f in dataclasses.fields(cls)]
    for key in table:
        if key not in allowed:
            raise ValueError(f"action.{key}: not a parameter of {kind!r} (allowed: {allowed})")
    if isinstance(table.get("probe"), dict):
        table["probe"] = Probe.from_dict(table["probe"])
    return cls(**table)


def _check_type(name: str, value, hint) -> None:
    allowed = typing.get_args(hint) or (hint,)
    ok = any(
        (t is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (t is int and isinstance(value, int) and not isinstance(value, bool))
        or (t is bool and isinstance(value, bool))
        or (t is str and isinstance(value, str))
        or (t is type(None) and value is None)
        or (t is Probe and isinstance(value, Probe))
        for t in allowed
    )
    if not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"action.{name}: invalid value {value!r}")


def _probe_scored(config) -> bool:
    """Whether ``config.score`` is the probe; its ``probe`` table comes with that score
    and only with it."""
    if config.score == PROBE:
        if config.probe is None:
            raise ValueError("action.probe: score 'probe' needs an [action.probe] table")
        return True
    if config.probe is not None:
        raise ValueError("action.probe: only for score = 'probe'")
    return False


def _known_reducer(config) -> None:
    if config.reducer not in aggregate.REDUCERS:
        raise ValueError(
            f"action.reducer: unknown {config.reducer!r}; choose from {sorted(aggregate.REDUCERS)}"
        )


def _at_least_one(config, *names: str) -> None:
    for name in names:
        if getattr(config, name) < 1:
            raise ValueError(f"action.{name}: must be >= 1, got {getattr(config, name)}")


def _positive(config, name: str) -> None:
    if not getattr(config, name) > 0:
        raise ValueError(f"action.{name}: must be > 0, got {getattr(config, name)}")


def _top_p(config) -> None:
    check_top_p(config.top_p, "action.top_p")
