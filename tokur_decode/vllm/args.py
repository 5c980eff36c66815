"""Per-request settings of the vLLM processor: flat ``extra_args`` keys, validated.

Every key starts with ``tokur_`` and holds a string, a number or a list of them, so the
same settings travel through ``SamplingParams(extra_args=...)`` offline and through
``vllm_xargs`` over the OpenAI-compatible server. A request opts in by carrying at least
one ``tokur_`` key; others are untouched.

=========================  ==============================================================
``tokur_signals``          signal names (list or comma-separated string; ``"all"``;
                           ``"tokur"`` on an engine built with ``tokur_engine_args``)
``tokur_sigma``            TokUR's noise scale for this request (default: the engine's)
``tokur_strategy``         a shipped recipe name or a TOML path (its signals, trigger and
                           action; the keys below override them)
``tokur_action``           ``"none"`` | ``"stop"`` | ``"resample"``
``tokur_mode``             resample mode: ``"veto"`` | ``"adaptive"``
``tokur_trigger``          the signal output the trigger reads (``"logtoku_epistemic"``)
``tokur_threshold``        the trigger's threshold (e.g. a calibrated DeepConf threshold)
``tokur_direction``        ``"above"`` | ``"below"``
``tokur_patience``,        see :class:`tokur_decode.core.policy.Trigger`
``tokur_min_tokens``,
``tokur_window``
``tokur_deepconf_k``,      see :class:`tokur_decode.core.signals.SignalSpec`
``tokur_logtoku_k``,
``tokur_logtoku_evidence``
``tokur_<name>``           each field of :class:`~tokur_decode.core.recording.Recording`
                           (``tokur_alternatives``: each step's ``k`` most probable
                           tokens, 0 to 20; 0: none)
``tokur_branch_token``     the request continues an answer at a branch point (its prompt
                           ends with the answer so far): its first step is that point,
                           measured as usual, and emits this token id (``-1``: the
                           engine's own choice); the trigger watches from the next step.
                           An id beyond the vocabulary is logged by the engine and not
                           forced (the vocabulary is unknown where requests are checked)
``tokur_format``           how a server sends the trace: ``"json"`` (lists) or
                           ``"packed"`` (float16 / int32 in base64:
                           :mod:`tokur_decode.core.packing`; nothing offline)
=========================  ==============================================================

A ``deepconf-online`` strategy becomes, inside one request, "stop when the window
confidence falls below ``tokur_threshold``" (:func:`tokur_decode.strategies.candidates.
deepconf_trigger`); the warm-up that calibrates the threshold is the caller's
(:func:`tokur_decode.vllm.generate` runs the whole procedure). Best-of-N recipes only
record their signals in one request: :func:`tokur_decode.vllm.generate` samples the
candidates with ``SamplingParams(n=...)`` and chooses as the transformers path does.
Branch recipes span several requests (:mod:`tokur_decode.vllm.branching` re-submits
each alternative with ``tokur_branch_token``); rollback needs a decoding loop of ours.
Both are rejected as a single request's strategy.

Example:
    >>> args = uncertainty_args(signals=["entropy", "logtoku"], strategy="logtoku-abstain")
    >>> args["tokur_signals"], args["tokur_strategy"]
    ('entropy,logtoku', 'logtoku-abstain')
    >>> s = parse_settings(args)
    >>> s.action, s.trigger.signal, s.output_names[:2]
    ('stop', 'logtoku_epistemic', ('entropy', 'logtoku_aleatoric'))
    >>> parse_settings({"tokur_signals": "entropy", "tokur_window": 0})
    Traceback (most recent call last):
    ...
    ValueError: tokur_window: window must be an integer >= 1, got 0
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

from ..core.packing import FORMATS
from ..core.policy import Trigger
from ..core.recording import Recording
from ..core.signals import (
    DEFAULT_SIGNALS,
    OUTPUTS,
    SAMPLE_SIGNALS,
    SIGNALS,
    SPEC_PARAMS,
    SignalSpec,
    logit_signals,
    parse_signals,
    signal_of_output,
    wants_samples,
)
from ..strategies.actions import ACTIONS, DeepConfOnlineConfig, ResampleConfig
from ..strategies.candidates import deepconf_trigger
from ..strategies.recipe import Strategy
from .tokur import TOKUR_OUTPUTS

__all__ = ["PREFIX", "RequestSettings", "parse_settings", "stop_args", "uncertainty_args"]

PREFIX = "tokur_"
#: The trigger's keys: :class:`~tokur_decode.core.policy.Trigger`'s fields (its signal is
#: ``tokur_trigger``).
_TRIGGER_KEYS = tuple(f.name for f in fields(Trigger) if f.name != "signal")
_KEYS = frozenset(
    f"{PREFIX}{k}"
    for k in (
        "signals",
        "strategy",
        "action",
        "mode",
        "trigger",
        "sigma",
        "branch_token",
        "format",
        *_TRIGGER_KEYS,
        *SPEC_PARAMS,
        *Recording.names(),
    )
)


@dataclass(frozen=True)
class RequestSettings:
    """One request's validated settings (what :func:`parse_settings` returns)."""

    signals: tuple[str, ...]
    spec_params: tuple[int, int, str]  # deepconf_k, logtoku_k, logtoku_evidence
    action: str = "none"  # "none" | "stop" | "resample"
    trigger: Trigger | None = None
    mode: str = "veto"
    rule: tuple[float, ...] = ()
    sigma: float | None = None  # TokUR's noise scale; None: the engine's
    branch_token: int | None = None  # a branch continuation's first token (-1: not forced)
    recording: Recording = Recording()  # what is recorded beside the signals

    @property
    def output_names(self) -> tuple[str, ...]:
        """The signal outputs recorded for the request."""
        return tuple(key for name in self.signals for key in SIGNALS.get(name, TOKUR_OUTPUTS))

    @property
    def group_key(self) -> tuple:
        """Requests with equal keys share one signal pass and one trigger state (their
        signal lists and thresholds may differ)."""
        trigger = replace(self.trigger, threshold=None) if self.trigger else None
        tokur = wants_samples(self.needed_signals())  # rows that need the perturbed samples
        return (
            self.spec_params,
            self.action,
            trigger,
            self.mode,
            self.rule,
            tokur,
            self.recording,
        )

    def needed_signals(self) -> tuple[str, ...]:
        """Recorded signals plus what the trigger and the adaptive rule read."""
        extra = []
        if self.trigger is not None:
            extra.append(signal_of_output(self.trigger.signal))
        if self.action == "resample" and self.mode == "adaptive":
            extra += ["entropy", "varentropy"]
        return tuple(dict.fromkeys((*self.signals, *extra)))


