"""The validity benchmark of calibrated abstention: repeated random calibration/test
splits of one labelled ``eval`` run.

For each split the rule is calibrated on the calibration items only
(:func:`tokur_decode.experiments.calibration.calibrate`, which holds back part of them
to choose the score) and applied to the test items. Its guarantee says that the
fraction of splits whose test error among kept answers is at most ``risk`` should be
at least ``1 - delta`` (a finite test set adds its own noise, so this is a check, not a
proof). Next to it, on the same test items: answering everything, and each shipped
recipe that abstains (``stop`` with an abstain text), simulated exactly on the recorded
greedy answers (its trigger fires at the same step as it would have online, since the
values up to that step are the same).

Example:
    >>> table = validity("runs/detect", risk=0.3, delta=0.1, splits=20)   # doctest: +SKIP
    >>> table["methods"]["calibrated"]["valid_fraction"] >= 0.9            # doctest: +SKIP
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..core.policy import Trigger, TriggerState
from ..strategies.recipe import Strategy, available
from .calibration import calibrate
from .detection import score_table
from .probe import probe_features
from .scoring import headline_scores
from .store import read_run

__all__ = ["abstain_recipes", "trigger_fires", "validity"]


def trigger_fires(trigger: Trigger, values: Sequence[float]) -> bool:
    """Whether ``trigger`` fires anywhere on a recorded answer's per-token ``values``."""
    state = TriggerState(trigger, batch_size=1, device="cpu")
    return any(bool(state.update(torch.tensor([float(v)]), t)) for t, v in enumerate(values))


def abstain_recipes() -> list[Strategy]:
    """The shipped recipes that abstain: a ``stop`` with an abstain text."""
    recipes = [Strategy.load(name) for name in available()]
    return [s for s in recipes if s.action == "stop" and s.config.abstain_text is not None]


def _summary(correct: np.ndarray, kept: np.ndarray, risk: float) -> dict:
    """Per split: coverage, accuracy among kept (NaN when nothing is kept), valid."""
    n_kept = kept.sum(axis=1)
    right = (kept & correct).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        accuracy = np.where(n_kept > 0, right / n_kept, np.nan)
    valid = (n_kept == 0) | (1 - accuracy <= risk)
    return {
        "valid_fraction": float(valid.mean()),
        "coverage": float((n_kept / kept.shape[1]).mean()),
        "accuracy_kept": float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else None,
    }


def validity(
    run: str | Path,
    *,
    risk: float,
    delta: float = 0.1,
    splits: int = 20,
    test_fraction: float = 0.4,
    score: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """The benchmark's table (JSON-able): per method, over ``splits`` splits, the
    fraction of splits whose test error among kept answers is at most ``risk``, the
    mean coverage and the mean accuracy among kept answers. ``progress``: a bar over
    the splits on stderr (each calibrates, several seconds apiece).

    Raises:
        ValueError: ``splits < 1``, ``test_fraction`` outside (0, 1), or what
            :func:`~.calibration.calibrate` refuses on the first split.
    """
    from sklearn.model_selection import train_test_split

    if splits < 1:
        raise ValueError(f"splits: at least 1, got {splits}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction: must be in (0, 1), got {test_fraction}")
    _, records = read_run(run)
    correct = np.array([r["correct"] for r in records], dtype=bool)
    table = score_table(records)
    if score is None:
        table = {k: table[k] for k in headline_scores(table)}
    features = probe_features(records)
    recipes = [
        s for s in abstain_recipes() if all(s.trigger.signal in r["values"] for r in records)
    ]
    fires = {
        s.name: np.array([trigger_fires(s.trigger, r["values"][s.trigger.signal]) for r in records])
        for s in recipes
    }
    kept: dict[str, list[np.ndarray]] = {"calibrated": [], "answer everything": []}
    kept |= {name: [] for name in fires}
    chosen, uncertified = [], 0
    tests = []
    from tqdm.auto import tqdm

    for split in tqdm(range(splits), desc="splits", unit="split", disable=not progress):
        rest, test = train_test_split(
            np.arange(correct.size),
            test_size=test_fraction,
            random_state=seed + split,
            stratify=correct,
        )
        tests.append(test)
        try:
            rule = calibrate(
                correct[rest],
                {k: v[rest] for k, v in table.items()},
                risk=risk,
                delta=delta,
                score=score,
                features={k: v[rest] for k, v in features.items()},
                seed=seed + split,
            )
        except ValueError as exc:
            if split == 0 and "no threshold" not in str(exc):
                raise
            uncertified += 1  # nothing certified: abstain on everything (valid, coverage 0)
            kept["calibrated"].append(np.zeros(test.size, dtype=bool))
        else:
            chosen.append(rule.score)
            if rule.probe is not None:
                u = rule.probe.p_wrong(
                    {k: torch.from_numpy(features[k][test]) for k in rule.probe.features}
                ).numpy()
            else:
                u = table[rule.score][test]
            kept["calibrated"].append(rule.keeps(u))
        kept["answer everything"].append(np.ones(test.size, dtype=bool))
        for name, fired in fires.items():
            kept[name].append(~fired[test])
    methods = {}
    for name, rows in kept.items():
        truth = np.stack([correct[t] for t in tests])
        methods[name] = _summary(truth, np.stack(rows), risk)
    methods["calibrated"]["uncertified_splits"] = uncertified
    return {
        "run": str(run),
        "n": int(correct.size),
        "risk": risk,
        "delta": delta,
        "splits": splits,
        "test_fraction": test_fraction,
        "scores_chosen": {k: chosen.count(k) for k in dict.fromkeys(chosen)},
        "methods": methods,
    }
