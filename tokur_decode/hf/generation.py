"""Monitored generation with transformers: prompts in; texts, traces and actions out."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from .. import aggregate
from ..policy import signal_of_output
from ..select import choose
from ..strategy import Strategy
from ..trace import Trace
from .actions import ResampleOnTrigger, StopOnTrigger
from .monitor import DEFAULT_SIGNALS, SAMPLE_SIGNALS, UncertaintyMonitor
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
        candidates: best-of-N only: the trace of all ``N`` candidates per prompt.
    """

    texts: list[str]
    trace: Trace
    prompts: list[str]
    actions: list[list[dict]] = field(default_factory=list)
    candidates: list[Trace] | None = None

    @property
    def traces(self) -> list[Trace]:
        """One single-row trace per prompt."""
        return list(self.trace)


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
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    tokur: dict | None = None,
    extract: Callable[[str], object] = normalize_answer,
    **signal_params,
) -> GenerationResult:
    """Generate answers to ``prompts`` while recording uncertainty signals, and act on
    them when a ``strategy`` (a shipped recipe name, a TOML path, a dict or a
    :class:`~tokur_decode.strategy.Strategy`) says so.

    ``temperature=0`` decodes greedily; otherwise samples (with ``top_p``), reproducibly
    under ``seed``. ``signals`` default to the strategy's (else :data:`DEFAULT_SIGNALS`);
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
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list:
        raise ValueError("prompts: at least one prompt is required")
    strat = Strategy.load(strategy) if strategy is not None else None
    if signals is None:
        signals = (strat.signals if strat and strat.signals else None) or DEFAULT_SIGNALS
    names = (signals,) if isinstance(signals, str) else tuple(signals)
    if strat and strat.action == "best-of-n":  # record the signal that scores candidates
        needed = signal_of_output(strat.params["score"])
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
    action = _action_processor(strat, model, tokenizer, signal_params)
    out, trace = _run(**run, temperature=temperature, top_p=top_p, action=action)
    texts = list(trace.texts or [])
    actions = action.events(trace.lengths) if action else [[] for _ in prompt_list]
    abstain = strat.params.get("abstain_text") if strat and strat.action == "stop" else None
    if abstain is not None:
        for i, events in enumerate(actions):
            if any("blocked" not in e for e in events):
                texts[i] = abstain
    return GenerationResult(texts=texts, trace=trace, prompts=prompt_list, actions=actions)


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
    sampling = sampling_kwargs(temperature, top_p)
    if seed is not None:
        torch.manual_seed(seed)
    context = perturbed(model, **tokur) if tokur is not None else contextlib.nullcontext()
    with context as source, torch.inference_mode():
        monitor = UncertaintyMonitor(
            names, eos_token_id=_eos(model, tokenizer), sample_source=source, **signal_params
        )
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            logits_processor=[monitor] + ([action] if action else []),
            pad_token_id=tokenizer.pad_token_id,
            return_dict_in_generate=True,
            num_return_sequences=num_return_sequences,
            **sampling,
        )
    return out, monitor.trace(out, tokenizer)


def _best_of_n(strat: Strategy, *, extract, top_p, **run) -> GenerationResult:
    p = strat.params
    n = p["n"]
    _, trace = _run(
        **run, temperature=p["temperature"], top_p=p.get("top_p", top_p), num_return_sequences=n
    )
    raw = aggregate.reduce(p["reducer"], trace.signals[p["score"]], trace.lengths)
    scores = (raw if p["higher_is_better"] else -raw).tolist()
    answers = [extract(text) for text in trace.texts]
    chosen, actions, candidates = [], [], []
    for b in range(len(run["prompts"])):
        rows = list(range(b * n, (b + 1) * n))
        pick = rows[
            choose([answers[i] for i in rows], [scores[i] for i in rows], p["method"], p["eta"])
        ]
        chosen.append(pick)
        candidates.append(trace.select(rows))
        actions.append(
            [
                {
                    "action": "best-of-n",
                    "n": n,
                    "chosen": pick - b * n,
                    "score": p["score"],
                    "reducer": p["reducer"],
                    "higher_is_better": p["higher_is_better"],
                    "method": p["method"],
                    "eta": p["eta"],
                    "scores": [raw.tolist()[i] for i in rows],
                    "answers": [answers[i] for i in rows],
                }
            ]
        )
    final = trace.select(chosen)
    return GenerationResult(
        texts=list(final.texts or []),
        trace=final,
        prompts=run["prompts"],
        actions=actions,
        candidates=candidates,
    )
