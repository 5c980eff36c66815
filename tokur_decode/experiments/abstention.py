"""From a labelled ``eval`` run to a calibrated abstention recipe.

:func:`calibrate_run` reads a run folder, calibrates an abstention rule on its answers
(:func:`tokur_decode.experiments.calibration.calibrate`; the candidates are each
output's headline score, :func:`~tokur_decode.experiments.scoring.headline_scores`, and
a probe over every response score, unless the caller names one) and returns it with
the recipe that runs it (:class:`tokur_decode.strategies.actions.Abstain`):
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
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.probe import PROBE
from ..core.scores import outputs_read
from ..core.signals import signal_of_output
from ..strategies.recipe import Strategy
from .calibration import AbstentionRule, calibrate
from .detection import score_table
from .probe import probe_features
from .scoring import headline_scores, is_confidence
from .store import read_run

__all__ = ["CalibratedRun", "calibrate_run", "write_rule"]


@dataclass(frozen=True)
class CalibratedRun:
    """A rule, the recipe that runs it, and the labelled answers it came from."""

    rule: AbstentionRule
    strategy: Strategy
    correct: np.ndarray
    uncertainty: np.ndarray  # the rule's score per answer (NaN where it has none)
    run: str

    def report(self) -> dict:
        """The rule, the guarantee in words and where it holds (JSON-able)."""
        action = self.strategy.config
        return {
            "run": self.run,
            "rule": f"keep when {action.score} {'>=' if action.keep == 'above' else '<='} "
            f"{action.threshold:.6g}, else answer {action.abstain_text!r}",
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


def calibrate_run(
    run: str | Path,
    *,
    risk: float,
    delta: float = 0.1,
    score: str | None = None,
    holdout: float = 0.3,
    seed: int = 0,
    abstain_text: str = "I don't know.",
    name: str = "calibrated-abstain",
) -> CalibratedRun:
    """Calibrate an abstention rule on the ``eval`` run in folder ``run``.

    Raises:
        ValueError: not a detection run, or what :func:`~.calibration.calibrate` refuses.
    """
    config, records = read_run(run)
    if config.get("kind") != "detect":
        raise ValueError(f"run: {run} is a {config.get('kind')!r} run; calibrate needs an eval run")
    correct = np.array([r["correct"] for r in records], dtype=bool)
    features = probe_features(records)
    table = score_table(records)
    if score is None:  # the candidates: one score per output (its paper's) and the probe
        table = {k: table[k] for k in headline_scores(table)}
    rule = calibrate(
        correct,
        table,
        risk=risk,
        delta=delta,
        score=score,
        features=features,
        holdout=holdout,
        seed=seed,
    )
    if rule.score == PROBE:
        uncertainty = rule.probe.p_wrong(
            {k: _tensor(v) for k, v in features.items() if k in rule.probe.features}
        ).numpy()
        outputs = rule.probe.outputs
    else:
        uncertainty = score_table(records)[rule.score]
        outputs = outputs_read([rule.score])
    strategy = _recipe(rule, config, run, abstain_text, name, outputs)
    return CalibratedRun(rule, strategy, correct, uncertainty, str(run))


def _tensor(values):
    import torch

    return torch.as_tensor(np.asarray(values, dtype=np.float64))


def _recipe(rule, config, run, abstain_text, name, outputs) -> Strategy:
    confidence = rule.score != PROBE and is_confidence(rule.score)
    where = (
        f"model {config.get('model')}, chat {config.get('chat')}, greedy, "
        f"max_new_tokens {config.get('max_new_tokens')}, data {', '.join(config.get('data', []))}"
    )
    table = {
        "name": name,
        "description": f"Abstain unless {rule.score} passes a calibrated threshold: "
        f"{_guarantee(rule)}; for answers made as in {run} ({where}).",
        "signals": list(dict.fromkeys(signal_of_output(o) for o in outputs)),
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

    from .report import calibration_plot

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
            os.replace(tmp, target)
    except OSError as exc:
        raise ValueError(f"out: cannot write {out} ({exc.strerror})") from exc
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
    return targets
