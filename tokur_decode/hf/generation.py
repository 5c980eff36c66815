"""Monitored generation with transformers: prompts in; texts, traces and actions out."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..candidates import deepconf_thresholds, deepconf_trigger, deepconf_vote, select_rows
from ..policy import signal_of_output
from ..strategy import Strategy
from ..trace import Trace
from .actions import ResampleOnTrigger, StopOnTrigger
from .controller import Branch, Controller, Rollback
from .monitor import DEFAULT_SIGNALS, SAMPLE_SIGNALS, UncertaintyMonitor, as_id_list
from .tokur import perturbed

__all__ = ["GenerationResult", "encode_prompts", "generate", "normalize_answer", "sampling_kwargs"]


@dataclass
class GenerationResult:
    """What :func:`generate` returns.

    Attributes:
        texts: the final response per prompt (the abstention text for a stopped row
            when the strategy sets one).
        trace: signals of the returned responses, one row per prompt.
        actions: per prompt, every action taken and why (signal, value, threshold, step;
            for best-of-N the candidates' scores and the choice).
        prompts: the prompts as given.
        candidates: best-of-N, branch and DeepConf online: the trace of every
            candidate per prompt.
        tokens_generated: tokens the model decoded for all prompts: every candidate's
            and branch's, and tokens a rollback took back (the cost of the strategy).
    """

    texts: list[str]
    trace: Trace
    prompts: list[str]
    actions: list[list[dict]] = field(default_factory=list)
    candidates: list[Trace] | None = None
    tokens_generated: int = 0

    @property
    def traces(self) -> list[Trace]:
        """One single-row trace per prompt."""
        return list(self.trace)

    @classmethod
    def chosen(
        cls, trace: Trace, prompts, chosen, actions, candidates, tokens: int | None = None
    ) -> GenerationResult:
        """The ``chosen`` rows of the candidates' ``trace`` as the result; ``tokens``:
        what was decoded in all (default: every row of ``trace``)."""
        final = trace.select(chosen)
        return cls(
            texts=list(final.texts or []),
            trace=final,
            prompts=prompts,
            actions=actions,
            candidates=candidates,
            tokens_generated=int(trace.lengths.sum()) if tokens is None else tokens,
        )


def encode_prompts(tokenizer, prompts: Sequence[str], *, chat: bool | None = None, device=None):
    """Tokenise ``prompts`` as a left-padded batch.

    ``chat=None`` uses the tokenizer's chat template when it has one (each prompt as a
    user message, generation prompt appended); ``True`` requires one; ``False`` feeds
    the raw text.
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat and not has_template:
        raise ValueError("chat: the tokenizer has no chat template; pass chat=False")
    use_chat = has_template if chat is None else chat
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if use_chat:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    else:
        enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    return enc.to(device) if device is not None else enc


