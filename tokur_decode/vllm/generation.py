"""Monitored generation on a vLLM engine, with the transformers path's result type.

What ``tokur-decode generate --backend vllm`` runs: prompts are encoded as the
transformers path encodes them (:func:`tokur_decode.hf.generation.encode_prompts`, chat
template by default), sent as token ids with :func:`~tokur_decode.vllm.uncertainty_args`,
and the traces read back with :func:`~tokur_decode.vllm.read_traces`.

Best-of-N samples its candidates through the engine (``SamplingParams(n=N)``); DeepConf
online sends its warm-up candidates, calibrates one threshold per prompt from their
traces and sends the later candidates with a stop at that threshold; branch recipes
re-submit each alternative on the prefix cache (:mod:`tokur_decode.vllm.branching`).
All choose with the transformers path's code (:mod:`tokur_decode.candidates`).

Example:
    >>> import tokur_decode.vllm as tv
    >>> engine = tv.llm(enforce_eager=True)                              # doctest: +SKIP
    >>> result = tv.generate(engine, "Who won the 1937 Tour de France?",
    ...                      strategy="logtoku-abstain")                  # doctest: +SKIP
    >>> result.texts[0], result.actions[0][0]["step"]                    # doctest: +SKIP
    ("I don't know.", 18)
    >>> best = tv.generate(engine, "What is 17 + 25?",
    ...                    strategy="self-certainty-best-of-n")           # doctest: +SKIP
    >>> best.actions[0][0]["chosen"], len(best.candidates[0])            # doctest: +SKIP
    (3, 8)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

from ..candidates import deepconf_thresholds, deepconf_trigger, deepconf_vote, select_rows
from ..hf.generation import GenerationResult, encode_prompts, normalize_answer
from ..hf.monitor import DEFAULT_SIGNALS
from ..policy import signal_of_output
from ..strategy import Strategy
from ..trace import Trace
from .args import stop_args, uncertainty_args
from .branching import branch
from .client import read_traces

__all__ = ["generate", "prompt_token_ids"]


def prompt_token_ids(
    tokenizer, prompts: Sequence[str], chat: bool | None = None
) -> list[list[int]]:
    """``prompts`` as the transformers path encodes them
    (:func:`tokur_decode.hf.generation.encode_prompts`, chat template by default), one
    unpadded token-id list each, ready for ``vllm.TokensPrompt``."""
    enc = encode_prompts(tokenizer, list(prompts), chat=chat)
    return [
        ids[mask.bool()].tolist()
        for ids, mask in zip(enc.input_ids, enc.attention_mask, strict=True)
    ]


#: Strategy actions that run through the engine (rollback needs our decoding loop).
_SUPPORTED = ("none", "stop", "resample", "best-of-n", "deepconf-online", "branch")


def generate(
    engine,
    prompts: str | Sequence[str],
    *,
    strategy: str | dict | Strategy | None = None,
    signals: Iterable[str] | str | None = None,
    chat: bool | None = None,
    max_new_tokens: int = 64,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = 0,
    threshold: float | None = None,
    extract: Callable[[str], object] = normalize_answer,
    **signal_params,
) -> GenerationResult:
    """Answer ``prompts`` on ``engine`` (built with :func:`tokur_decode.vllm.llm`)
    while recording signals and acting on them as ``strategy`` says.

    ``strategy`` is a recipe name or a TOML path (best-of-N and DeepConf online also
    take a dict or a :class:`~tokur_decode.strategy.Strategy`). Other arguments mean
    what they mean in :func:`tokur_decode.hf.generate`; ``signal_params``
    are ``logtoku_k``, ``logtoku_evidence`` and ``deepconf_k``; ``threshold`` overrides
    the trigger's of a stop or resample strategy. Best-of-N and DeepConf online return
    every candidate's trace in ``result.candidates`` and their choice in
    ``result.actions``; so does a branch recipe (``threshold`` overrides its trigger's),
    whose ``tokens_generated`` counts what the engine decoded (see
    :func:`tokur_decode.vllm.branching.branch`). Rollback is rejected with a ``ValueError``.
    A row stopped by a ``stop`` strategy with an ``abstain_text`` returns that text, as
    on the transformers path.
    """
    strat = Strategy.load(strategy) if strategy is not None else None
    if strat is not None and strat.action not in _SUPPORTED:
        raise ValueError(
            f"strategy: {strat.action!r} needs tokur-decode's own decoding loop; "
            f"use the transformers backend (vLLM runs {', '.join(_SUPPORTED)})"
        )
    choosing = strat is not None and strat.action in ("best-of-n", "deepconf-online")
    if choosing and threshold is not None:
        raise ValueError(f"threshold: {strat.action!r} sets its own (per prompt, calibrated)")
    branching = strat is not None and strat.action == "branch"
    if branching and threshold is not None:
        if strat.trigger is None:
            raise ValueError("threshold: this branch recipe forks at the first token, no trigger")
        strat = replace(strat, trigger=replace(strat.trigger, threshold=threshold))
    defaults = strat.generation if strat else {}
    temperature = defaults.get("temperature", 0.0) if temperature is None else temperature
    top_p = defaults.get("top_p", 1.0) if top_p is None else top_p
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if signals is None:
        signals = (strat.signals if strat else None) or DEFAULT_SIGNALS
    names = [signals] if isinstance(signals, str) else list(signals)
    needed = []
    if strat is not None and strat.trigger is not None:
        needed.append(strat.trigger.signal)
    if choosing or branching:
        needed.append(strat.params["score"])
    if "all" not in names:
        names = list(dict.fromkeys([*names, *map(signal_of_output, needed)]))

    tokenizer = engine.get_tokenizer()
    inputs = prompt_token_ids(tokenizer, prompt_list, chat)
    run = _Runner(engine, inputs, names, signal_params, max_new_tokens)
    if branching:
        return branch(
            run, strat, prompt_list, extract, temperature=temperature, top_p=top_p, seed=seed
        )
    if choosing:
        p = strat.params
        sampling = {"temperature": p["temperature"], "top_p": p.get("top_p", top_p), "seed": seed}
        if strat.action == "best-of-n":
            return _best_of_n(run, p, sampling, prompt_list, extract)
        return _deepconf_online(run, p, sampling, prompt_list, extract)

    overrides = {} if threshold is None else {"threshold": threshold}
    outputs, traces = run(
        temperature=temperature, top_p=top_p, seed=seed, strategy=strategy, **overrides
    )
    actions = [t.meta["actions"][0] for t in traces]
    texts = [out.outputs[0].text for out in outputs]
    abstain = strat.params.get("abstain_text") if strat and strat.action == "stop" else None
    if abstain is not None:
        for i, events in enumerate(actions):
            if any("blocked" not in e for e in events):
                texts[i] = abstain
    return GenerationResult(
        texts=texts,
        trace=Trace.concat(traces),
        prompts=prompt_list,
        actions=actions,
        tokens_generated=sum(int(t.lengths.sum()) for t in traces),
    )


class _Runner:
    """Sends the prompts to the engine with given sampling and settings; returns the
    outputs and one trace per prompt (a row per completion)."""

    def __init__(self, engine, inputs, names, signal_params, max_new_tokens) -> None:
        self.engine, self.inputs, self.names = engine, inputs, names
        self.signal_params, self.max_new_tokens = signal_params, max_new_tokens

    def __call__(
        self, *, temperature, top_p, seed, n=1, strategy=None, settings=None, **overrides
    ) -> tuple[list, list[Trace]]:
        """``settings``: one dict of ``uncertainty_args`` overrides per prompt."""
        from vllm import SamplingParams

        per_prompt = settings or [{}] * len(self.inputs)
        params = [
            SamplingParams(
                n=n,
                max_tokens=self.max_new_tokens,
                temperature=temperature,
                top_p=top_p if temperature > 0 else 1.0,
                seed=seed if temperature > 0 else None,
                extra_args=uncertainty_args(
                    self.names, strategy, **self.signal_params, **overrides, **mine
                ),
            )
            for mine in per_prompt
        ]
        return self.send(self.inputs, params)

    def send(self, inputs: list[list[int]], params: list) -> tuple[list, list[Trace]]:
        """Token-id prompts with their ``SamplingParams``: the outputs and their traces."""
        from vllm import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in inputs]
        outputs = self.engine.generate(prompts, params, use_tqdm=False)
        traces = read_traces(self.engine, outputs)
        if any(trace is None for trace in traces):
            raise ValueError("engine: no trace came back (build it with tokur_decode.vllm.llm)")
        return outputs, traces


def _best_of_n(run: _Runner, p: dict, sampling: dict, prompts, extract) -> GenerationResult:
    n = p["n"]
    _, traces = run(n=n, **sampling)
    trace = Trace.concat(traces)
    groups = [list(range(b * n, (b + 1) * n)) for b in range(len(prompts))]
    chosen, records, candidates = select_rows(trace, groups, p, extract)
    actions = [[{"action": "best-of-n", "n": n, **record}] for record in records]
    return GenerationResult.chosen(trace, prompts, chosen, actions, candidates)


def _deepconf_online(run: _Runner, p: dict, sampling: dict, prompts, extract) -> GenerationResult:
    """Warm-up candidates calibrate a threshold per prompt; the later candidates run with
    a stop at it (seeds after the warm-up's: vLLM seeds the ``i``-th of ``n`` samples
    with ``seed + i``)."""
    warmup, online = p["warmup"], p["n"] - p["warmup"]
    _, warm = run(n=warmup, **sampling)
    warm = Trace.concat(warm)
    thresholds = deepconf_thresholds(warm, warmup, p)
    stop = stop_args(deepconf_trigger(p["window"]))
    seed = sampling["seed"]
    _, later = run(
        n=online,
        **{**sampling, "seed": None if seed is None else seed + warmup},
        settings=[{**stop, "threshold": t} for t in thresholds],
    )
    stopped = [bool(events) for t in later for events in t.meta["actions"]]
    later = Trace.concat(later)
    trace, chosen, actions, candidates = deepconf_vote(
        warm, later, stopped, thresholds, p, extract, run.max_new_tokens
    )
    return GenerationResult.chosen(trace, prompts, chosen, actions, candidates)
