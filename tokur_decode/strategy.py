"""Strategy recipes: signals + trigger + action + parameters, as TOML or a dict.

Shipped recipes live in the top-level ``strategies/`` folder (inside the wheel as
``tokur_decode/strategies``) and load by name; a path to a ``.toml`` file or a dict works
too. Unknown keys and invalid values are rejected with a message naming the key.

Recipe format::

    name = "logtoku-abstain"
    description = "one line"
    signals = ["max_prob", "chosen_prob", "entropy", "logtoku"]   # what is recorded

    [generation]         # optional decoding defaults (the caller's arguments win)
    temperature = 0.7    # 0: greedy
    top_p = 1.0

    [trigger]            # for action types "stop" and "resample" (see tokur_decode.policy)
    signal = "logtoku_epistemic"
    threshold = 0.1
    direction = "above"
    patience = 2
    min_tokens = 1
    window = 1

    [action]
    type = "stop"        # "none" | "stop" | "resample" | "best-of-n" | "branch" | "rollback"
                         # | "deepconf-online"
    # stop:       abstain_text = "I don't know."
    # resample:   mode = "veto" | "adaptive", temperature, entropy_coef, varentropy_coef,
    #             min_temperature, max_temperature, min_p
    # best-of-n:  n, temperature, top_p, + selection keys
    # branch:     k, at = "first" | "trigger", max_branch_points, token_budget (0: none),
    #             + selection keys
    # rollback:   rewind, temperature, max_retries
    # deepconf-online: n, warmup, keep (percent of warm-up traces above the threshold),
    #             window, temperature, top_p, + selection keys (score: deepconf)
    # selection keys: score (a signal output), reducer, higher_is_better,
    #             method ("argmax" | "majority" | "weighted" | "weighted-softmax"), eta

    [tokur]              # optional: perturbed() options when signals include "tokur"
    samples = 10

Example:
    >>> s = Strategy.load("logtoku-abstain")
    >>> s.action, s.trigger.signal
    ('stop', 'logtoku_epistemic')
    >>> Strategy.from_dict(s.to_dict()) == s
    True
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import aggregate
from .policy import Trigger, signal_of_output
from .select import METHODS

__all__ = ["Strategy", "available", "strategies_dir"]

_SELECTION_KEYS = {
    "score": (str,),
    "reducer": (str,),
    "higher_is_better": (bool,),
    "method": (str,),
    "eta": (int, float),
}
_SAMPLING_KEYS = {"n": (int,), "temperature": (int, float), "top_p": (int, float)}
_ACTION_KEYS = {
    "none": {},
    "stop": {"abstain_text": (str, type(None))},
    "resample": {
        "mode": (str,),
        "temperature": (int, float),
        "entropy_coef": (int, float),
        "varentropy_coef": (int, float),
        "min_temperature": (int, float),
        "max_temperature": (int, float),
        "min_p": (int, float),
    },
    "best-of-n": {**_SAMPLING_KEYS, **_SELECTION_KEYS},
    "branch": {
        "k": (int,),
        "at": (str,),
        "max_branch_points": (int,),
        "token_budget": (int,),
        **_SELECTION_KEYS,
    },
    "rollback": {"rewind": (int,), "temperature": (int, float), "max_retries": (int,)},
    "deepconf-online": {
        **_SAMPLING_KEYS,
        "warmup": (int,),
        "keep": (int, float),
        "window": (int,),
        **_SELECTION_KEYS,
    },
}
_SELECTION_DEFAULTS = {"reducer": "mean", "higher_is_better": True, "method": "argmax", "eta": 1.0}
_DEFAULTS = {
    "best-of-n": {"n": 8, "temperature": 0.7, "top_p": 1.0, **_SELECTION_DEFAULTS},
    "branch": {
        "k": 5,
        "at": "first",
        "max_branch_points": 1,
        "token_budget": 0,
        **_SELECTION_DEFAULTS,
        "score": "margin",
    },
    "rollback": {"rewind": 4, "temperature": 1.0, "max_retries": 2},
    "deepconf-online": {
        "n": 8,
        "warmup": 4,
        "keep": 90,
        "window": 16,
        "temperature": 0.7,
        "top_p": 1.0,
        **_SELECTION_DEFAULTS,
        "score": "deepconf",
        "reducer": "deepconf_lowest_group",
        "method": "weighted",
    },
}
#: Actions that need a [trigger] table (branch only with at = "trigger").
_NEEDS_TRIGGER = ("stop", "resample", "rollback")
_TOP_KEYS = {"name", "description", "signals", "generation", "trigger", "action", "tokur"}
_GENERATION_KEYS = {"temperature": (int, float), "top_p": (int, float)}
_TOKUR_KEYS = {"rank", "sigma", "samples", "seed", "target_modules", "direction", "decode", "mode"}


def strategies_dir() -> Path:
    """The folder of shipped recipes (in a source checkout or inside the wheel)."""
    package = Path(__file__).resolve().parent
    for candidate in (package / "strategies", package.parent / "strategies"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the shipped strategies/ folder is missing from the installation")


def available() -> dict[str, str]:
    """Shipped recipe names with their one-line descriptions."""
    return {
        path.stem: Strategy.load(path).description
        for path in sorted(strategies_dir().glob("*.toml"))
    }


@dataclass(frozen=True)
class Strategy:
    """A validated recipe (see the module docstring for the format)."""

    name: str
    description: str = ""
    signals: tuple[str, ...] = ()
    action: str = "none"
    trigger: Trigger | None = None
    params: dict = field(default_factory=dict)
    tokur: dict | None = None
    generation: dict = field(default_factory=dict)

    @classmethod
    def load(cls, spec) -> Strategy:
        """A :class:`Strategy` from a shipped name, a ``.toml`` path, a dict or itself."""
        if isinstance(spec, Strategy):
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        path = Path(spec)
        if path.suffix != ".toml":
            path = strategies_dir() / f"{spec}.toml"
            if not path.is_file():
                raise ValueError(
                    f"strategy: no recipe named {spec!r}; shipped: {sorted(available())}"
                )
        with path.open("rb") as fh:
            try:
                data = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"strategy: {path}: invalid TOML: {exc}") from exc
        data.setdefault("name", path.stem)
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> Strategy:
        unknown = set(data) - _TOP_KEYS
        if unknown:
            raise ValueError(
                f"strategy: unknown key(s) {sorted(unknown)}; allowed: {sorted(_TOP_KEYS)}"
            )
        name = data.get("name")
        if not isinstance(name, str) or not name:
            raise ValueError("name: a recipe needs a non-empty name")
        signals = data.get("signals", [])
        if isinstance(signals, str) or not all(isinstance(s, str) for s in signals):
            raise ValueError("signals: must be a list of signal names")
        action = dict(data.get("action", {"type": "none"}))
        kind = action.pop("type", "none")
        if kind not in _ACTION_KEYS:
            raise ValueError(f"action.type: unknown {kind!r}; choose from {sorted(_ACTION_KEYS)}")
        for key, value in action.items():
            allowed = _ACTION_KEYS[kind]
            if key not in allowed:
                raise ValueError(
                    f"action.{key}: not a parameter of {kind!r} (allowed: {sorted(allowed)})"
                )
            if not isinstance(value, allowed[key]) or (
                isinstance(value, bool) and bool not in allowed[key]
            ):
                raise ValueError(f"action.{key}: invalid value {value!r}")
        trigger = None
        if "trigger" in data:
            try:
                trigger = Trigger(**data["trigger"])
            except TypeError as exc:
                raise ValueError(f"trigger: {exc}") from exc
        action = {**_DEFAULTS.get(kind, {}), **action}
        needs_trigger = kind in _NEEDS_TRIGGER or (kind == "branch" and action["at"] == "trigger")
        if needs_trigger and trigger is None:
            raise ValueError(f"trigger: action {kind!r} needs a [trigger] table")
        if trigger is not None and not needs_trigger:
            raise ValueError(f"trigger: action {kind!r} does not use a [trigger] table")
        _check_action(kind, action)
        tokur = data.get("tokur")
        if tokur is not None:
            bad = set(tokur) - _TOKUR_KEYS
            if bad:
                raise ValueError(
                    f"tokur: unknown key(s) {sorted(bad)}; allowed: {sorted(_TOKUR_KEYS)}"
                )
        return cls(
            name=name,
            description=str(data.get("description", "")),
            signals=tuple(signals),
            action=kind,
            trigger=trigger,
            params=action,
            tokur=dict(tokur) if tokur is not None else None,
            generation=_check_generation(data.get("generation", {})),
        )

    def to_dict(self) -> dict:
        """The recipe as a plain dict (``Strategy.from_dict(s.to_dict()) == s``)."""
        data = {
            "name": self.name,
            "description": self.description,
            "signals": list(self.signals),
            "action": {"type": self.action, **self.params},
        }
        if self.trigger is not None:
            data["trigger"] = asdict(self.trigger)
        if self.tokur is not None:
            data["tokur"] = dict(self.tokur)
        if self.generation:
            data["generation"] = dict(self.generation)
        return data


def _check_generation(table: dict) -> dict:
    """The ``[generation]`` table: decoding defaults a caller's own arguments override."""
    for key, value in table.items():
        if key not in _GENERATION_KEYS:
            raise ValueError(f"generation.{key}: unknown key; allowed: {sorted(_GENERATION_KEYS)}")
        if not isinstance(value, _GENERATION_KEYS[key]) or isinstance(value, bool):
            raise ValueError(f"generation.{key}: invalid value {value!r}")
    if table.get("temperature", 0) < 0:
        raise ValueError(f"generation.temperature: must be >= 0, got {table['temperature']}")
    if not 0 < table.get("top_p", 1) <= 1:
        raise ValueError(f"generation.top_p: must be in (0, 1], got {table['top_p']}")
    return dict(table)