def sampling_kwargs(temperature: float, top_p: float = 1.0) -> dict:
    """``generate`` keywords for sampling at ``temperature`` (> 0) or greedy decoding (0;
    the model's own sampling defaults are switched off)."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


def normalize_answer(text: str) -> str:
    """Default answer extraction for voting: the text, stripped, lower-cased, without a
    trailing period."""
    return text.strip().rstrip(".").strip().lower()


def generate(
    model,
    tokenizer,
    prompts: str | Sequence[str],
    *,
    strategy=None,
    signals: Iterable[str] | str | None = None,
    chat: bool | None = None,
    max_new_tokens: int = 64,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = 0,
    tokur: dict | None = None,
    extract: Callable[[str], object] = normalize_answer,
    **signal_params,
) -> GenerationResult:
    """Generate answers to ``prompts`` while recording uncertainty signals, and act on
    them when a ``strategy`` (a shipped recipe name, a TOML path, a dict or a
    :class:`~tokur_decode.strategy.Strategy`) says so.

    ``temperature=0`` decodes greedily; otherwise samples (with ``top_p``), reproducibly
    under ``seed``; ``None`` takes the strategy's ``[generation]`` value, else greedy
    decoding (``top_p`` 1). ``signals`` default to the strategy's (else :data:`DEFAULT_SIGNALS`);
    ``signal_params`` go to the monitor and the actions. When the signals include
    ``"tokur"``, generation runs inside :func:`perturbed` with the options in ``tokur``
    (or the strategy's ``[tokur]`` table). ``extract`` turns a response into the answer
    that best-of-N votes on.

    Example:
        >>> from tokur_decode.models import load_default
        >>> model, tok = load_default()                                  # doctest: +SKIP
        >>> result = generate(model, tok, "What is the capital of France?",
        ...                   strategy="logtoku-abstain")                 # doctest: +SKIP
        >>> result.texts[0], result.actions[0]                           # doctest: +SKIP
    """
    strat = Strategy.load(strategy) if strategy is not None else None
    defaults = strat.generation if strat else {}
    temperature = defaults.get("temperature", 0.0) if temperature is None else temperature
    top_p = defaults.get("top_p", 1.0) if top_p is None else top_p
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("prompts: at least one prompt is required")
    if signals is None:
        signals = (strat.signals if strat and strat.signals else None) or DEFAULT_SIGNALS
    names = (signals,) if isinstance(signals, str) else tuple(signals)
    for output in _outputs_needed(strat):  # record what selects candidates or triggers
        needed = signal_of_output(output)
        if needed not in names and not (needed != "tokur" and "all" in names):
            names = (*names, needed)
    wants_tokur = any(n in SAMPLE_SIGNALS for n in names)
    tokur = tokur if tokur is not None else (strat.tokur if strat else None)
    if tokur and not wants_tokur:
        raise ValueError("tokur: options given but 'tokur' is not among the signals")

    run = dict(
        model=model,
        tokenizer=tokenizer,
        prompts=prompt_list,
        names=names,
        chat=chat,
        max_new_tokens=max_new_tokens,
        seed=seed,
        tokur=tokur if wants_tokur else None,
        signal_params=signal_params,
    )
    if strat and strat.action == "best-of-n":
        return _best_of_n(strat, extract=extract, top_p=top_p, **run)
    if strat and strat.action == "deepconf-online":
        return _deepconf_online(strat, extract=extract, **run)
    if strat and strat.action in ("branch", "rollback"):
        return _controlled(strat, extract=extract, temperature=temperature, top_p=top_p, **run)
    action = _action_processor(strat, model, tokenizer, signal_params)
    out, trace = _run(**run, temperature=temperature, top_p=top_p, action=action)
    texts = list(trace.texts or [])
    actions = action.events(trace.lengths) if action else [[] for _ in prompt_list]
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
        tokens_generated=int(trace.lengths.sum()),
    )


def _outputs_needed(strat: Strategy | None) -> list[str]:
    """Signal outputs an action reads from the monitor's record."""
    if strat is None:
        return []
    needed = [strat.params["score"]] if "score" in strat.params else []
    if strat.trigger is not None and strat.action in ("branch", "rollback"):
        needed.append(strat.trigger.signal)
    return needed


def _action_processor(strat, model, tokenizer, signal_params):
    if strat is None or strat.action == "none":
        return None
    if strat.action == "stop":
        eos = _eos(model, tokenizer)
        return StopOnTrigger(strat.trigger, eos_token_id=eos, **signal_params)
    return ResampleOnTrigger(strat.trigger, **strat.params, **signal_params)


def _eos(model, tokenizer):
    eos = model.generation_config.eos_token_id
    return tokenizer.eos_token_id if eos is None else eos


@contextlib.contextmanager
def _monitoring(model, tokenizer, names, tokur, signal_params):
    """A fresh monitor, inside :func:`perturbed` when TokUR is recorded, in inference mode."""
    context = perturbed(model, **tokur) if tokur is not None else contextlib.nullcontext()
    with context as source, torch.inference_mode():
        yield UncertaintyMonitor(
            names, eos_token_id=_eos(model, tokenizer), sample_source=source, **signal_params
        )


def _run(
    *,
    model,
    tokenizer,
    prompts,
    names,
    chat,
    max_new_tokens,
    seed,
    tokur,
    signal_params,
    temperature,
    top_p,
    action=None,
    num_return_sequences=1,
):
    """One batched ``generate`` with the monitor first and the action (if any) after it."""
    enc = encode_prompts(tokenizer, prompts, chat=chat, device=model.device)
    if seed is not None:
        torch.manual_seed(seed)
    with _monitoring(model, tokenizer, names, tokur, signal_params) as monitor:
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            logits_processor=[monitor] + ([action] if action else []),
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            num_return_sequences=num_return_sequences,
            **sampling_kwargs(temperature, top_p),
        )
    return out, monitor.trace(out, tokenizer)


