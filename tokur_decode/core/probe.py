"""A learned probe: logistic regression over response scores, kept as plain data.

A :class:`Probe` turns the response scores of an answer (:mod:`tokur_decode.core.scores`
names: ``"entropy:mean"``, ``"tokur_epistemic:sum"``, ``"response_length"``, ...) into
the probability that the answer is wrong:

    p_wrong = sigmoid(intercept + sum_j coef_j * (x_j - mean_j) / scale_j)

It is fitted by :func:`tokur_decode.experiments.probe.fit_probe` (scikit-learn) and
stored as its numbers only (a JSON file, or a recipe's ``[action.probe]`` table), never
as a pickle, so loading one runs no code. Its value is a score like any other; its name
is :data:`PROBE`.

Example:
    >>> import torch
    >>> probe = Probe(features=("entropy:mean", "response_length"), mean=(1.0, 10.0),
    ...               scale=(0.5, 5.0), coef=(2.0, 0.0), intercept=0.0)
    >>> probe.p_wrong({"entropy:mean": torch.tensor([1.0, 1.5]),
    ...                "response_length": torch.tensor([3.0, 30.0])})
    tensor([0.5000, 0.8808], dtype=torch.float64)
    >>> Probe.from_dict(probe.to_dict()) == probe
    True
    >>> probe.p_wrong({"entropy:mean": torch.tensor([1.0])})
    Traceback (most recent call last):
    ...
    ValueError: probe: needs the scores ['response_length'], which were not recorded
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .scores import check_score_name, outputs_read, response_scores
from .trace import Trace

__all__ = ["PROBE", "Probe"]

#: The probe's score name (an uncertainty: the probability that the answer is wrong).
PROBE = "probe"


@dataclass(frozen=True)
class Probe:
    """Logistic regression over standardised response scores (see the module docstring).

    Attributes:
        features: the response scores it reads, in order.
        mean, scale: the standardisation of each feature (``scale > 0``).
        coef, intercept: the logistic regression on the standardised features.
        C: the inverse regularisation strength cross-validation chose (a record).
    """

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    C: float = 1.0

    def __post_init__(self) -> None:
        if not self.features:
            raise ValueError("probe.features: at least one feature is required")
        for name in self.features:
            check_score_name(name)
        for key in ("mean", "scale", "coef"):
            values = getattr(self, key)
            if len(values) != len(self.features):
                raise ValueError(
                    f"probe.{key}: {len(values)} values for {len(self.features)} features"
                )
            if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                raise ValueError(f"probe.{key}: every value must be a finite number")
        if not all(s > 0 for s in self.scale):
            raise ValueError("probe.scale: every value must be > 0")
        if not math.isfinite(self.intercept) or not self.C > 0:
            raise ValueError("probe: intercept must be finite and C > 0")

    @property
    def outputs(self) -> tuple[str, ...]:
        """The signal outputs its features reduce (what must be recorded)."""
        return outputs_read(self.features)

    def p_wrong(self, scores: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The probability that each answer is wrong, from its response scores (float64,
        on the scores' device).

        Raises:
            ValueError: a feature is missing from ``scores``.
        """
        missing = [name for name in self.features if name not in scores]
        if missing:
            raise ValueError(f"probe: needs the scores {missing}, which were not recorded")
        x = torch.stack([torch.as_tensor(scores[n]).double() for n in self.features], -1)
        params = torch.tensor([self.mean, self.scale, self.coef], dtype=torch.float64)
        mean, scale, coef = params.to(x.device)
        return torch.sigmoid(((x - mean) / scale) @ coef + self.intercept)

    def p_wrong_trace(self, trace: Trace) -> torch.Tensor:
        """:meth:`p_wrong` of every row of ``trace`` (its scores computed from it)."""
        return self.p_wrong(response_scores(trace, self.features))

    # ------------------------------------------------------------------ plain data

    def to_dict(self) -> dict:
        """The probe's numbers (lists and floats: JSON and TOML)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping) -> Probe:
        """A probe from :meth:`to_dict`'s form.

        Raises:
            ValueError: naming the key that is missing, unknown or invalid.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"probe: a table of numbers, got {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        unknown = set(data) - set(names)
        if unknown:
            raise ValueError(f"probe: unknown key(s) {sorted(unknown)}; allowed: {names}")
        missing = [n for n in names[:5] if n not in data]
        if missing:
            raise ValueError(f"probe: missing key(s) {missing}")
        values = {}
        for name in names:
            if name not in data:
                continue
            value = data[name]
            if name in ("features", "mean", "scale", "coef"):
                if isinstance(value, str) or not isinstance(value, list | tuple):
                    raise ValueError(f"probe.{name}: a list, got {value!r}")
                value = tuple(value)
            values[name] = value
        if not all(isinstance(f, str) for f in values["features"]):
            raise ValueError("probe.features: a list of score names")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        """Write the probe as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        """Read a probe written by :meth:`save`.

        Raises:
            ValueError: the file is not valid JSON or not a probe (naming the file).
        """
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            return cls.from_dict(data)
        except (json.JSONDecodeError, ValueError) as exc:
            raise ValueError(f"probe: {path}: {exc}") from exc
