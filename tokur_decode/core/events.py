"""What an action did, as typed records with one ``to_dict``: one class per event kind,
built in one place whichever backend acted (``result.actions`` holds their dicts,
``"action"`` naming the kind).

Example:
    >>> from tokur_decode.core.policy import Trigger
    >>> t = Trigger("entropy", threshold=2.0)
    >>> Fire.of(t, "stop", step=3, value=2.5, blocked=True).to_dict()["blocked"]
    'EOS forbidden by an earlier processor'
    >>> "blocked" in Fire.of(t, "stop", step=3, value=2.5).to_dict()
    False
    >>> Fork.of(None, step=0, candidate=0, value=None, forked_ids=[7, 3]).to_dict()["signal"]
    'first token'
    >>> AbstainEvent("entropy:mean", "below", 1.0, value=2.0, abstained=True).to_dict()["action"]
    'abstain'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from .policy import Trigger

__all__ = [
    "BLOCKED",
    "OVERRIDDEN",
    "AbstainEvent",
    "AdaptiveSamplingEvent",
    "BestOfNEvent",
    "Choice",
    "DeepConfOnlineEvent",
    "Fire",
    "Fork",
    "ParticleFilterEvent",
    "Rewind",
    "SelectEvent",
    "StepRedrawEvent",
]

#: Why a stop did not happen where its trigger fired: an earlier stage forbade the EOS
#: (a grammar, ``min_tokens``, ``ignore_eos``) ...
BLOCKED = "EOS forbidden by an earlier processor"
#: ... or a later one forced another token over it (vLLM's thinking-budget forcing).
OVERRIDDEN = "EOS overridden by a later stage (vLLM's thinking budget)"


@dataclass(frozen=True)
class Fire:
    """A trigger fired at ``step`` and its ``action`` (``"stop"``, ``"resample"``)
    acted, unless ``blocked`` says why not (:data:`BLOCKED`, :data:`OVERRIDDEN`)."""

    action: str
    step: int
    signal: str
    value: float
    threshold: float | None
    direction: str
    blocked: str | None = None

    @classmethod
    def of(cls, trigger: Trigger, action: str, *, step, value, threshold=None, blocked=False):
        """The fire of ``trigger`` (``threshold``: the row's own, when not the trigger's;
        ``blocked``: why the action did not happen, ``True`` for :data:`BLOCKED`)."""
        return cls(
            action=action,
            step=int(step),
            signal=trigger.signal,
            value=float(value),
            threshold=trigger.threshold if threshold is None else float(threshold),
            direction=trigger.direction,
            blocked=BLOCKED if blocked is True else (blocked or None),
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["blocked"] is None:
            del out["blocked"]
        return out


@dataclass(frozen=True)
class Fork:
    """Candidate number ``candidate`` of a prompt forked at ``step`` into
    ``forked_ids`` (token ids, its own continuation first), because ``trigger`` fired
    there with ``value``, or at the first token (no trigger)."""

    step: int
    candidate: int
    signal: str
    value: float | None
    threshold: float | None
    direction: str | None
    forked_ids: list[int]

    @classmethod
    def of(cls, trigger: Trigger | None, *, step, candidate, value, forked_ids) -> Fork:
        return cls(
            step=int(step),
            candidate=int(candidate),
            signal=trigger.signal if trigger else "first token",
            value=None if value is None else float(value),
            threshold=trigger.threshold if trigger else None,
            direction=trigger.direction if trigger else None,
            forked_ids=list(forked_ids),
        )

    def to_dict(self) -> dict:
        return {"action": "branch", **asdict(self)}


class _Event:
    """Base of the events below: ``to_dict`` is ``{"action": kind, **fields}``, without
    the optional fields that are ``None``."""

    action: ClassVar[str]
    _optional: ClassVar[tuple[str, ...]] = ()

    def to_dict(self) -> dict:
        out = asdict(self)  # type: ignore[call-overload]
        for name in self._optional:
            if out[name] is None:
                del out[name]
        choice = out.pop("choice", None)
        return {"action": self.action, **out, **(choice or {})}


@dataclass
class Rewind(_Event):
    """A roll-back at ``step``: the trigger fired with ``value``; the last ``rewound``
    tokens (``rewound_ids``) were taken back and regenerated (``retry``: the row's how
    manyth). Once settled, ``kept`` says which continuation stayed (``"new"``,
    ``"old"``) and the two scores it was chosen by."""

    action: ClassVar[str] = "rollback"
    _optional: ClassVar[tuple[str, ...]] = ("kept", "old_score", "new_score")

    step: int
    signal: str
    value: float
    threshold: float | None
    direction: str
    rewound: int
    retry: int
    rewound_ids: list[int]
    kept: str | None = None
    old_score: float | None = None
    new_score: float | None = None


@dataclass(frozen=True)
class Choice:
    """How one prompt's candidates were chosen among: each one's raw ``scores`` (by
    ``score`` reduced with ``reducer``) and ``answers``, and the ``chosen`` index."""

    chosen: int
    score: str
    reducer: str
    higher_is_better: bool
    method: str
    eta: float
    eta_rule: str
    scores: list[float]
    answers: list[Any]


@dataclass(frozen=True)
class BestOfNEvent(_Event):
    """``n`` sampled candidates, one chosen."""

    action: ClassVar[str] = "best-of-n"
    n: int
    choice: Choice


@dataclass(frozen=True)
class SelectEvent(_Event):
    """A branch recipe's choice among the ``k``-way forks' candidates."""

    action: ClassVar[str] = "select"
    k: int
    choice: Choice


@dataclass
class DeepConfOnlineEvent(_Event):
    """DeepConf online: ``warmup`` answers set ``threshold``; the later answers that fell
    below it (``stopped``, their indices among the later ones) stopped, saving
    ``tokens_saved``; ``voters`` answers voted."""

    action: ClassVar[str] = "deepconf-online"
    _optional: ClassVar[tuple[str, ...]] = ("choice", "voters")
    n: int
    warmup: int
    threshold: float
    window: int
    stopped: list[int]
    tokens: int
    tokens_saved: int
    choice: Choice | None = None
    voters: int | None = None


@dataclass(frozen=True)
class AdaptiveSamplingEvent(_Event):
    """Answers drawn in windows of ``window`` until ``rule`` said the vote is settled
    (``drawn`` of at most ``n``)."""

    action: ClassVar[str] = "adaptive-sampling"
    rule: str
    window: int
    n: int
    drawn: int
    tokens: int
    tokens_saved: int
    chosen: int
    answers: list[Any]


@dataclass(frozen=True)
class ParticleFilterEvent(_Event):
    """``n`` particles over ``steps`` steps, weighted by ``score`` reduced with
    ``reducer``; ``resampled``: each resampling (its step and effective sample size);
    the final ``weights`` voted."""

    action: ClassVar[str] = "particle-filter"
    n: int
    score: str
    reducer: str
    steps: int
    tokens: int
    resampled: list[dict]
    weights: list[float]
    answers: list[Any]
    chosen: int


@dataclass(frozen=True)
class StepRedrawEvent(_Event):
    """Step redrawing over ``steps`` steps; ``redrawn``: each step drawn again (its
    number, the draws' scores, the one kept)."""

    action: ClassVar[str] = "step-redraw"
    score: str
    reducer: str
    steps: int
    redrawn: list[dict]
    tokens: int


@dataclass(frozen=True)
class AbstainEvent(_Event):
    """An abstain rule on a response score: ``value`` kept (``keep`` ``"above"`` or
    ``"below"`` ``threshold``) or the answer ``abstained``; a calibrated rule's
    guarantee (``risk``, ``delta``) or ``coverage`` when it has one."""

    action: ClassVar[str] = "abstain"
    _optional: ClassVar[tuple[str, ...]] = ("risk", "delta", "coverage")
    score: str
    keep: str
    threshold: float
    value: float = field(default=float("nan"))
    abstained: bool = False
    risk: float | None = None
    delta: float | None = None
    coverage: float | None = None