def uncertainty_args(
    signals: Sequence[str] | str | None = None,
    strategy: str | None = None,
    **overrides,
) -> dict:
    """Flat ``extra_args`` for ``SamplingParams`` that opt a request in.

    ``overrides`` are the keys of the module table without the ``tokur_`` prefix
    (``threshold=0.3``, ``action="stop"``, ``trigger="entropy"``, ...). The result is
    validated here, so a mistake fails before it reaches the engine.

    Example:
        >>> uncertainty_args(["deepconf"], "deepconf-online", threshold=11.5)
        {'tokur_signals': 'deepconf', 'tokur_strategy': 'deepconf-online', 'tokur_threshold': 11.5}
    """
    args: dict = {}
    if signals is not None:
        try:
            names = signals if isinstance(signals, str) else ",".join(parse_signals(signals))
        except ValueError as exc:
            raise ValueError(f"{PREFIX}{exc}") from exc
        args[f"{PREFIX}signals"] = names
    if strategy is not None:
        args[f"{PREFIX}strategy"] = strategy
    for key, value in overrides.items():
        if f"{PREFIX}{key}" not in _KEYS:
            raise ValueError(f"{key}: unknown setting; choose from {sorted(_KEYS)}")
        args[f"{PREFIX}{key}"] = value
    if not args:
        raise ValueError("signals: give signals, a strategy or a setting to opt in")
    parse_settings(args)
    return args


def stop_args(trigger: Trigger) -> dict:
    """:func:`uncertainty_args` overrides for "stop where ``trigger`` fires" (its
    threshold included when it has one).

    Example:
        >>> stop_args(Trigger("entropy", threshold=2.0, window=4))["window"]
        4
    """
    args = {
        "action": "stop",
        "trigger": trigger.signal,
        "direction": trigger.direction,
        "patience": trigger.patience,
        "window": trigger.window,
        "min_tokens": trigger.min_tokens,
    }
    return args if trigger.threshold is None else {**args, "threshold": trigger.threshold}


def parse_settings(extra_args: Mapping | None) -> RequestSettings | None:
    """The validated settings in ``extra_args``, or ``None`` when the request does not
    opt in (no ``tokur_`` key).

    Raises:
        ValueError: naming the key.
    """
    if not extra_args:
        return None
    mine = {k: v for k, v in extra_args.items() if str(k).lower().startswith(PREFIX)}
    if not mine:
        return None
    key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in mine.items()))
    try:
        return _parse(key)
    except TypeError as exc:  # an unhashable value slipped in
        raise ValueError(f"extra_args: invalid value ({exc})") from exc


