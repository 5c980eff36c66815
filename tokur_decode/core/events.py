"""What an action did, as typed records with one ``to_dict``: the same records, built
in one place, whichever backend acted (``result.actions`` holds their dicts).

Example:
    >>> from tokur_decode.core.policy import Trigger
    >>> t = Trigger("entropy", threshold=2.0)
    >>> Fire.of(t, "stop", step=3, value=2.5, blocked=True).to_dict()["blocked"]
    'EOS forbidden by an earlier processor'
    >>> "blocked" in Fire.of(t, "stop", step=3, value=2.5).to_dict()
    False
    >>> Fork.of(None, step=0, candidate=0, value=None, forked_ids=[7, 3]).to_dict()["signal"]
    'first token'
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .policy import Trigger

__all__ = ["BLOCKED", "OVERRIDDEN", "Fire", "Fork"]

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
