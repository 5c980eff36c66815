"""The seam between strategies and engines: what a strategy asks a backend to do.

A strategy (:mod:`tokur_decode.strategies.run`) is written once against
:class:`Backend`; the transformers adapter (:class:`tokur_decode.hf.HFBackend`) and the
vLLM one (:class:`tokur_decode.vllm.VLLMBackend`) translate it into their engine's calls.
One call, :meth:`Backend.decode`: "decode ``n`` continuations of each prompt under these
sampling settings, recording these signals, optionally acting inside decoding", asked
with one validated :class:`Request` whose act is one of the typed configurations
below; and for search over reasoning steps, ``particles``: continuations that advance
a step at a time and can be copied between steps (:class:`Particles`). A backend
states which acts it can run in :attr:`Backend.acts`, so an unsupported one is refused
before anything runs.

Example:
    >>> Sampling(temperature=0.7, max_new_tokens=32).sampled
    True
    >>> Sampling(max_new_tokens=2.5)
    Traceback (most recent call last):
    ...
    ValueError: max_new_tokens: must be an integer >= 1, got 2.5
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

from ..core.checks import check_temperature, check_top_p
from ..core.policy import Trigger
from ..core.recording import Recording
from ..core.signals import parse_signals, wants_samples
from ..core.trace import Trace
from . import actions

__all__ = [
    "Backend",
    "BranchAct",
    "Decoded",
    "Deferred",
    "deferred",
    "description",
    "Particles",
    "Request",
    "ResampleAct",
    "RollbackAct",
    "Sampling",
    "StepsAct",
    "StopAct",
]


@dataclass(frozen=True)
class Sampling:
    """How to decode: ``temperature`` 0 is greedy (``top_p`` then 1); ``seed`` makes
    sampling reproducible (``None``: unseeded); at most ``max_new_tokens`` per answer.

    Raises:
        ValueError: naming the parameter.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        t, p, n = self.temperature, self.top_p, self.max_new_tokens
        check_temperature(t)
        check_top_p(p)
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"max_new_tokens: must be an integer >= 1, got {n!r}")
        seed = self.seed
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed: must be an integer or None, got {seed!r}")

    @property
    def sampled(self) -> bool:
        return self.temperature > 0


@dataclass(frozen=True)
class StopAct:
    """Stop a row where ``trigger`` fires (a forced EOS). ``thresholds``: one per
    prompt, overriding the trigger's (DeepConf online's calibrated thresholds)."""

    trigger: Trigger
    thresholds: tuple[float, ...] | None = None
    needs: ClassVar[str] = "a stop inside decoding"


@dataclass(frozen=True)
class ResampleAct:
    """Change a row's distribution at the steps where ``trigger`` fires, as ``rule``
    says. ``recipe``: the shipped name or TOML path the recipe came from, for engines
    that load it themselves (vLLM)."""

    trigger: Trigger
    rule: actions.ResampleConfig = actions.ResampleConfig()
    recipe: str | None = None
    needs: ClassVar[str] = "changing a row's distribution inside decoding"


@dataclass(frozen=True)
class BranchAct:
    """Fork rows as ``config`` says, at the first token (``trigger`` ``None``) or where
    ``trigger`` fires."""

    trigger: Trigger | None
    config: actions.BranchConfig = actions.BranchConfig()
    needs: ClassVar[str] = "forking answers"


@dataclass(frozen=True)
class RollbackAct:
    """Where ``trigger`` fires, roll back as ``config`` says."""

    trigger: Trigger
    config: actions.RollbackConfig = actions.RollbackConfig()
    needs: ClassVar[str] = "tokur-decode's own decoding loop (use the transformers backend)"


@dataclass(frozen=True)
class StepsAct:
    """Decode in reasoning steps: :meth:`Backend.particles` advances every particle to
    the end of its next step (its text contains ``delimiter``, or ``max_tokens`` more
    tokens), then waits to be told which particles continue."""

    delimiter: str
    max_tokens: int
    needs: ClassVar[str] = "continuing particles step by step"


Act = StopAct | ResampleAct | BranchAct | RollbackAct | StepsAct


@dataclass(frozen=True)
class Request:
    """What :meth:`Backend.decode` is asked: ``n`` answers per prompt (``n > 1`` needs
    sampling) under ``sampling``, recording ``signals`` (names, validated by
    :func:`~tokur_decode.core.signals.parse_signals`) in the same pass; ``act`` acts
    inside decoding; ``tokur``: TokUR options for backends that take them per call;
    ``recording``: what is recorded beside the signals
    (:class:`~tokur_decode.core.recording.Recording`).

    Raises:
        ValueError: naming the parameter.
    """

    signals: tuple[str, ...]
    sampling: Sampling = Sampling()
    n: int = 1
    act: Act | None = None
    tokur: dict | None = None
    recording: Recording = Recording()

    def __post_init__(self) -> None:
        object.__setattr__(self, "signals", parse_signals(self.signals))
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n: must be an integer >= 1, got {self.n!r}")
        if self.n > 1 and not self.sampling.sampled:
            raise ValueError("temperature: n > 1 answers per prompt need sampling (> 0)")

    @property
    def wants_samples(self) -> bool:
        """Whether a signal needs predictive samples (TokUR)."""
        return wants_samples(self.signals)


