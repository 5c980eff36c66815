"""From a labelled ``eval`` run to a calibrated abstention recipe.

:func:`calibrate_run` reads a run folder, calibrates an abstention rule on its answers
(:func:`tokur_decode.experiments.calibration.calibrate`; the candidates are each
output's headline score, :func:`~tokur_decode.experiments.scoring.headline_scores`, and
a probe over every response score, unless the caller names one) and returns it with
the recipe that runs it (:class:`tokur_decode.strategies.actions.AbstainConfig`):
``generate --strategy rule.toml``
answers, then replaces the answer by the abstain text when its score fails the rule.
:func:`write_rule` writes the recipe, the report (JSON) and the risk-coverage plot, all
or nothing.

The guarantee holds for answers produced the way the run's were: the same model,
prompts (chat template or not), greedy decoding, answer budget and TokUR options; the
recipe's description says which.

Example:
    >>> result = calibrate_run("runs/detect", risk=0.2, delta=0.1)      # doctest: +SKIP
    >>> write_rule(result, "my-rule.toml")                              # doctest: +SKIP
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..core.policy import Trigger, TriggerState
from ..core.probe import PROBE
from ..core.scores import outputs_read
from ..core.signals import signal_of_output
from ..strategies.recipe import Strategy
from .calibration import AbstentionRule, calibrate
from .detection import score_table
from .probe import probe_features
from .scoring import headline_scores, is_confidence
from .store import read_run

__all__ = ["CalibratedRun", "calibrate_run", "trigger_score", "write_rule"]


@dataclass(frozen=True)
class CalibratedRun:
    """A rule, the recipe that runs it, and the labelled answers it came from."""

    rule: AbstentionRule
    strategy: Strategy
    correct: np.ndarray
    uncertainty: np.ndarray  # the rule's score per answer
    run: str

    @property
    def rule_text(self) -> str:
        """The rule in words."""
        s = self.strategy
        if s.action == "stop":
            t = s.trigger
            return (
                f"stop and answer {s.config.abstain_text!r} as soon as {t.signal} is "
                f"{t.direction} {t.threshold:.6g} for {t.patience} step(s) "
                f"(from token {t.min_tokens}, window {t.window})"
            )
        a = s.config
        return (
            f"keep when {a.score} {'>=' if a.keep == 'above' else '<='} {a.threshold:.6g}, "
            f"else answer {a.abstain_text!r}"
        )

    def report(self) -> dict:
        """The rule, the guarantee in words and where it holds (JSON-able)."""
        return {
            "run": self.run,
            "rule": self.rule_text,
            "guarantee": _guarantee(self.rule),
            **self.rule.to_dict(),
            "recipe": self.strategy.to_dict(),
        }


def _guarantee(rule: AbstentionRule) -> str:
    return (
        f"with probability at least {1 - rule.delta:g} over the calibration data, at most "
        f"{rule.risk:g} of the answers kept are wrong (Learn then Test, "
        f"{rule.n_calibration} calibration items)"
    )


def trigger_score(trigger: Trigger, values) -> float:
    """Where ``trigger`` stands on one recorded answer, as an uncertainty ``u``: it fires
    somewhere on ``values`` (the answer's per-token values of ``trigger.signal``) at
    threshold ``lam`` exactly when ``u > lam`` (direction ``"above"``; for ``"below"``,
    when ``-u < lam``). An answer too short to fire scores the lowest float32.

    Example:
        >>> t = Trigger("entropy", threshold=0.0, patience=2)
        >>> trigger_score(t, [0.1, 3.0, 2.0, 0.5])     # the best 2-step run stays above 2.0
        2.0
    """
    state = TriggerState(replace(trigger, threshold=0.0), batch_size=1, device="cpu")
    smoothed = []
    for step, value in enumerate(values):
        state.update(torch.tensor([float(value)]), step)
        smoothed.append(float(state.smoothed_value[0]))
    p = trigger.patience
    first = max(trigger.min_tokens, p) - 1
    runs = [smoothed[t - p + 1 : t + 1] for t in range(first, len(smoothed))]
    if not runs:
        return float(np.finfo(np.float32).min)
    if trigger.direction == "above":
        return max(min(run) for run in runs)
    return -min(max(run) for run in runs)


def _float32_inside(threshold: float, direction: str) -> float:
    """The float32 threshold that keeps exactly the answers ``u <= threshold`` (the
    trigger compares float32 values): rounded down for "above", up for "below"."""
    target = threshold if direction == "above" else -threshold
    t = np.float32(target)
    if direction == "above" and float(t) > target:  # compared in float64
        t = np.nextafter(t, np.float32(-np.inf))
    if direction == "below" and float(t) < target:
        t = np.nextafter(t, np.float32(np.inf))
    return float(t)


def calibrate_run(
    run: str | Path,
    *,
    risk: float,
    delta: float = 0.1,
    score: str | None = None,
    recipe=None,
    holdout: float = 0.3,
    seed: int = 0,
    abstain_text: str = "I don't know.",
    name: str = "calibrated-abstain",
) -> CalibratedRun:
    """Calibrate an abstention rule on the ``eval`` run in folder ``run``.

    With ``recipe`` (an abstaining ``stop`` recipe: a shipped name, a path), its
    trigger's threshold is calibrated instead: the answers it would stop are known
    exactly from the recorded per-token values (:func:`trigger_score`), and the recipe
    comes back with the certified threshold (an online stop, which can end an answer
    early).

    Raises:
        ValueError: not a detection run, or what :func:`~.calibration.calibrate` refuses.
    """
    config, records = read_run(run)
    if config.get("kind") != "detect":
        raise ValueError(f"run: {run} is a {config.get('kind')!r} run; calibrate needs an eval run")
    unlabelled = sum(not isinstance(r.get("correct"), bool) for r in records)
    if unlabelled:
        raise ValueError(
            f"run: {unlabelled} of {len(records)} answers in {run} have no label (correct: "
            "null); calibration needs every answer graded (give their gold answers or "
            "correct: true/false to score, or leave them out)"
        )
    correct = np.array([r["correct"] for r in records], dtype=bool)
    if recipe is not None:
        if score is not None:
            raise ValueError("score: give either a score or a recipe whose trigger to calibrate")
        return _calibrate_trigger(
            Strategy.load(recipe), config, records, correct, run, risk, delta, holdout, seed, name
        )
    features = probe_features(records)
    table = score_table(records)
    # the candidates: one score per output (its paper's) and the probe, or the named one
    candidates = table if score is not None else {k: table[k] for k in headline_scores(table)}
    rule = calibrate(
        correct,
        candidates,
        risk=risk,
        delta=delta,
        score=score,
        features=features,
        holdout=holdout,
        seed=seed,
    )
    if rule.score == PROBE:
        uncertainty = rule.probe.p_wrong(
            {k: torch.from_numpy(features[k]) for k in rule.probe.features}
        ).numpy()
        outputs = rule.probe.outputs
    else:
        uncertainty = table[rule.score]
        outputs = outputs_read([rule.score])
    strategy = _recipe(rule, config, run, abstain_text, name, outputs)
    return CalibratedRun(rule, strategy, correct, uncertainty, str(run))


def _calibrate_trigger(strat, config, records, correct, run, risk, delta, holdout, seed, name):
    trigger = strat.trigger
    if strat.action != "stop" or strat.config.abstain_text is None:
        raise ValueError(
            f"recipe: {strat.name!r} does not abstain (a 'stop' recipe with an abstain_text)"
        )
    missing = [r["key"] for r in records if trigger.signal not in r["values"]]
    if missing:
        raise ValueError(
            f"recipe: the trigger reads {trigger.signal!r}, which the run did not record "
            f"(first item without it: {missing[0]})"
        )
    u = np.array([trigger_score(trigger, r["values"][trigger.signal]) for r in records])
    label = f"trigger:{trigger.signal}"
    rule = calibrate(
        correct, {label: u}, risk=risk, delta=delta, score=label, holdout=holdout, seed=seed
    )
    threshold = _float32_inside(rule.threshold, trigger.direction)
    description = (
        f"{strat.description} Threshold calibrated: {_guarantee(rule)}; for answers made as "
        f"in {run} ({_where(config)})."
    )
    strategy = replace(
        strat,
        name=name,
        description=description,
        trigger=replace(trigger, threshold=threshold),
        generation={"temperature": 0, "max_new_tokens": int(config["max_new_tokens"])},
    )
    return CalibratedRun(rule, strategy, correct, u, str(run))


def _where(config: dict) -> str:
    chat = {None: "the tokenizer's default", True: "on", False: "off"}[config.get("chat")]
    return (
        f"model {config.get('model')}, chat template {chat}, greedy, max_new_tokens "
        f"{config.get('max_new_tokens')}, data {', '.join(config.get('data', []))}"
    )


def _recipe(rule, config, run, abstain_text, name, outputs) -> Strategy:
    confidence = is_confidence(rule.score)
    table = {
        "name": name,
        "description": f"Abstain unless {rule.score} passes a calibrated threshold: "
        f"{_guarantee(rule)}; for answers made as in {run} ({_where(config)}).",
        "signals": list(dict.fromkeys(signal_of_output(o) for o in outputs)),
        "generation": {"temperature": 0, "max_new_tokens": int(config["max_new_tokens"])},
        "action": {
            "type": "abstain",
            "score": rule.score,
            "keep": "above" if confidence else "below",
            "threshold": -rule.threshold if confidence else rule.threshold,
            "abstain_text": abstain_text,
            "risk": rule.risk,
            "delta": rule.delta,
            "coverage": rule.coverage,
            "calibrated_on": f"{run} ({rule.n_items} items, {rule.n_calibration} calibration)",
        },
    }
    if rule.probe is not None:
        table["action"]["probe"] = rule.probe.to_dict()
    if "tokur" in table["signals"] and config.get("tokur"):
        table["tokur"] = dict(config["tokur"])
    return Strategy.from_dict(table)


def write_rule(result: CalibratedRun, out: str | Path) -> list[Path]:
    """Write the recipe to ``out`` (``.toml``), the report to ``out`` with ``.json`` and
    the risk-coverage plot with ``.png``: all three, or none (each is written to a
    temporary file first, then all are moved into place)."""
    import json

    from .plots import calibration_plot

    out = Path(out)
    if out.suffix != ".toml":
        raise ValueError(f"out: the recipe is a .toml file, got {out}")
    if not out.parent.is_dir():
        raise ValueError(f"out: the folder {out.parent} does not exist")
    targets = [out, out.with_suffix(".json"), out.with_suffix(".png")]
    temps = []
    try:
        for target in targets:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=out.parent)
            os.close(fd)
            temps.append(Path(tmp))
        result.strategy.save(temps[0])
        report = json.dumps(result.report(), indent=2, allow_nan=False)
        temps[1].write_text(report + "\n", encoding="utf-8")
        calibration_plot(result, temps[2])
        for tmp, target in zip(temps, targets, strict=True):
            os.chmod(tmp, 0o644)  # mkstemp's 0600 is for the temporary file only
            os.replace(tmp, target)
    except OSError as exc:
        raise ValueError(f"out: cannot write {out} ({exc.strerror})") from exc
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return targets