def _best_of_n(strat: Strategy, *, extract, top_p, **run) -> GenerationResult:
    p = strat.params
    n = p["n"]
    _, trace = _run(
        **run, temperature=p["temperature"], top_p=p.get("top_p", top_p), num_return_sequences=n
    )
    groups = [list(range(b * n, (b + 1) * n)) for b in range(len(run["prompts"]))]
    chosen, records, candidates = select_rows(trace, groups, p, extract)
    actions = [[{"action": "best-of-n", "n": n, **record}] for record in records]
    return GenerationResult.chosen(trace, run["prompts"], chosen, actions, candidates)


def _controlled(
    strat: Strategy,
    *,
    extract,
    temperature,
    top_p,
    model,
    tokenizer,
    prompts,
    names,
    chat,
    max_new_tokens,
    seed,
    tokur,
    signal_params,
) -> GenerationResult:
    """Branch or roll back with our own decoding loop (:mod:`~tokur_decode.hf.controller`)."""
    p = strat.params
    if strat.action == "branch":
        policy = Branch(
            p["k"],
            strat.trigger,
            max_branch_points=p["max_branch_points"],
            token_budget=p["token_budget"] or None,
        )
    else:
        policy = Rollback(
            strat.trigger,
            rewind=p["rewind"],
            temperature=p["temperature"],
            max_retries=p["max_retries"],
        )
    enc = encode_prompts(tokenizer, prompts, chat=chat, device=model.device)
    with _monitoring(model, tokenizer, names, tokur, signal_params) as monitor:
        controller = Controller(
            model,
            monitor,
            eos_token_ids=as_id_list(_eos(model, tokenizer), "eos_token_id"),
            pad_token_id=tokenizer.pad_token_id,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            max_new_tokens=max_new_tokens,
        )
        trace = controller.run(enc, policy, tokenizer)
    tokens = int(controller.generated)
    if strat.action == "rollback":
        return GenerationResult(
            texts=list(trace.texts),
            trace=trace,
            prompts=prompts,
            actions=policy.events,
            tokens_generated=tokens,
        )
    groups = [[i for i, o in enumerate(policy.origin) if o == b] for b in range(len(prompts))]
    chosen, records, candidates = select_rows(trace, groups, p, extract)
    actions = [
        [*events, {"action": "select", "k": p["k"], **record}]
        for events, record in zip(policy.events, records, strict=True)
    ]
    return GenerationResult.chosen(trace, prompts, chosen, actions, candidates, tokens)


def _deepconf_online(strat: Strategy, *, extract, **run) -> GenerationResult:
    """DeepConf online (Fu et al. 2025): ``warmup`` traces per prompt set a threshold (the
    ``100 - keep`` percentile of their lowest group confidence); the other ``n - warmup``
    traces stop as soon as their window confidence falls below it; the vote counts the
    warm-up traces and the traces that were not stopped (:mod:`tokur_decode.candidates`)."""
    p = strat.params
    warmup, online = p["warmup"], p["n"] - p["warmup"]
    sampling = {"temperature": p["temperature"], "top_p": p["top_p"]}
    _, warm = _run(**run, **sampling, num_return_sequences=warmup)
    thresholds = deepconf_thresholds(warm, warmup, p)
    stop = StopOnTrigger(
        deepconf_trigger(p["window"]),
        eos_token_id=_eos(run["model"], run["tokenizer"]),
        thresholds=[t for t in thresholds for _ in range(online)],
        **run["signal_params"],
    )
    seed = run["seed"]
    _, later = _run(
        **{**run, "seed": None if seed is None else seed + 1},
        **sampling,
        action=stop,
        num_return_sequences=online,
    )
    stopped = [bool(events) for events in stop.events(later.lengths)]
    trace, chosen, actions, candidates = deepconf_vote(
        warm, later, stopped, thresholds, p, extract, run["max_new_tokens"]
    )
    return GenerationResult.chosen(trace, run["prompts"], chosen, actions, candidates)
