"""Backends: what the experiment runners need from an engine, and the transformers one.

A backend turns prompts (plain user messages) into ``n`` responses each, with the
per-token signals of every response. The runners know nothing else about the engine:
a backend implements :class:`Backend`: ``describe()`` (what identifies its numbers, for
resumption) and ``generate(...)`` returning one :class:`Generation` per prompt.
Response-level scores that do not come from the trace (e.g. a verbalized confidence)
go in :attr:`Generation.extra`; the runners report them beside the trace aggregates
(and their calibration error when they are probabilities, see
:data:`tokur_decode.experiments.scoring.PROBABILITY_SCORES`).

Four backends ship: :class:`HFBackend` (transformers), :class:`VLLMBackend` (a vLLM
engine with :class:`tokur_decode.vllm.UncertaintyProcessor`), :class:`OpenAIBackend` (a
server started with ``tokur-decode serve``, over HTTP) and :class:`VerbalizedBackend`,
which asks either in-process engine for ``Answer: ...`` and ``Confidence: NN``
(:func:`tokur_decode.verbalized.ask`) and adds the verbalized scores
(:data:`VERBALIZED_EXTRA`).

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

from ..core.perturbation import checked_options
from ..core.signals import wants_samples
from ..core.trace import Trace
from ..strategies.backend import Request, Sampling

__all__ = [
    "VERBALIZED_EXTRA",
    "Backend",
    "Generation",
    "HFBackend",
    "OpenAIBackend",
    "VLLMBackend",
    "VerbalizedBackend",
]


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


class _Decoding:
    """What :class:`HFBackend` and :class:`VLLMBackend` share: the runners' call over a
    strategy-layer adapter (:meth:`adapter`), and the run's description."""

    name: str
    model_name: str
    dtype: str
    chat: bool | None
    signal_params: dict

    def adapter(self):
        """The strategy-layer backend (the engine loaded on the first call)."""
        raise NotImplementedError

    def _described(self) -> dict:
        return {}

    def _tokur(self, signals: Sequence[str]) -> dict | None:
        return None

    def describe(self) -> dict:
        return {
            "backend": self.name,
            "model": self.model_name,
            "dtype": self.dtype,
            "chat": self.chat,
            **self._described(),
            "signal_params": self.signal_params,
        }

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
        sampling = Sampling(
            temperature=temperature, top_p=top_p, seed=seed, max_new_tokens=max_new_tokens
        )
        request = Request(tuple(signals), sampling, n, tokur=self._tokur(signals))
        out = self.adapter().decode(list(prompts), request)
        generations = []
        for i in range(len(prompts)):
            trace = out.trace.select(out.rows_of(i))
            generations.append(Generation(list(trace.texts or []), trace))
        return generations


class HFBackend(_Decoding):
    """The transformers backend, over the strategy layer's :class:`tokur_decode.hf.HFBackend`.

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

    name = "hf"

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
        self.tokur = checked_options(tokur) or {}
        self.signal_params = signal_params

    def _described(self) -> dict:
        return {"tokur": self.tokur}

    def _tokur(self, signals: Sequence[str]) -> dict | None:
        return dict(self.tokur) if wants_samples(signals) else None

    def loaded(self) -> tuple:
        """``(model, tokenizer)``, loaded on the first call."""
        if self._model is None:
            self._model, self._tokenizer = self._loader()
        return self._model, self._tokenizer

    def rescore(
        self,
        prompts: Sequence,
        responses: Sequence[Sequence[int]],
        *,
        signals: Sequence[str],
        tokur_seed: int | None = None,
    ):
        """The trace of saved ``responses`` (token ids) teacher-forced after their
        prompts (:func:`tokur_decode.hf.scoring.score`), with ``signals``; TokUR with
        the backend's options and ``tokur_seed`` as its noise seed when given."""
        from ..hf.scoring import score

        model, tokenizer = self.loaded()
        tokur = dict(self.tokur) if wants_samples(signals) else None
        if tokur is not None and tokur_seed is not None:
            tokur["seed"] = tokur_seed
        return score(
            model,
            tokenizer,
            list(prompts),
            list(responses),
            signals=list(signals),
            tokur=tokur,
            chat=self.chat,
            batch_size=self.batch_size,
            **self.signal_params,
        )

    def adapter(self):
        from ..hf import HFBackend as Adapter

        model, tokenizer = self.loaded()
        return Adapter(
            model, tokenizer, chat=self.chat, batch_size=self.batch_size, **self.signal_params
        )


def _check_n(n: int, temperature: float) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n > 1 and temperature <= 0:
        raise ValueError("temperature: n > 1 responses per prompt need sampling (> 0)")


class VLLMBackend(_Decoding):
    """The vLLM backend: one request per prompt with ``SamplingParams(n=n)``, the
    signals recorded by :class:`tokur_decode.vllm.UncertaintyProcessor` and read back
    with :func:`tokur_decode.vllm.read_traces` (the strategy layer's
    :class:`tokur_decode.vllm.VLLMBackend`).

    Args:
        engine: a ``vllm.LLM`` built with :func:`tokur_decode.vllm.llm`; or ``loader``,
            a function returning one, called on the first :meth:`generate`.
        model_name: how the model is named in the run's configuration.
        chat: chat template use (``None``: when the tokenizer has one).
        signal_params: processor options (``logtoku_k``, ``deepconf_k``, ...).

    Prompt ``i`` of a call is seeded with ``seed + i * n`` (its samples ``seed + i * n +
    j``), so a prompt's candidates do not depend on the rest of the batch and no two
    samples of a call share a seed.
    """

    name = "vllm"

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

    def loaded(self) -> tuple:
        """``(engine, None)``: the engine, built on the first call."""
        if self._engine is None:
            self._engine = self._loader()
        return self._engine, None

    def adapter(self):
        from ..vllm import VLLMBackend as Adapter

        engine, _ = self.loaded()
        return Adapter(engine, chat=self.chat, **self.signal_params)


class OpenAIBackend(_Decoding):
    """A server started with ``tokur-decode serve`` (or any vLLM server with our
    plugins), over HTTP: the strategy layer's :class:`tokur_decode.vllm.remote.
    RemoteBackend`, so the requests, seeds and traces are those of :class:`VLLMBackend`
    on the same model.

    Args:
        base_url: the server (``http://host:port``).
        api_key: its ``--api-key``, if any.
        model: the served model's name (default: the server's first).
        model_name: how the model is named in the run's configuration (default: the
            served name).
        chat: chat template use (``None``: when the tokenizer has one).
        concurrency: requests in flight at once.
        signal_params: processor options (``logtoku_k``, ``deepconf_k``, ...).
    """

    name = "openai"
    dtype = "the server's"

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        model_name: str | None = None,
        chat: bool | None = None,
        concurrency: int = 8,
        **signal_params,
    ) -> None:
        from ..vllm.remote import RemoteBackend

        self._remote = RemoteBackend(
            base_url,
            api_key=api_key,
            model=model,
            chat=chat,
            concurrency=concurrency,
            **signal_params,
        )
        self.model_name = model_name or self._remote.model
        self.chat = chat
        self.signal_params = signal_params

    def _described(self) -> dict:
        return {"served_model": self._remote.model}

    def adapter(self):
        return self._remote


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
        if any(not isinstance(p, str) for p in prompts):
            raise ValueError("prompt_template: a system prompt does not go with --verbalized")
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
