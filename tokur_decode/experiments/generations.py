"""What the experiment runners ask of a backend: ``n`` responses per prompt, with the
per-token signals of every response.

The runners take any :class:`~tokur_decode.strategies.Backend` (the transformers one,
vLLM's, a served model's, verbalized confidence on either; each may be
:class:`~tokur_decode.strategies.backend.Deferred`, so a resumed run whose items are
all done never loads the model) and call it through :func:`generations`, which asks
one :class:`~tokur_decode.strategies.backend.Request` and groups the rows by prompt.
``describe()`` identifies the numbers, for resumption. Response-level scores that do
not come from the trace (a verbalized confidence) are in :attr:`Generation.extra`;
the runners report them beside the trace aggregates (and their calibration error
when they are probabilities, see
:data:`tokur_decode.experiments.scoring.PROBABILITY_SCORES`).

Example:
    >>> from tokur_decode.hf import HFBackend
    >>> from tokur_decode.models import load_default
    >>> backend = HFBackend.deferred(load_default, model_name="embedded", batch_size=8)
    >>> backend.describe()["backend"]
    'hf'
    >>> gens = generations(backend, ["What is 2 + 2?"], signals=["entropy"], n=2,
    ...                    temperature=0.7, max_new_tokens=8)          # doctest: +SKIP
    >>> len(gens[0].texts), gens[0].trace.names                        # doctest: +SKIP
    (2, ('entropy', 'max_prob'))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..core.trace import Trace
from ..strategies.backend import Backend, Request, Sampling

__all__ = ["Generation", "generations"]


@dataclass
class Generation:
    """The ``n`` responses to one prompt.

    Attributes:
        texts: the responses (what the grader reads).
        trace: their per-token signals, one row per response.
        extra: per response, response-level scores not derived from the trace, higher =
            more confident (e.g. ``{"verbalized_confidence": 0.8}``); empty dicts if none.
    """

    texts: list[str]
    trace: Trace
    extra: list[dict[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.extra:
            self.extra = [{} for _ in self.texts]
        if not len(self.texts) == len(self.trace) == len(self.extra):
            raise ValueError("texts, trace rows and extra must have one entry per response")


def generations(
    backend: Backend,
    prompts: Sequence,
    *,
    signals: Sequence[str],
    n: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> list[Generation]:
    """One :class:`Generation` of ``n`` responses per prompt, all ``signals`` recorded
    in the same pass; ``temperature=0`` decodes greedily.

    Raises:
        ValueError: naming the parameter (:class:`~tokur_decode.strategies.backend.
            Request` checks them), before anything is decoded.
    """
    sampling = Sampling(
        temperature=temperature, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens
    )
    out = backend.decode(list(prompts), Request(tuple(signals), sampling, n))
    result = []
    for i in range(len(prompts)):
        rows = out.rows_of(i)
        result.append(
            Generation(
                [out.texts[r] for r in rows],
                out.trace.select(rows),
                [out.scores[r] for r in rows],
            )
        )
    return result
