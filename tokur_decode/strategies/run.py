"""Strategies, written once for every backend: a recipe's decoding defaults, the signals
it needs, then the action type's procedure through one dispatch table.

=====================  ===========================================================
action type            what runs (through :meth:`~.backend.Backend.decode`)
=====================  ===========================================================
``none``               one decode, signals recorded
``stop``               one decode with :class:`~.backend.StopAct`; a stopped row answers
                       the recipe's ``abstain_text`` when it has one
``resample``           one decode with :class:`~.backend.ResampleAct`
``best-of-n``          ``n`` sampled answers per prompt, one chosen
                       (:func:`~.candidates.choose_candidates`)
``deepconf-online``    warm-up answers calibrate a threshold per prompt, the later
                       answers stop at it, the survivors vote
``branch``             :class:`~.backend.BranchAct` forks, then one candidate is chosen
``rollback``           :class:`~.backend.RollbackAct`
``abstain``            one decode; an answer whose response score fails the rule
                       answers the rule's ``abstain_text`` (a calibrated rule:
                       ``tokur-decode calibrate``)
``adaptive-sampling``  answers drawn in windows until the vote is settled
``particle-filter``    particles advance step by step (:class:`~.backend.StepsAct`),
                       weighted by a step score, resampled, then vote
``step-redraw``        answers advance step by step; a step whose score falls below
                       the answer's momentum is drawn again, the best draw kept
=====================  ===========================================================

Adding an action type: its configuration class in :mod:`~.actions` (its recipe keys
as fields, its capability facts as class variables), (if it acts inside decoding) an
act in :mod:`~.backend` that the backends execute, and its procedure in
:data:`PROCEDURES`.

Example:
    >>> from tokur_decode.hf import HFBackend
    >>> from tokur_decode.models import load_default
    >>> backend = HFBackend(*load_default())                              # doctest: +SKIP
    >>> result = generate(backend, "What is 17 + 25?",
    ...                   strategy="self-certainty-best-of-n")            # doctest: +SKIP
    >>> result.actions[0][0]["action"], len(result.candidates[0])        # doctest: +SKIP
    ('best-of-n', 8)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TypeVar, cast

import numpy as np

from ..core.adaptive import settled
from ..core.events import (
    AbstainEvent,
    AdaptiveSamplingEvent,
    BestOfNEvent,
    ParticleFilterEvent,
    SelectEvent,
    StepRedrawEvent,
)
from ..core.momentum import StepMomentum
from ..core.particles import effective_sample_size, normalized, systematic_resample
from ..core.perturbation import checked_options
from ..core.policy import Trigger
from ..core.recording import Recording
from ..core.result import GenerationResult
from ..core.scores import response_scores
from ..core.select import choose, vote
from ..core.signals import SPEC_PARAMS, parse_signals, signal_of_output, wants_samples
from ..core.text import normalize_answer
from ..core.trace import Trace
from . import backend as b
from .actions import (
    AbstainConfig,
    ActionConfig,
    AdaptiveSamplingConfig,
    BestOfNConfig,
    BranchConfig,
    DeepConfOnlineConfig,
    NoActionConfig,
    ParticleFilterConfig,
    ResampleConfig,
    RollbackConfig,
    SelectionConfig,
    StepRedrawConfig,
    StopConfig,
)
from .candidates import choose_candidates, deepconf_thresholds, deepconf_trigger, deepconf_vote
from .recipe import Strategy

__all__ = ["DEFAULT_MAX_NEW_TOKENS", "PROCEDURES", "generate", "needed_signals", "split_options"]

_Config = TypeVar("_Config", bound=ActionConfig)


class _Sampler(Protocol):
    """What an action that samples candidates has (``ActionConfig.samples``)."""

    n: int
    temperature: float
    top_p: float


#: The answer budget when neither the caller nor the recipe's ``[generation]`` sets one.
DEFAULT_MAX_NEW_TOKENS = 64


def split_options(options: dict) -> tuple[dict, dict]:
    """``(signal pass parameters, the rest)`` of a backend's ``generate(**options)``:
    :data:`~tokur_decode.core.signals.SPEC_PARAMS` configure the backend, the rest are
    :func:`generate`'s.

    Example:
        >>> split_options({"logtoku_k": 5, "strategy": "cot-branch"})
        ({'logtoku_k': 5}, {'strategy': 'cot-branch'})
    """
    signal_params = {k: v for k, v in options.items() if k in SPEC_PARAMS}
    return signal_params, {k: v for k, v in options.items() if k not in SPEC_PARAMS}


def needed_signals(strat: Strategy | None, signals: Iterable[str] | str | None) -> tuple[str, ...]:
    """What to record: ``signals`` (else the recipe's, else the defaults) plus what the
    recipe's trigger and its selection score read.

    Example:
        >>> needed_signals(Strategy.load("logtoku-abstain"), ["entropy"])
        ('entropy', 'logtoku')
    """
    if signals is None and strat is not None and strat.signals:
        signals = strat.signals
    names = parse_signals(signals)
    needed = []
    if strat is not None and strat.trigger is not None:
        needed.append(signal_of_output(strat.trigger.signal))
    if strat is not None and isinstance(strat.config, SelectionConfig):
        needed.append(signal_of_output(strat.config.score))
    if strat is not None and isinstance(
        strat.config, AbstainConfig | ParticleFilterConfig | StepRedrawConfig
    ):
        needed += [signal_of_output(output) for output in strat.config.outputs]
    return tuple(dict.fromkeys([*names, *needed]))


@dataclass(frozen=True)
class Plan:
    """A validated generation (what :func:`plan` returns), ready to run on any backend
    that offers its act: everything is checked before a backend, or an engine, exists."""

    prompts: list[str]
    strat: Strategy | None
    signals: tuple[str, ...]
    sampling: b.Sampling
    candidates: b.Sampling | None  # how best-of-N and DeepConf online sample candidates
    tokur: dict | None
    extract: Callable[[str], object]
    recipe: str | None
    recording: Recording = Recording()

    @property
    def kind(self) -> str:
        return self.config.type

    @property
    def config(self) -> ActionConfig:
        """The recipe's action (:class:`~.actions.NoActionConfig` without a recipe)."""
        return self.strat.config if self.strat else NoActionConfig()

    @property
    def wants_samples(self) -> bool:
        """Whether a recorded signal needs predictive samples (a TokUR engine on vLLM)."""
        return wants_samples(self.signals)

    def run(self, backend: b.Backend) -> GenerationResult:
        _check_acts(type(self.config), backend.acts, type(backend).__name__)
        return PROCEDURES[type(self.config)].run(_Job(self, backend))


@dataclass(frozen=True)
class _Job:
    """A plan on a backend: what every procedure reads."""

    plan: Plan
    backend: b.Backend

    def config_of(self, cls: type[_Config]) -> _Config:
        """The recipe's action, as the procedure of ``cls`` reads it."""
        config = self.plan.config
        if not isinstance(config, cls):
            raise TypeError(f"a {cls.type!r} procedure was given a {config.type!r} recipe")
        return config

    @property
    def trigger(self) -> Trigger:
        """The recipe's trigger (the procedures that act on one have it)."""
        trigger = self.plan.strat.trigger if self.plan.strat else None
        if trigger is None:
            raise TypeError("this procedure acts on a trigger; the recipe has none")
        return trigger

    @property
    def candidates(self) -> b.Sampling:
        """How the procedures that sample candidates sample them."""
        if self.plan.candidates is None:
            raise TypeError("this procedure samples; plan() set no candidate sampling")
        return self.plan.candidates

    def decode(self, n: int = 1, act=None, sampling: b.Sampling | None = None) -> b.Decoded:
        return self.decode_some(range(len(self.plan.prompts)), n, act, sampling)

    def decode_some(
        self, prompts: Iterable[int], n: int = 1, act=None, sampling: b.Sampling | None = None
    ) -> b.Decoded:
        """:meth:`decode` of the prompts numbered ``prompts`` only (``prompt_of``
        counts within them)."""
        p = self.plan
        request = b.Request(p.signals, sampling or p.sampling, n, act, p.tokur, p.recording)
        return self.backend.decode([p.prompts[i] for i in prompts], request)


def plan(
    acts: Sequence[type],
    prompts: str | Sequence[str],
    *,
    strategy=None,
    signals: Iterable[str] | str | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = 0,
    threshold: float | None = None,
    tokur: dict | None = None,
    extract: Callable[[str], object] = normalize_answer,
    backend_name: str = "the backend",
    **recorded,
) -> Plan:
    """Validate a :func:`generate` call for a backend that runs ``acts``, without one.

    Raises:
        ValueError: naming the parameter.
    """
    unknown = sorted(set(recorded) - set(Recording.names()))
    if unknown:
        raise ValueError(f"{unknown[0]}: not a setting of generate (see its docstring)")
    recording = Recording(**recorded)
    strat = Strategy.load(strategy) if strategy is not None else None
    config = strat.config if strat else NoActionConfig()
    kind = config.type
    defaults = strat.generation if strat else {}
    sampling = b.Sampling(
        temperature=defaults.get("temperature", 0.0) if temperature is None else temperature,
        top_p=defaults.get("top_p", 1.0) if top_p is None else top_p,
        seed=seed,
        max_new_tokens=defaults.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if max_new_tokens is None
        else max_new_tokens,
    )
    if isinstance(prompts, str):
        prompt_list = [prompts]
    elif isinstance(prompts, Iterable):
        prompt_list = list(prompts)
    else:
        raise ValueError(f"prompts: a string or a list of strings, got {type(prompts).__name__}")
    if not prompt_list:
        raise ValueError("prompts: at least one prompt is required")
    if not all(isinstance(p, str) for p in prompt_list):
        raise ValueError("prompts: each prompt must be a string")
    if threshold is not None:
        if config.samples:
            raise ValueError(f"threshold: {kind!r} has no trigger threshold to set")
        if isinstance(config, BranchConfig) and strat is not None and strat.trigger is None:
            raise ValueError("threshold: this branch recipe forks at the first token, no trigger")
        if strat is None or strat.trigger is None:
            raise ValueError("threshold: this strategy has no trigger to set it on")
        strat = replace(strat, trigger=replace(strat.trigger, threshold=threshold))
    candidates = None
    if config.samples:  # the caller's sampling wins, else the recipe's
        c = cast(_Sampler, config)
        chosen_t = c.temperature if temperature is None else temperature
        if not chosen_t > 0:
            raise ValueError(
                f"temperature: {kind!r} samples {c.n} candidates per prompt; it needs "
                f"temperature > 0, got {chosen_t}"
            )
        candidates = replace(
            sampling, temperature=chosen_t, top_p=c.top_p if top_p is None else top_p
        )
    if isinstance(config, ResampleConfig) and config.mode == "adaptive" and not sampling.sampled:
        raise ValueError(
            "temperature: the adaptive resample rule reshapes a sampled distribution; under "
            "greedy decoding it keeps the argmax and changes nothing (sample with "
            "temperature > 0, or use mode = 'veto')"
        )
    if recording.alternatives and not config.records_alternatives:
        raise ValueError(f"alternatives: {kind!r} does not record them")
    names = needed_signals(strat, signals)
    tokur = _tokur_options(strat, tokur)
    if tokur and not wants_samples(names):
        raise ValueError("tokur: options given but 'tokur' is not among the signals")
    _check_acts(type(config), acts, backend_name)
    return Plan(
        prompts=prompt_list,
        strat=strat,
        signals=names,
        sampling=sampling,
        candidates=candidates,
        tokur=tokur if wants_samples(names) else None,
        extract=extract,
        recipe=strategy if isinstance(strategy, str) else None,
        recording=recording,
    )


def _tokur_options(strat, given) -> dict | None:
    """TokUR's options, key by key: the caller's (``plan(tokur=...)``, the CLI's
    ``--tokur-*`` flags), else the recipe's ``[tokur]`` table, else the backend's own
    (transformers: :class:`~tokur_decode.core.perturbation.PerturbationConfig`'s
    defaults; vLLM: the engine's ``tokur_engine_args``). Checked here, once."""
    recipe = (strat.tokur if strat else None) or {}
    merged = {**recipe, **(checked_options(given) or {})}
    return checked_options(merged) if merged or given is not None else None


def _check_acts(config: type[ActionConfig], acts: Sequence[type], backend_name: str) -> None:
    procedure = PROCEDURES[config]
    if procedure.act is not None and procedure.act not in acts:
        runnable = [c.type for c, p in PROCEDURES.items() if p.act is None or p.act in acts]
        raise ValueError(
            f"strategy: {config.type!r} needs {procedure.act.needs}, which {backend_name} does "
            f"not offer (it runs: {', '.join(runnable)})"
        )


def generate(backend: b.Backend, prompts: str | Sequence[str], **options) -> GenerationResult:
    """Answer ``prompts`` on ``backend`` while recording signals, acting on them as
    ``strategy`` (a shipped recipe name, a TOML path, a dict or a
    :class:`~tokur_decode.strategies.recipe.Strategy`) says.

    ``options`` are :func:`plan`'s keywords: ``temperature=0`` decodes greedily,
    otherwise samples (with ``top_p``) under ``seed``; ``None`` takes the recipe's
    ``[generation]`` value, else greedy (``top_p`` 1; ``max_new_tokens`` 64). Recipes
    that sample candidates (best-of-N, DeepConf online) use the caller's
    ``temperature`` and ``top_p`` when given, else their own (they need temperature
    > 0). ``signals`` default to the recipe's, else
    :data:`~tokur_decode.core.signals.DEFAULT_SIGNALS`; the trigger's and the selection
    score's signals are added. ``threshold`` overrides the trigger's (stop, resample,
    branch on a trigger). ``tokur``: TokUR options when ``"tokur"`` is recorded, key
    by key over the recipe's ``[tokur]`` table (then the backend's own: transformers'
    defaults, a vLLM engine's ``tokur_engine_args``). ``extract`` turns a response into
    the answer that votes. The fields of
    :class:`~tokur_decode.core.recording.Recording` (``alternatives``: record each
    step's top-``k`` tokens in ``result.trace.alternatives``) are keywords too.

    Raises:
        ValueError: naming the parameter, before anything is decoded, for invalid
            values and for an action the backend cannot run (:func:`plan` checks the
            same without a backend).
    """
    return plan(backend.acts, prompts, backend_name=type(backend).__name__, **options).run(backend)


def _single(job: _Job, act=None) -> GenerationResult:
    """One decode, one answer per prompt."""
    out = job.decode(act=act)
    texts = list(out.trace.texts or [])
    config = job.plan.config
    abstain = config.abstain_text if isinstance(config, StopConfig) else None
    if abstain is not None:
        for i, events in enumerate(out.events):
            if any("blocked" not in e for e in events):
                texts[i] = abstain
    return GenerationResult(
        texts=texts,
        trace=out.trace,
        prompts=job.plan.prompts,
        actions=out.events,
        tokens_generated=out.tokens,
    )


def _plain(job: _Job) -> GenerationResult:
    return _single(job)


def _stop(job: _Job) -> GenerationResult:
    return _single(job, b.StopAct(job.trigger))


def _resample(job: _Job) -> GenerationResult:
    return _single(job, b.ResampleAct(job.trigger, job.config_of(ResampleConfig), job.plan.recipe))


def _best_of_n(job: _Job) -> GenerationResult:
    p = job.config_of(BestOfNConfig)
    n = p.n
    out = job.decode(n=n, sampling=job.candidates)
    groups = [out.rows_of(i) for i in range(len(job.plan.prompts))]
    chosen, records, candidates = choose_candidates(out.trace, groups, p, job.plan.extract)
    actions = [[BestOfNEvent(n, choice).to_dict()] for choice in records]
    return GenerationResult.chosen(out.trace, job.plan.prompts, chosen, actions, candidates)


def _deepconf_online(job: _Job) -> GenerationResult:
    """DeepConf online (Fu et al. 2025): ``warmup`` answers per prompt set a threshold
    (the ``100 - keep`` percentile of their lowest group confidence); the other
    ``n - warmup`` answers stop as soon as their window confidence falls below it
    (seeded after the warm-up's); the warm-up answers and the later answers that were
    not stopped vote (:func:`~.candidates.deepconf_vote`)."""
    p = job.config_of(DeepConfOnlineConfig)
    warmup, online = p.warmup, p.n - p.warmup
    sampling = job.candidates
    warm = job.decode(n=warmup, sampling=sampling).trace
    thresholds = deepconf_thresholds(warm, warmup, p)
    seed = sampling.seed
    later = job.decode(
        n=online,
        act=b.StopAct(deepconf_trigger(p.window), thresholds=tuple(thresholds)),
        sampling=replace(sampling, seed=None if seed is None else seed + warmup),
    )
    stopped = [bool(events) for events in later.events]
    trace, chosen, actions, candidates = deepconf_vote(
        warm, later.trace, stopped, thresholds, p, job.plan.extract, sampling.max_new_tokens
    )
    return GenerationResult.chosen(trace, job.plan.prompts, chosen, actions, candidates)


def _adaptive_sampling(job: _Job) -> GenerationResult:
    """Adaptive sampling (:mod:`tokur_decode.core.adaptive`): each round samples
    ``window`` more answers for every prompt whose vote is not settled (at most ``n``);
    the answers drawn vote (majority, the earliest drawn of the winners is the
    answer). Records per prompt what was drawn and the tokens saved against ``n``."""
    p = job.config_of(AdaptiveSamplingConfig)
    sampling = job.candidates
    prompts = range(len(job.plan.prompts))
    drawn: dict[int, list] = {i: [] for i in prompts}  # (trace row, answer) per prompt
    parts: list[Trace] = []
    open_ = list(prompts)
    rounds = 0
    while open_:
        seed = sampling.seed
        step = replace(sampling, seed=None if seed is None else seed + rounds * p.n)
        out = job.decode_some(open_, n=p.window, sampling=step)
        offset = sum(len(t) for t in parts)
        parts.append(out.trace)
        texts = list(out.trace.texts or [])
        for row, local in enumerate(out.prompt_of):
            drawn[open_[local]].append((offset + row, job.plan.extract(texts[row])))
        rounds += 1
        open_ = [
            i
            for i in open_
            if len(drawn[i]) < p.n
            and not settled(
                [a for _, a in drawn[i]], window=p.window, rule=p.rule, threshold=p.threshold
            )
        ]
    trace = Trace.concat(parts)
    chosen, actions, candidates = [], [], []
    for i in prompts:
        rows, answers = [r for r, _ in drawn[i]], [a for _, a in drawn[i]]
        winner = vote(answers, method="majority")
        pick = answers.index(winner)
        lengths = trace.lengths[rows].tolist()
        spent = sum(lengths)
        chosen.append(rows[pick])
        candidates.append(trace.select(rows))
        event = AdaptiveSamplingEvent(
            rule=p.rule,
            window=p.window,
            n=p.n,
            drawn=len(rows),
            tokens=spent,
            tokens_saved=round((p.n - len(rows)) * spent / len(rows)),
            chosen=pick,
            answers=answers,
        )
        actions.append([event.to_dict()])
    return GenerationResult.chosen(trace, job.plan.prompts, chosen, actions, candidates)


def _answers_so_far_scored(
    p: ParticleFilterConfig | StepRedrawConfig, answers: Trace
) -> np.ndarray:
    """Each particle's answer so far scored as ``p`` says (float64 ``[particles]``): the
    probe's probability that it is wrong, else the ``reducer`` of the ``score`` signal
    over all its tokens (a step reducer over its steps)."""
    answers.meta["step_delimiter"] = p.delimiter
    if p.probe is not None:
        values = p.probe.p_wrong_trace(answers)
    else:
        values = answers.aggregate(p.score, p.reducer)
    return values.double().cpu().numpy()


def _particle_filter(job: _Job) -> GenerationResult:
    """Particle filtering (:class:`~.actions.ParticleFilterConfig`): every prompt's ``n``
    particles advance one step at a time in one batch (:meth:`~.backend.Backend.particles`);
    after each step a particle's potential (its answer so far scored, over the weight
    temperature) is updated and its log-weight moves by the potential's change; a
    prompt whose effective sample size falls below ``ess_threshold * n`` is resampled
    systematically (one uniform draw per resampling, from a generator seeded with the
    sampling seed) and its weights reset; once every particle has finished, the
    particles vote weighted by their final weights (the chosen particle: the heaviest
    with the winning answer). Records per prompt the weights, the answers, every
    resampling and the tokens decoded."""
    p = job.config_of(ParticleFilterConfig)
    n, count = p.n, len(job.plan.prompts)
    rng = np.random.default_rng(job.candidates.seed)
    log_w = np.zeros((count, n))
    potential = np.zeros((count, n))  # the empty answer's: the same for every particle
    spent = np.zeros(count, dtype=np.int64)
    resamplings: list[list[dict]] = [[] for _ in range(count)]
    request = b.Request(
        job.plan.signals,
        job.candidates,
        n,
        b.StepsAct(p.delimiter, p.step_tokens),
        job.plan.tokur,
    )
    steps = 0
    with job.backend.particles(job.plan.prompts, request) as particles:
        done = [False] * (count * n)
        while not all(done):
            moved = ~np.asarray(done).reshape(count, n)
            step, done = particles.advance()
            scored = p.sign * _answers_so_far_scored(p, particles.trace()).reshape(count, n)
            now = np.where(moved, scored / p.weight_temperature, potential)
            log_w += now - potential
            potential = now
            spent += step.lengths.cpu().numpy().reshape(count, n).sum(axis=1)
            steps += 1
            index = np.arange(count * n).reshape(count, n)
            for q in range(count):
                w = normalized(log_w[q])
                ess = effective_sample_size(w)
                if ess >= p.ess_threshold * n or all(done[q * n : (q + 1) * n]):
                    continue
                kept = systematic_resample(w, float(rng.random()))
                index[q] = q * n + kept
                log_w[q] = 0.0
                potential[q] = potential[q, kept]
                resamplings[q].append({"step": steps, "ess": ess, "kept": kept.tolist()})
            order = index.ravel().tolist()
            if order != list(range(count * n)):
                particles.select(order)
                done = [done[i] for i in order]
        trace = particles.trace()
        tokens = particles.tokens
    trace.meta["step_delimiter"] = p.delimiter
    answers = [job.plan.extract(text) for text in trace.texts or []]
    chosen, actions, candidates = [], [], []
    for q in range(count):
        rows = list(range(q * n, (q + 1) * n))
        w = normalized(log_w[q]).tolist()
        pick = choose([answers[r] for r in rows], w, method="weighted")
        chosen.append(rows[pick])
        candidates.append(trace.select(rows))
        event = ParticleFilterEvent(
            n=n,
            score=p.score,
            reducer=p.reducer,
            steps=steps,
            tokens=int(spent[q]),
            resampled=resamplings[q],
            weights=w,
            answers=[answers[r] for r in rows],
            chosen=pick,
        )
        actions.append([event.to_dict()])
    return GenerationResult.chosen(trace, job.plan.prompts, chosen, actions, candidates, tokens)


def _step_redraw(job: _Job) -> GenerationResult:
    """Uncertainty-gated step redrawing (:class:`~.actions.StepRedrawConfig`): each prompt has
    ``n`` rows, all copies of its answer so far. Every round the first row decodes the
    next step while the others wait (:meth:`~.backend.Particles.advance`'s ``hold``);
    where the step's score falls below the answer's momentum
    (:class:`~tokur_decode.core.momentum.StepMomentum`) the waiting rows draw the same
    step again, and the best scored draw continues (copied into every row), or with a
    probe the draw whose answer so far the probe finds least likely wrong. Records per
    prompt every redrawn step (its draws' scores, the momentum, the probe's p(wrong),
    the draw kept) and the tokens decoded."""
    p = job.config_of(StepRedrawConfig)
    n, count = p.n, len(job.plan.prompts)
    first = np.arange(count) * n  # each prompt's row that draws every step
    request = b.Request(
        job.plan.signals,
        job.candidates,
        n,
        b.StepsAct(p.delimiter, p.step_tokens),
        job.plan.tokur,
    )
    momentum = StepMomentum(count, p.momentum, p.scaling_rate)
    spent = np.zeros(count, dtype=np.int64)
    redrawn: list[list[dict]] = [[] for _ in range(count)]
    is_first = np.arange(count * n) % n == 0

    def scored(step: Trace) -> np.ndarray:
        """The step's signed score per row; its tokens counted to their prompts."""
        spent[:] += step.lengths.cpu().numpy().reshape(count, n).sum(axis=1)
        return p.sign * step.aggregate(p.score, p.reducer).double().cpu().numpy()

    with job.backend.particles(job.plan.prompts, request) as particles:
        done = np.zeros(count * n, dtype=bool)
        while not done[first].all():
            moved = ~done[first]
            step, finished = particles.advance(hold=(~is_first).tolist())
            done, values = np.asarray(finished), scored(step).reshape(count, n)
            kept = np.zeros(count, dtype=np.int64)
            redraw = moved & momentum.falls_below(values[:, 0])
            if redraw.any():
                waiting = ~np.repeat(redraw, n) | is_first
                step, finished = particles.advance(hold=waiting.tolist())
                done = np.asarray(finished)
                values[redraw, 1:] = scored(step).reshape(count, n)[redraw, 1:]
                wrong = None
                if p.probe is not None:  # the critic: p(wrong) of each answer so far
                    wrong = _answers_so_far_scored(p, particles.trace()).reshape(count, n)
                kept[redraw] = (values if wrong is None else -wrong)[redraw].argmax(axis=1)
                for q in np.flatnonzero(redraw).tolist():
                    redrawn[q].append(
                        {
                            "step": int(momentum.steps[q]),
                            "momentum": float(momentum.mean[q]),
                            "scores": values[q].tolist(),
                            **({} if wrong is None else {"p_wrong": wrong[q].tolist()}),
                            "kept": int(kept[q]),
                        }
                    )
            momentum.update(values[np.arange(count), kept], moved)
            order = np.repeat(first + kept, n)
            particles.select(order.tolist())
            done = done[order]
        trace = particles.trace().select(first.tolist())
        tokens = particles.tokens
    actions = [
        [
            StepRedrawEvent(
                score=p.score,
                reducer=p.reducer,
                steps=int(momentum.steps[q]),
                redrawn=redrawn[q],
                tokens=int(spent[q]),
            ).to_dict()
        ]
        for q in range(count)
    ]
    return GenerationResult.chosen(
        trace, job.plan.prompts, list(range(count)), actions, None, tokens
    )


def _branch(job: _Job) -> GenerationResult:
    p = job.config_of(BranchConfig)
    trigger = job.plan.strat.trigger if job.plan.strat else None  # None: the first token
    out = job.decode(act=b.BranchAct(trigger, p))
    groups = [out.rows_of(i) for i in range(len(job.plan.prompts))]
    chosen, records, candidates = choose_candidates(out.trace, groups, p, job.plan.extract)
    actions = [
        [*events, SelectEvent(p.k, choice).to_dict()]
        for events, choice in zip(out.events, records, strict=True)
    ]
    return GenerationResult.chosen(
        out.trace, job.plan.prompts, chosen, actions, candidates, out.tokens
    )


def _rollback(job: _Job) -> GenerationResult:
    return _single(job, b.RollbackAct(job.trigger, job.config_of(RollbackConfig)))


def _abstain(job: _Job) -> GenerationResult:
    """Answer; where the response score fails the rule, answer the abstain text. Each
    prompt's actions record the score, the rule and its guarantee."""
    rule = job.config_of(AbstainConfig)
    result = _single(job)
    if rule.probe is not None:
        values = rule.probe.p_wrong_trace(result.trace)
    else:
        values = response_scores(result.trace, [rule.score])[rule.score]
    actions = []
    for i, (value, events) in enumerate(zip(values.tolist(), result.actions, strict=True)):
        kept = rule.keeps(value)
        if not kept:
            result.texts[i] = rule.abstain_text
        event = AbstainEvent(
            rule.score,
            rule.keep,
            rule.threshold,
            value=value,
            abstained=not kept,
            risk=rule.risk,
            delta=rule.delta,
            coverage=rule.coverage,
        )
        actions.append([*events, event.to_dict()])
    result.actions = actions
    return result


@dataclass(frozen=True)
class _Procedure:
    run: Callable[[_Job], GenerationResult]
    #: The act the backend must run (None: plain decodes only).
    act: type[b.StopAct | b.ResampleAct | b.BranchAct | b.RollbackAct | b.StepsAct] | None


#: Each action type's procedure, and the act a backend needs for it.
PROCEDURES: dict[type[ActionConfig], _Procedure] = {
    NoActionConfig: _Procedure(_plain, None),
    StopConfig: _Procedure(_stop, b.StopAct),
    ResampleConfig: _Procedure(_resample, b.ResampleAct),
    BestOfNConfig: _Procedure(_best_of_n, None),
    DeepConfOnlineConfig: _Procedure(_deepconf_online, b.StopAct),
    BranchConfig: _Procedure(_branch, b.BranchAct),
    RollbackConfig: _Procedure(_rollback, b.RollbackAct),
    AbstainConfig: _Procedure(_abstain, None),
    AdaptiveSamplingConfig: _Procedure(_adaptive_sampling, None),
    ParticleFilterConfig: _Procedure(_particle_filter, b.StepsAct),
    StepRedrawConfig: _Procedure(_step_redraw, b.StepsAct),
}