@functools.lru_cache(maxsize=256)
def _parse(items: tuple) -> RequestSettings:
    args = dict(items)
    unknown = sorted(set(args) - _KEYS)
    if unknown:
        raise ValueError(f"{unknown[0]}: unknown setting; choose from {sorted(_KEYS)}")
    strat = None
    if f"{PREFIX}strategy" in args:
        try:
            strat = Strategy.load(args[f"{PREFIX}strategy"])
        except (ValueError, FileNotFoundError) as exc:
            raise ValueError(f"{PREFIX}strategy: {exc}") from exc
        if strat.config.in_one_request is None:
            in_one = sorted(c.type for c in ACTIONS.values() if c.in_one_request is not None)
            raise ValueError(
                f"{PREFIX}strategy: action {strat.action!r} spans several requests "
                f"(tokur_decode.vllm.generate runs branch and abstain; rollback needs "
                f"tokur_decode.hf); in one request: {in_one}"
            )

    signals = args.get(f"{PREFIX}signals")
    if signals is None:
        signals = strat.signals if strat is not None else DEFAULT_SIGNALS
    try:
        signals = parse_signals(signals)
    except ValueError as exc:
        raise ValueError(f"{PREFIX}{exc}") from exc
    tokur = wants_samples(signals)
    spec_kwargs = {k: args[f"{PREFIX}{k}"] for k in SPEC_PARAMS if f"{PREFIX}{k}" in args}
    try:
        spec = SignalSpec(logit_signals(signals), **spec_kwargs)
    except ValueError as exc:
        raise ValueError(f"{PREFIX}{exc}") from exc
    sigma = args.get(f"{PREFIX}sigma")
    if sigma is not None and not tokur:
        raise ValueError(f"{PREFIX}sigma: only for a request whose signals include 'tokur'")
    if sigma is not None and (
        isinstance(sigma, bool) or not isinstance(sigma, int | float) or not sigma >= 0
    ):
        raise ValueError(f"{PREFIX}sigma: a number >= 0, got {sigma!r}")

    recording = Recording.from_flat(args, PREFIX)
    served_format = args.get(f"{PREFIX}format", "json")
    if served_format not in FORMATS:  # how a server encodes the trace (nothing offline)
        raise ValueError(f"{PREFIX}format: one of {list(FORMATS)}, got {served_format!r}")
    branch_token = args.get(f"{PREFIX}branch_token")
    if branch_token is not None and (
        isinstance(branch_token, bool) or not isinstance(branch_token, int) or branch_token < -1
    ):
        raise ValueError(
            f"{PREFIX}branch_token: a token id, or -1 for the engine's own choice, "
            f"got {branch_token!r}"
        )

    action, trigger, config = "none", None, None
    if strat is not None:
        config = strat.config
        action, trigger = config.in_one_request, strat.trigger
        if isinstance(config, DeepConfOnlineConfig):
            trigger = deepconf_trigger(config.window)
    action = args.get(f"{PREFIX}action", action)
    if action not in ("none", "stop", "resample"):
        raise ValueError(f"{PREFIX}action: 'none', 'stop' or 'resample', got {action!r}")
    rule = config if isinstance(config, ResampleConfig) else ResampleConfig()
    mode = args.get(f"{PREFIX}mode", rule.mode)
    if mode not in ("veto", "adaptive"):
        raise ValueError(f"{PREFIX}mode: 'veto' or 'adaptive', got {mode!r}")

    fields = {k: args[f"{PREFIX}{k}"] for k in _TRIGGER_KEYS if f"{PREFIX}{k}" in args}
    if f"{PREFIX}trigger" in args or fields:
        if f"{PREFIX}trigger" in args:
            fields["signal"] = args[f"{PREFIX}trigger"]
        try:
            base = trigger if trigger is not None else Trigger(fields.get("signal", "entropy"))
            trigger = replace(base, **fields)
        except ValueError as exc:
            name = str(exc).split(" ")[0].rstrip(":").replace("signal", "trigger")
            raise ValueError(f"{PREFIX}{name}: {exc}") from exc
    if action != "none":
        if trigger is None:
            raise ValueError(f"{PREFIX}trigger: action {action!r} needs a trigger")
        if trigger.threshold is None:
            raise ValueError(f"{PREFIX}threshold: the trigger on {trigger.signal!r} needs one")
        if OUTPUTS[trigger.signal].needs_token:
            raise ValueError(
                f"{PREFIX}trigger: {trigger.signal!r} is not known before the token is drawn"
            )
    else:
        trigger = None
    adaptive = rule.rule if action == "resample" and mode == "adaptive" else ()
    return RequestSettings(
        signals=(*spec.signals, *(s for s in signals if s in SAMPLE_SIGNALS)),
        spec_params=(spec.deepconf_k, spec.logtoku_k, spec.logtoku_evidence),
        action=action,
        trigger=trigger,
        mode=mode if action == "resample" else "veto",
        rule=adaptive,
        sigma=None if sigma is None else float(sigma),
        branch_token=branch_token,
        recording=recording,
    )
