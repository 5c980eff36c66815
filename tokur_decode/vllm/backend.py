"""The vLLM adapter of the strategy layer: :class:`VLLMBackend`.

Prompts are encoded as the transformers adapter encodes them
(:func:`tokur_decode.core.text.prompt_token_ids`), sent as token ids with
:func:`~tokur_decode.vllm.uncertainty_args` (``SamplingParams(n=...)`` for several answers
per prompt; vLLM seeds the ``j``-th sample of a request ``seed + j``, so prompt ``i`` is
sent with ``seed + i * n`` and no two samples of a call share a seed), and the traces
read back with
:func:`~tokur_decode.vllm.read_traces`. A stop or resample act travels as the request's
flat settings; a branch act runs as rounds of re-submitted requests
(:mod:`tokur_decode.vllm.branching`), and so do particles advancing in steps
(:mod:`tokur_decode.vllm.particles`). Roll-back needs a decoding loop of ours and is
not offered.

Example:
    >>> import tokur_decode.vllm as tv
    >>> from tokur_decode.strategies.backend import Request, Sampling
    >>> backend = tv.VLLMBackend(tv.llm(enforce_eager=True))             # doctest: +SKIP
    >>> request = Request(("entropy",), Sampling(temperature=0.7), n=2)
    >>> out = backend.decode(["What is 2 + 2?"], request)                 # doctest: +SKIP
    >>> out.prompt_of                                                     # doctest: +SKIP
    [0, 0]
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict

from ..core.limits import check_context
from ..core.perturbation import PerturbationConfig
from ..core.signals import wants_samples
from ..core.text import prompt_token_ids
from ..core.trace import Trace
from ..strategies import backend as acts
from ..strategies.backend import deferred as build_on_first_use
from .args import stop_args, uncertainty_args
from .client import read_traces
from .tokur import is_tokur_engine, settings_of

__all__ = ["VLLMBackend"]


class VLLMBackend:
    """A ``vllm.LLM`` built with :func:`tokur_decode.vllm.llm` as a
    :class:`~tokur_decode.strategies.Backend`.

    Args:
        engine: the engine (``VLLMBackend.deferred(loader, model_name=..., **the rest)``:
            built on first use, see :func:`~tokur_decode.strategies.backend.deferred`).
        chat: chat template use (``None``: when the tokenizer has one).
        model_name: how :meth:`describe` names the model (default: the engine's).
        signal_params: processor options (``logtoku_k``, ``deepconf_k``,
            ``logtoku_evidence``).
    """

    acts = (acts.StopAct, acts.ResampleAct, acts.BranchAct, acts.StepsAct)
    name = "vllm"

    def __init__(
        self, engine, *, chat: bool | None = None, model_name: str | None = None, **signal_params
    ) -> None:
        uncertainty_args("max_prob", **signal_params)  # validated here, not per request
        self.engine, self.chat, self.signal_params = engine, chat, signal_params
        self.model_name = model_name

    deferred = classmethod(build_on_first_use)

    @classmethod
    def description(
        cls, model_name: str, dtype: str | None, chat: bool | None = None, **signal_params
    ) -> dict:
        """What :meth:`describe` says of a backend built with these arguments."""
        uncertainty_args("max_prob", **signal_params)
        return acts.description(cls.name, model_name, dtype, chat, signal_params)

    #: The dtype :meth:`describe` reports (a deferred backend: the one asked of its
    #: loader; else the engine's).
    dtype: str | None = None

    def describe(self) -> dict:
        config = self.engine.llm_engine.model_config
        dtype = self.dtype or str(config.dtype).removeprefix("torch.")
        return self.description(
            self.model_name or config.model, dtype, self.chat, **self.signal_params
        )

    #: How to get an engine that has TokUR's model (for the error without one).
    TOKUR_HOW = "tokur_decode.vllm.llm(**tokur_decode.vllm.tokur_engine_args(...))"

    def has_tokur(self) -> bool:
        """Whether the engine has TokUR's model."""
        return is_tokur_engine(self.engine)

    def _inputs(self, prompts: Sequence[str], sampling: acts.Sampling) -> list[list[int]]:
        """The prompts' token ids, each checked to fit the engine's ``max_model_len``
        with the answer budget (vLLM's own refusal is a long traceback)."""
        inputs = self.token_ids(prompts)
        check_context([len(ids) for ids in inputs], sampling.max_new_tokens, self.context())
        return inputs

    def context(self) -> int | None:
        """The positions a request may use (the engine's ``max_model_len``)."""
        return self.engine.llm_engine.model_config.max_model_len

    def token_ids(self, prompts: Sequence[str]) -> list[list[int]]:
        return prompt_token_ids(self.engine.get_tokenizer(), prompts, self.chat)

    def decode(self, prompts: Sequence[str], request: acts.Request) -> acts.Decoded:
        """``request.tokur``'s noise scale travels with each request (``tokur_sigma``);
        its other options are the engine's (:func:`~tokur_decode.vllm.tokur_engine_args`),
        and a request that asks for other values is refused, naming them."""
        signals, sampling, n, act = request.signals, request.sampling, request.n, request.act
        self._check_tokur(signals)
        branching = isinstance(act, acts.BranchAct)
        tokur = self._tokur_settings(request, per_request=not branching)
        inputs = self._inputs(prompts, sampling)
        if branching:
            from .branching import branch

            return branch(self, inputs, signals, act, sampling)
        params = [
            self.params(
                signals,
                sampling,
                n=n,
                seed=None if sampling.seed is None else sampling.seed + i * n,
                settings={**_settings(act, i), **request.recording.to_flat(""), **tokur},
            )
            for i in range(len(inputs))
        ]
        _, traces = self.send(inputs, params)
        return acts.Decoded(
            trace=Trace.concat(traces),
            prompt_of=[i for i, t in enumerate(traces) for _ in range(len(t))],
            events=[events for t in traces for events in t.meta["actions"]],
            tokens=sum(int(t.lengths.sum()) for t in traces),
        )

    @contextlib.contextmanager
    def particles(self, prompts: Sequence[str], request: acts.Request):
        """``request.n`` particles per prompt advancing in the steps of ``request.act``
        (a :class:`~tokur_decode.strategies.backend.StepsAct`) as re-submitted requests: a
        context manager giving :class:`~tokur_decode.vllm.particles.VLLMParticles`."""
        from .particles import VLLMParticles

        if not isinstance(request.act, acts.StepsAct):
            raise ValueError("act: particles advance in Steps")
        self._check_tokur(request.signals)
        self._tokur_settings(request, per_request=False)
        yield VLLMParticles(self, self._inputs(prompts, request.sampling), request)

    def _tokur_settings(self, request: acts.Request, per_request: bool = True) -> dict:
        """The per-request settings that carry ``request.tokur`` on this engine
        (``{"sigma": ...}`` where the noise scale is given and ``per_request``); any
        other option must be the engine's, or ``ValueError`` names it."""
        given = request.tokur or {}
        if not given or not wants_samples(request.signals):
            return {}
        built, _ = settings_of(self.engine.llm_engine.model_config.hf_config)
        asked = PerturbationConfig(**{**asdict(built), **given})
        travels = ("sigma",) if per_request else ()
        differ = sorted(
            k for k in given if k not in travels and getattr(asked, k) != getattr(built, k)
        )
        if differ:
            values = ", ".join(f"{k}={getattr(built, k)!r}" for k in differ)
            where = "; only sigma travels per request" if per_request else ""
            raise ValueError(
                f"tokur: this engine's TokUR was built with {values}; a request cannot "
                f"change {differ} (build the engine with tokur_engine_args(...){where})"
            )
        return {"sigma": asked.sigma} if "sigma" in given and per_request else {}

    def _check_tokur(self, signals) -> None:
        if wants_samples(signals) and not self.has_tokur():
            raise ValueError(
                f"signals: 'tokur' needs an engine with TokUR's model: {self.TOKUR_HOW}"
            )

    def params(self, signals, sampling: acts.Sampling, *, n=1, seed=None, settings=None, **kw):
        """One request's ``SamplingParams``: ``settings`` are
        :func:`~tokur_decode.vllm.uncertainty_args` overrides (``strategy`` included),
        ``kw`` further ``SamplingParams`` fields."""
        from vllm import SamplingParams

        return SamplingParams(**self.request_fields(signals, sampling, n, seed, settings, **kw))

    def request_fields(self, signals, sampling: acts.Sampling, n, seed, settings, **kw) -> dict:
        """:meth:`params` as the ``SamplingParams`` fields it sets (no vLLM needed)."""
        settings = dict(settings or {})
        recipe = settings.pop("strategy", None)
        kw.setdefault("max_tokens", sampling.max_new_tokens)
        return dict(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.sampled else 1.0,
            seed=seed if sampling.sampled else None,
            extra_args=uncertainty_args(list(signals), recipe, **self.signal_params, **settings),
            **kw,
        )

    def send(self, inputs: list[list[int]], params: list) -> tuple[list, list[Trace]]:
        """Token-id prompts with their ``SamplingParams``: the outputs and their traces."""
        from vllm import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in inputs]
        outputs = self.engine.generate(prompts, params, use_tqdm=False)
        traces = read_traces(self.engine, outputs)
        if any(trace is None for trace in traces):
            raise ValueError("engine: no trace came back (build it with tokur_decode.vllm.llm)")
        return outputs, traces


def _settings(act, prompt: int) -> dict:
    """The request settings of ``act`` for prompt number ``prompt``."""
    if act is None:
        return {}
    if isinstance(act, acts.StopAct):
        settings = stop_args(act.trigger)
        if act.thresholds is not None:
            settings["threshold"] = act.thresholds[prompt]
        return settings
    if act.recipe is not None:  # the engine loads the recipe (its adaptive rule included)
        return {"strategy": act.recipe, "threshold": act.trigger.threshold}
    if act.rule.mode == "adaptive":
        raise ValueError(
            "strategy: an adaptive resample recipe runs on vLLM by name or TOML path "
            "(the engine loads its rule), not as a dict"
        )
    return {**stop_args(act.trigger), "action": "resample", "mode": "veto"}
