"""Backends: what the experiment runners need from an engine, and the transformers one.

A backend turns prompts (plain user messages) into ``n`` responses each, with the
per-token signals of every response. The runners know nothing else about the engine:
a backend implements :class:`Backend`: ``describe()`` (what identifies its numbers, for
resumption) and ``generate(...)`` returning one :class:`Generation` per prompt.
Response-level scores that do not come from the trace (e.g. a verbalized confidence)
go in :attr:`Generation.extra`; the runners report them beside the trace aggregates
(and their calibration error when they are probabilities, see
:data:`tokur_decode.experiments.scoring.PROBABILITY_SCORES`).

Three backends ship: :class:`HFBackend` (transformers), :class:`VLLMBackend` (a vLLM
engine with :class:`tokur_decode.vllm.UncertaintyProcessor`) and
:class:`VerbalizedBackend`, which asks either engine for ``Answer: ...`` and
``Confidence: NN`` (:func:`tokur_decode.verbalized.ask`) and adds the verbalized
scores (:data:`VERBALIZED_EXTRA`).

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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from ..signals import SIGNALS
from ..trace import Trace

__all__ = [
    "ALL_SIGNALS",
    "VERBALIZED_EXTRA",
    "Backend",
    "Generation",
    "HFBackend",
    "VLLMBackend",
    "VerbalizedBackend",
    "resolve_signals",
]

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

    def loaded(self) -> tuple:
        """``(model, tokenizer)``, loaded on the first call."""
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

        _check_n(n, temperature)
        model, tokenizer = self.loaded()
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


def _check_n(n: int, temperature: float) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > 1 and temperature <= 0:
        raise ValueError("temperature: n > 1 responses per prompt need sampling (> 0)")


class VLLMBackend:
    """The vLLM backend: one request per prompt with ``SamplingParams(n=n)``, the
    signals recorded by :class:`tokur_decode.vllm.UncertaintyProcessor` and read back
    with :func:`tokur_decode.vllm.read_traces`.

    Args:
        engine: a ``vllm.LLM`` built with :func:`tokur_decode.vllm.llm`; or ``loader``,
            a function returning one, called on the first :meth:`generate`.
        model_name: how the model is named in the run's configuration.
        chat: chat template use (``None``: when the tokenizer has one).
        signal_params: processor options (``logtoku_k``, ``deepconf_k``, ...).

    Each request is seeded with ``seed`` plus the prompt's index in the call, so a
    prompt's candidates do not depend on the rest of the batch.
    """

    def __init__(
        self,
        engine=None,
        *,
        loader: Callable[[], object] | None = None,
        model_name: str,
        dtype: str = "auto",
        chat: bool | None = None,
        **signal_params,
    ) -> None:
        if (engine is None) == (loader is None):
            raise ValueError("engine: give either engine or loader")
        self._engine, self._loader = engine, loader
        self.model_name = model_name
        self.dtype = dtype
        self.chat = chat
        self.signal_params = signal_params

    def describe(self) -> dict:
        return {
            "backend": "vllm",
            "model": self.model_name,
            "dtype": self.dtype,
            "chat": self.chat,
            "signal_params": self.signal_params,
        }

    def loaded(self) -> tuple:
        """``(engine, None)``: the engine, built on the first call."""
        if self._engine is None:
            self._engine = self._loader()
        return self._engine, None

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
        from vllm import SamplingParams, TokensPrompt

        from ..vllm import prompt_token_ids, read_traces, uncertainty_args

        _check_n(n, temperature)
        engine, _ = self.loaded()
        tokenizer = engine.get_tokenizer()
        inputs = [
            TokensPrompt(prompt_token_ids=ids)
            for ids in prompt_token_ids(tokenizer, prompts, self.chat)
        ]
        args = uncertainty_args(list(signals), **self.signal_params)
        sampled = temperature > 0
        params = [
            SamplingParams(
                n=n,
                max_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p if sampled else 1.0,
                seed=seed + i if sampled else None,
                extra_args=args,
            )
            for i in range(len(inputs))
        ]
        outputs = engine.generate(inputs, params, use_tqdm=False)
        traces = read_traces(engine, outputs, tokenizer)
        if any(trace is None for trace in traces):
            raise ValueError("engine: no trace came back (build it with tokur_decode.vllm.llm)")
        return [
            Generation([c.text for c in out.outputs], trace)
            for out, trace in zip(outputs, traces, strict=True)
        ]


#: The extra scores of :class:`VerbalizedBackend` (confidences, higher = more likely
#: right), from :attr:`tokur_decode.verbalized.VerbalizedResult.scores`.
VERBALIZED_EXTRA = {
    "verbalized_confidence": "verbalized",
    "verbalized_expected": "expected_verbalized",
    "verbalized_combined": "combined",
    "answer_geomean_prob": "answer_geomean_prob",
}


class VerbalizedBackend:
    """Verbalized confidence on top of :class:`HFBackend` or :class:`VLLMBackend`: each
    prompt is asked with :func:`tokur_decode.verbalized.ask` (constrained ``Answer:`` /
    ``Confidence:`` format); the response the grader reads is the answer line; the
    stated, expected and combined confidences and the answer span's geometric-mean
    probability are the extra scores (:data:`VERBALIZED_EXTRA`; a score that is
    unavailable for a response, e.g. the expected confidence of a number not starting
    at a token boundary, is left out).

    The answer's length is bounded by ``max_answer_chars``, so the runner's
    ``max_new_tokens`` is not used. ``n`` candidates are ``n`` batched asks with seeds
    ``seed, seed + 1, ...``.

    Args:
        inner: the engine's backend (its model, tokenizer and chat setting are used).
        ask_options: :func:`tokur_decode.verbalized.ask` options (``template``,
            ``max_answer_chars``, ``mask_order``, ...).
    """

    def __init__(self, inner: HFBackend | VLLMBackend, **ask_options) -> None:
        self.inner = inner
        self.ask_options = ask_options

    def describe(self) -> dict:
        return {**self.inner.describe(), "verbalized": self.ask_options}

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
        from ..verbalized import ask

        _check_n(n, temperature)
        model, tokenizer = self.inner.loaded()
        options = dict(
            signals=list(signals),
            chat=self.inner.chat,
            temperature=temperature,
            top_p=top_p,
            **self.inner.signal_params,
            **self.ask_options,
        )
        draws = [ask(model, tokenizer, list(prompts), seed=seed + j, **options) for j in range(n)]
        out = []
        for i in range(len(prompts)):
            results = [draw[i] for draw in draws]
            extra = [
                {
                    name: r.scores[key]
                    for name, key in VERBALIZED_EXTRA.items()
                    if math.isfinite(r.scores[key])
                }
                for r in results
            ]
            trace = Trace.concat([r.trace for r in results])
            out.append(Generation([r.answer or "" for r in results], trace, extra))
        return out


def _first_logit_signal(signals: Sequence[str]) -> str:
    """A recorded signal that scores best-of-N candidates (the choice is not used)."""
    return next((s for s in signals if s in SIGNALS), "max_prob")