@dataclass
class Decoded:
    """What :meth:`Backend.decode` returns.

    Attributes:
        trace: every decoded row; for a plain or stopping decode ``n`` rows per prompt,
            prompt-major.
        prompt_of: the prompt each row answers.
        events: what the act did, in order: per row (fires, roll-backs); for a
            :class:`BranchAct`, whose forks make the rows, per prompt.
        tokens: tokens decoded in all (forks', roll-backs' and probes' included).
        scores: per row, response-level scores not derived from the trace, higher =
            more confident (a verbalized confidence); empty dicts if none.
        texts: what each row answers (default: the trace's texts; verbalized
            confidence: the answer line).
    """

    trace: Trace
    prompt_of: list[int]
    events: list[list[dict]]
    tokens: int
    scores: list[dict[str, float]] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.scores:
            self.scores = [{} for _ in self.prompt_of]
        if not self.texts:
            self.texts = list(self.trace.texts or [""] * len(self.prompt_of))

    def rows_of(self, prompt: int) -> list[int]:
        return [row for row, p in enumerate(self.prompt_of) if p == prompt]


class Particles(Protocol):
    """Particles advancing in steps (what :meth:`Backend.particles` gives, as a context
    manager): ``n`` per prompt, prompt-major (particle ``p * n + j`` answers prompt
    ``p``)."""

    #: Tokens decoded so far, over all particles and steps.
    tokens: int

    def advance(self, hold: Sequence[bool] | None = None) -> tuple[Trace, list[bool]]:
        """Decode every unfinished particle to the end of its next step, except those
        ``hold`` marks (they wait where they are, as finished ones do): returns that
        step's trace (row ``i``: particle ``i``'s new tokens, none for a particle that
        waited or had finished) and which particles have now finished (an EOS, or the
        answer's token budget)."""

    def select(self, index: Sequence[int]) -> None:
        """Continue with particles ``index`` (one per particle, repeats copy one, the
        prefix shared): particle ``i`` becomes a copy of old particle ``index[i]``."""

    def trace(self) -> Trace:
        """Every particle's answer so far."""


def one_per_particle(values: Sequence, particles: int, name: str) -> list:
    """``values`` as a list, checked to hold one entry per particle (what
    :meth:`Particles.advance`'s ``hold`` and :meth:`Particles.select`'s ``index`` take).

    Raises:
        ValueError: naming ``name``.
    """
    if len(values) != particles:
        raise ValueError(f"{name}: one per particle ({particles}), got {len(values)}")
    return list(values)


@runtime_checkable
class Backend(Protocol):
    """An engine as every layer above sees it: the strategies, the experiment runners
    and verbalized confidence. Implemented by :class:`tokur_decode.hf.HFBackend`,
    :class:`tokur_decode.vllm.VLLMBackend`, :class:`tokur_decode.vllm.remote.RemoteBackend`
    and :class:`tokur_decode.verbalized.VerbalizedBackend`; :class:`Deferred` builds
    one on first use."""

    #: The act types :meth:`decode` runs (a subset of ``StopAct, ResampleAct,
    #: BranchAct, RollbackAct, StepsAct``).
    acts: tuple[type, ...]

    def decode(self, prompts: Sequence[str], request: Request) -> Decoded:
        """Answer ``prompts`` as ``request`` says."""

    def particles(
        self, prompts: Sequence[str], request: Request
    ) -> contextlib.AbstractContextManager[Particles]:
        """Where :attr:`acts` include :class:`StepsAct`: ``request.n`` particles per
        prompt advancing in the steps of ``request.act`` (others raise ``ValueError``)."""

    def describe(self) -> dict:
        """JSON-able facts that determine the numbers (backend, model, dtype, chat,
        signal parameters, ...): an experiment resumed with another description is
        refused."""


def description(
    backend: str, model: str, dtype: str | None, chat: bool | None, signal_params: dict, **more
) -> dict:
    """What :meth:`Backend.describe` returns: the facts every backend states, then its
    own (``more``).

    Example:
        >>> description("hf", "m", "float32", None, {})["backend"]
        'hf'
    """
    return {
        "backend": backend,
        "model": model,
        "dtype": dtype,
        "chat": chat,
        **more,
        "signal_params": signal_params,
    }


def deferred(cls, loader: Callable[[], object], *, model_name: str, dtype: str = "auto", **options):
    """A backend of class ``cls`` built on its first use from what ``loader()`` returns
    (the constructor's positional arguments: a tuple, or one engine) and ``options``,
    described at once by ``cls.description(model_name, dtype, **options)`` (which checks
    them); ``dtype``: the dtype asked of the loader. Backends offer it as
    ``cls.deferred``."""
    description = cls.description(model_name, dtype, **options)

    def build():
        made = loader()
        backend = cls(
            *(made if isinstance(made, tuple) else (made,)), model_name=model_name, **options
        )
        backend.dtype = dtype
        return backend

    return Deferred(build, description, cls.acts)


class Deferred:
    """A backend built on its first use, described without building it (a resumed
    experiment whose items are all done never loads the model).

    Args:
        build: returns the backend.
        description: what :meth:`describe` returns (the class's own ``description``
            function gives the same as the built backend's ``describe()``).
        acts: the built backend's :attr:`Backend.acts`.

    Other attributes are the built backend's.

    Example:
        >>> calls = []
        >>> lazy = Deferred(lambda: calls.append(1), {"backend": "x"}, ())
        >>> lazy.describe(), calls
        ({'backend': 'x'}, [])
    """

    def __init__(self, build: Callable[[], Backend], description: dict, acts: tuple[type, ...]):
        self._build: Callable[[], Backend] = build
        self._built: Backend | None = None
        self.description, self.acts = description, acts

    def built(self) -> Backend:
        """The backend, built on the first call."""
        if self._built is None:
            self._built = self._build()
        return self._built

    def describe(self) -> dict:
        return self.description

    def decode(self, prompts: Sequence[str], request: Request) -> Decoded:
        return self.built().decode(prompts, request)

    def particles(self, prompts: Sequence[str], request: Request):
        return self.built().particles(prompts, request)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.built(), name)
