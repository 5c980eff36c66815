"""Backends: what the experiment runners need from an engine, and the transformers one.

A backend turns prompts (plain user messages) into ``n`` responses each, with the
per-token signals of every response. The runners know nothing else about the engine,
so a vLLM backend or a verbalized-confidence variant plugs in by implementing
:class:`Backend`: ``describe()`` (what identifies its numbers, for resumption) and
``generate(...)`` returning one :class:`Generation` per prompt. Response-level scores
that do not come from the trace (e.g. a verbalized confidence) go in
:attr:`Generation.extra`; the runners report them beside the trace aggregates (and
their calibration error when they are probabilities, see
:data:`tokur_decode.experiments.scoring.PROBABILITY_SCORES`).

Example:
    >>> from tokur_decode.models import load_default
    >>> backend = HFBackend(loader=load_default, model_name="embedded")
    >>> isinstance(backend, Backend)
    True
    >>> gens = backend.generate(["What is 2 + 2?"], signals=["entropy"], n=2,
    ...                         temperature=0.7, max_new_tokens=8)          # doctest: +SKIP
    >>> len(gens[0].texts), gens[0].trace.names                             # doctest: +SKIP
    (2, ('entropy', 'max_prob'))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..signals import SIGNALS
from ..trace import Trace

__all__ = ["ALL_SIGNALS", "Backend", "Generation", "HFBackend", "resolve_signals"]

#: What ``--signals all`` means for the runners: every logit signal and TokUR.
ALL_SIGNALS = (*SIGNALS, "tokur")


def resolve_signals(signals: str | Sequence[str]) -> tuple[str, ...]:
    """Signal names from a comma-separated string or a list; ``all`` is
    :data:`ALL_SIGNALS`.

    Example:
        >>> resolve_signals("entropy, chosen_logprob")
        ('entropy', 'chosen_logprob')
        >>> "tokur" in resolve_signals("all")
        True
    """
    names = [s.strip() for s in signals.split(",")] if isinstance(signals, str) else signals
    names = [n for n in names if n]
    if not names:
        raise ValueError("signals: at least one signal is required")
    out: list[str] = []
    for name in names:
        for n in ALL_SIGNALS if name == "all" else (name,):
            if n not in ALL_SIGNALS:
                raise ValueError(f"signals: unknown {n!r}; choose from {list(ALL_SIGNALS)} or all")
            if n not in out:
                out.append(n)
    return tuple(out)


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


@runtime_checkable
class Backend(Protocol):
    """What the experiment runners call."""

    def describe(self) -> dict:
        """JSON-able facts that determine the numbers (engine, model, dtype, ...): a run
        resumed with a different description is refused."""

    def generate(
        self,
        prompts: Sequence[str],
        *,
        signals: Sequence[str],
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        seed: int = 0,
    ) -> list[Generation]:
        """One :class:`Generation` of ``n`` responses per prompt, all ``signals``
        recorded in the same pass; ``temperature=0`` decodes greedily."""


class HFBackend:
    """The transformers backend, over :func:`tokur_decode.hf.generate`.

    Args:
        model, tokenizer: a loaded causal LM and its tokenizer; or ``loader``, a function
            returning both, called on the first :meth:`generate` (a resumed run whose
            items are all done never loads the model).
        model_name: how the model is named in the run's configuration.
        chat: chat template use (``None``: when the tokenizer has one).
        batch_size: prompts per ``generate`` call (``n`` responses each).
        tokur: :func:`tokur_decode.hf.perturbed` options when ``"tokur"`` is a signal
            (default: its defaults, rank 8, sigma 0.1, M = 10).
        signal_params: monitor options (``logtoku_k``, ``deepconf_k``, ...).
    """

    def __init__(
        self,
        model=None,
        tokenizer=None,
        *,
        loader: Callable[[], tuple] | None = None,
        model_name: str,
        dtype: str = "auto",
        chat: bool | None = None,
        batch_size: int = 8,
        tokur: dict | None = None,
        **signal_params,
    ) -> None:
        if (model is None) == (loader is None) or (model is None) != (tokenizer is None):
            raise ValueError("model: give either model and tokenizer, or loader")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._model, self._tokenizer, self._loader = model, tokenizer, loader
        self.model_name = model_name
        self.dtype = dtype
        self.chat = chat
        self.batch_size = batch_size
        self.tokur = dict(tokur or {})
        self.signal_params = signal_params

    def describe(self) -> dict:
        return {
            "backend": "hf",
            "model": self.model_name,
            "dtype": self.dtype,
            "chat": self.chat,
            "tokur": self.tokur,
            "signal_params": self.signal_params,
        }

    def _loaded(self):
        if self._model is None:
            self._model, self._tokenizer = self._loader()
        return self._model, self._tokenizer

    def generate(
        self,
        prompts: Sequence[str],
        *,
        signals: Sequence[str],
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 64,
        seed: int = 0,
    ) -> list[Generation]:
        from ..hf.generation import generate

        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if n > 1 and temperature <= 0:
            raise ValueError("temperature: n > 1 responses per prompt need sampling (> 0)")
        model, tokenizer = self._loaded()
        common = dict(
            signals=list(signals),
            chat=self.chat,
            max_new_tokens=max_new_tokens,
            seed=seed,
            tokur=dict(self.tokur) if "tokur" in signals else None,
            **self.signal_params,
        )
        out: list[Generation] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = list(prompts[start : start + self.batch_size])
            common["seed"] = seed + start
            if n == 1:
                result = generate(
                    model, tokenizer, batch, temperature=temperature, top_p=top_p, **common
                )
                out += [Generation(list(t.texts or []), t) for t in result.traces]
            else:  # N samples per prompt in one batched generate: the best-of-N path
                recipe = {
                    "name": "experiment-candidates",
                    "action": {
                        "type": "best-of-n",
                        "n": n,
                        "temperature": temperature,
                        "top_p": top_p,
                        "score": next(iter(SIGNALS[_first_logit_signal(signals)])),
                    },
                }
                result = generate(model, tokenizer, batch, strategy=recipe, **common)
                out += [Generation(list(t.texts or []), t) for t in result.candidates or []]
        return out


def _first_logit_signal(signals: Sequence[str]) -> str:
    """A recorded signal that scores best-of-N candidates (the choice is not used)."""
    return next((s for s in signals if s in SIGNALS), "max_prob")
