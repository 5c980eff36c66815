"""Monitored generation on a vLLM engine, with the transformers path's result type.

What ``tokur-decode generate --backend vllm`` runs: prompts are encoded as the
transformers path encodes them (:func:`tokur_decode.hf.generation.encode_prompts`, chat
template by default), sent as token ids with :func:`~tokur_decode.vllm.uncertainty_args`,
and the traces read back with :func:`~tokur_decode.vllm.read_traces`.

Example:
    >>> import tokur_decode.vllm as tv
    >>> engine = tv.llm(enforce_eager=True)                              # doctest: +SKIP
    >>> result = tv.generate(engine, "Who won the 1937 Tour de France?",
    ...                      strategy="logtoku-abstain")                  # doctest: +SKIP
    >>> result.texts[0], result.actions[0][0]["step"]                    # doctest: +SKIP
    ("I don't know.", 18)
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ..hf.generation import GenerationResult, encode_prompts
from ..hf.monitor import DEFAULT_SIGNALS
from ..policy import signal_of_output
from ..strategy import Strategy
from ..trace import Trace
from .args import uncertainty_args
from .client import read_traces

__all__ = ["generate"]

#: Strategy actions whose whole effect happens inside one vLLM request.
_SUPPORTED = ("none", "stop", "resample", "deepconf-online")


def generate(
    engine,
    prompts: str | Sequence[str],
    *,
    strategy: str | None = None,
    signals: Iterable[str] | str | None = None,
    chat: bool | None = None,
    max_new_tokens: int = 64,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = 0,
    threshold: float | None = None,
    **signal_params,
) -> GenerationResult:
    """Answer ``prompts`` on ``engine`` (built with :func:`tokur_decode.vllm.llm`)
    while recording signals and acting on them as ``strategy`` says.

    Arguments mean what they mean in :func:`tokur_decode.hf.generate`; ``signal_params``
    are ``logtoku_k``, ``logtoku_evidence`` and ``deepconf_k``; ``threshold`` overrides
    the trigger's (a ``deepconf-online`` strategy needs one, calibrated beforehand).
    Strategies that need tokur-decode's own decoding loop (best-of-N, branch, rollback)
    and TokUR are rejected with a ``ValueError``. A row stopped by a ``stop`` strategy
    with an ``abstain_text`` returns that text, as on the transformers path.
    """
    from vllm import SamplingParams, TokensPrompt

    strat = Strategy.load(strategy) if strategy is not None else None
    if strat is not None and strat.action not in _SUPPORTED:
        raise ValueError(
            f"strategy: {strat.action!r} needs tokur-decode's own decoding loop; "
            f"use the transformers backend (vLLM runs {', '.join(_SUPPORTED)})"
        )
    defaults = strat.generation if strat else {}
    temperature = defaults.get("temperature", 0.0) if temperature is None else temperature
    top_p = defaults.get("top_p", 1.0) if top_p is None else top_p
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if signals is None:
        signals = (strat.signals if strat else None) or DEFAULT_SIGNALS
    names = [signals] if isinstance(signals, str) else list(signals)
    if strat is not None and strat.trigger is not None and "all" not in names:
        names = list(dict.fromkeys([*names, signal_of_output(strat.trigger.signal)]))
    overrides = dict(signal_params)
    if threshold is not None:
        overrides["threshold"] = threshold
    args = uncertainty_args(names, strategy, **overrides)

    tokenizer = engine.get_tokenizer()
    enc = encode_prompts(tokenizer, prompt_list, chat=chat)
    inputs = [
        TokensPrompt(prompt_token_ids=ids[mask.bool()].tolist())
        for ids, mask in zip(enc.input_ids, enc.attention_mask, strict=True)
    ]
    params = SamplingParams(
        max_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p if temperature > 0 else 1.0,
        seed=seed if temperature > 0 else None,
        extra_args=args,
    )
    outputs = engine.generate(inputs, params, use_tqdm=False)
    traces = read_traces(engine, outputs)
    if any(trace is None for trace in traces):
        raise ValueError("engine: no trace came back (build it with tokur_decode.vllm.llm)")
    trace = Trace.concat(traces)
    actions = [t.meta["actions"][0] for t in traces]
    texts = [out.outputs[0].text for out in outputs]
    abstain = strat.params.get("abstain_text") if strat and strat.action == "stop" else None
    if abstain is not None:
        for i, events in enumerate(actions):
            if any("blocked" not in e for e in events):
                texts[i] = abstain
    return GenerationResult(
        texts=texts,
        trace=trace,
        prompts=prompt_list,
        actions=actions,
        tokens_generated=sum(len(out.outputs[0].token_ids) for out in outputs),
    )