def _check_action(kind: str, p: dict) -> None:
    """Value checks beyond the types, naming the key."""
    for key in ("n", "k", "max_branch_points", "rewind", "max_retries", "warmup", "window"):
        if key in p and p[key] < 1:
            raise ValueError(f"action.{key}: must be >= 1, got {p[key]}")
    if "temperature" in p and not p["temperature"] > 0:
        raise ValueError(f"action.temperature: must be > 0, got {p['temperature']}")
    if "top_p" in p and not 0 < p["top_p"] <= 1:
        raise ValueError(f"action.top_p: must be in (0, 1], got {p['top_p']}")
    if kind == "branch":
        if p["at"] not in ("first", "trigger"):
            raise ValueError(f"action.at: 'first' or 'trigger', got {p['at']!r}")
        if p["token_budget"] < 0:
            raise ValueError(
                f"action.token_budget: must be >= 0 (0: no cap), got {p['token_budget']}"
            )
    if kind == "deepconf-online":
        if p["warmup"] >= p["n"]:
            raise ValueError(f"action.warmup: must be < n ({p['n']}), got {p['warmup']}")
        if not 0 < p["keep"] <= 100:
            raise ValueError(f"action.keep: a percentage in (0, 100], got {p['keep']}")
    if set(_SELECTION_KEYS) <= set(_ACTION_KEYS[kind]):
        _check_selection(p)


def _check_selection(p: dict) -> None:
    if "score" not in p:
        raise ValueError("action.score: selection needs a score (a signal output)")
    signal_of_output(p["score"])
    if p["reducer"] not in aggregate.REDUCERS:
        raise ValueError(
            f"action.reducer: unknown {p['reducer']!r}; choose from {sorted(aggregate.REDUCERS)}"
        )
    if p["method"] not in METHODS:
        raise ValueError(f"action.method: unknown {p['method']!r}; choose from {METHODS}")
    if not 0 < p["eta"] <= 1:
        raise ValueError(f"action.eta: must be in (0, 1], got {p['eta']}")
