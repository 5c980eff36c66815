"""Strategy recipes: signals + trigger + action + parameters, as TOML or a dict.

Shipped recipes live in ``tokur_decode/strategies/recipes/`` (package data) and load by
name; a path to a ``.toml`` file or a dict works too. Unknown keys and invalid values
are rejected with a message naming the key.

Recipe format::

    name = "logtoku-abstain"
    description = "one line"
    signals = ["max_prob", "chosen_prob", "entropy", "logtoku"]   # what is recorded

    [generation]         # optional decoding defaults (the caller's arguments win)
    temperature = 0.7    # 0: greedy
    top_p = 1.0
    max_new_tokens = 64  # the answer budget (a calibrated rule's: the run's)

    [trigger]            # for action types "stop" and "resample" (see tokur_decode.core.policy)
    signal = "logtoku_epistemic"
    threshold = 0.1
    direction = "above"
    patience = 2
    min_tokens = 1
    window = 1

    [action]
    type = "stop"        # "none" | "stop" | "resample" | "best-of-n" | "branch" | "rollback"
                         # | "deepconf-online" | "abstain" | "adaptive-sampling"
                         # | "particle-filter" | "step-redraw"
    # stop:       abstain_text = "I don't know."
    # resample:   mode = "veto" | "adaptive", temperature, entropy_coef, varentropy_coef,
    #             min_temperature, max_temperature, min_p
    # best-of-n:  n, temperature, top_p, + selection keys
    # branch:     k, at = "first" | "trigger", max_branch_points, token_budget (0: none),
    #             + selection keys
    # rollback:   rewind, temperature, max_retries
    # abstain:    score (a response score "<output>:<reducer>" or "probe"), keep =
    #             "above" | "below", threshold, abstain_text, [action.probe] (a probe's
    #             numbers), and the calibration's record: risk, delta, coverage,
    #             calibrated_on (tokur-decode calibrate writes these)
    # deepconf-online: n, warmup, keep (percent of warm-up traces above the threshold),
    #             window, temperature, top_p, + selection keys (score: deepconf)
    # adaptive-sampling: rule, window, n (at most), threshold, temperature, top_p
    # particle-filter: n, score, reducer, probe, weight_temperature, ess_threshold,
    #             delimiter, step_tokens, temperature, top_p
    # step-redraw: n, score, reducer, probe, momentum, scaling_rate, delimiter,
    #             step_tokens, temperature, top_p
    # selection keys: score (a signal output), reducer, higher_is_better,
    #             method ("argmax" | "majority" | "weighted" | "weighted-softmax"), eta,
    #             eta_rule, borda_p

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

from ..core.checks import check_temperature, check_top_p
from ..core.perturbation import checked_options
from ..core.policy import Trigger
from .actions import ActionConfig, NoActionConfig, action_config

__all__ = ["Strategy", "available", "strategies_dir"]

_TOP_KEYS = {"name", "description", "signals", "generation", "trigger", "action", "tokur"}
_GENERATION_KEYS = {"temperature": (int, float), "top_p": (int, float), "max_new_tokens": (int,)}


def strategies_dir() -> Path:
    """The folder of shipped recipes (``tokur_decode/strategies/recipes``, package data)."""
    folder = Path(__file__).resolve().parent / "recipes"
    if not folder.is_dir():
        raise FileNotFoundError(f"the shipped recipes folder {folder} is missing")
    return folder


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
    config: ActionConfig = NoActionConfig()
    trigger: Trigger | None = None
    tokur: dict | None = None
    generation: dict = field(default_factory=dict)

    @property
    def action(self) -> str:
        """The action type (``config.type``)."""
        return self.config.type

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
        trigger = None
        if "trigger" in data:
            try:
                trigger = Trigger(**data["trigger"])
            except TypeError as exc:
                raise ValueError(f"trigger: {exc}") from exc
            if "action" not in data:
                raise ValueError(
                    "action: the recipe has a [trigger] table but no [action] table "
                    '(e.g. type = "stop" or "resample")'
                )
        config = action_config(data.get("action", {"type": "none"}))
        if config.uses_trigger and trigger is None:
            raise ValueError(f"trigger: action {config.type!r} needs a [trigger] table")
        if trigger is not None and not config.uses_trigger:
            raise ValueError(f"trigger: action {config.type!r} does not use a [trigger] table")
        tokur = checked_options(data.get("tokur"))
        return cls(
            name=name,
            description=str(data.get("description", "")),
            signals=tuple(signals),
            config=config,
            trigger=trigger,
            tokur=dict(tokur) if tokur is not None else None,
            generation=_check_generation(data.get("generation", {})),
        )

    def save(self, path: str | Path) -> None:
        """Write the recipe as TOML (``Strategy.load(path) == self``); unset (``None``)
        parameters are left out."""
        import tomli_w

        def present(table: dict) -> dict:
            return {
                k: present(v) if isinstance(v, dict) else v
                for k, v in table.items()
                if v is not None
            }

        Path(path).write_text(tomli_w.dumps(present(self.to_dict())), encoding="utf-8")

    def to_dict(self) -> dict:
        """The recipe as a plain dict (``Strategy.from_dict(s.to_dict()) == s``)."""
        data = {
            "name": self.name,
            "description": self.description,
            "signals": list(self.signals),
            "action": self.config.to_dict(),
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
    check_temperature(table.get("temperature", 0), "generation.temperature")
    check_top_p(table.get("top_p", 1), "generation.top_p")
    if table.get("max_new_tokens", 1) < 1:
        raise ValueError(f"generation.max_new_tokens: must be >= 1, got {table['max_new_tokens']}")
    return dict(table)
