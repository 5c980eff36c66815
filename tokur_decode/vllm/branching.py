"""Branching through the engine: CoT-decoding and branch-on-trigger by re-submission.

vLLM cannot fork a running request, so a branch recipe runs as rounds of requests that
reproduce the transformers path's :class:`~tokur_decode.hf.branching.BranchPolicy` (same
forks, same candidates, same choice under greedy decoding; tested on the engine):

1. Each prompt is sent once with the recipe's trigger as a stop action and
   ``logprobs=k`` (vLLM's top-``k`` of the raw distribution); ``at = "first"`` sends a
   one-step probe instead. A request whose trigger fires at step ``s`` ends there (a
   forced EOS, not part of the answer).
2. Per prompt, the fires at its earliest step ``s`` are handled in candidate order: the
   cap on branch points and the token budget decide the alternatives
   (:func:`tokur_decode.strategies.candidates.fork_tokens`), and each alternative is sent as
   prompt + the answer's first ``s`` tokens with ``tokur_branch_token`` set to it. The
   engine's prefix cache holds that prefix, so only new tokens are decoded; the
   continuation's first step measures the branch point's distribution again and emits
   the alternative, and its trigger (while the prompt has branch points left) watches
   from the next step. A fire that may not fork continues with the engine's own choice.
3. Repeat until no request fires. Each candidate's trace is its requests' steps joined;
   the strategy layer chooses among them (:func:`tokur_decode.strategies.run.generate`),
   as for transformers.

Example:
    >>> import tokur_decode.vllm as tv
    >>> engine = tv.llm(enforce_eager=True)                               # doctest: +SKIP
    >>> result = tv.generate(engine, "What is 17 + 25?", strategy="cot-branch")  # doctest: +SKIP
    >>> fork, select = result.actions[0]                                  # doctest: +SKIP
    >>> fork["forked_ids"], select["chosen"]                            # doctest: +SKIP
    ([33, 2068, 1348, 504, 2705], 0)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..core.events import Fork
from ..core.trace import Trace
from ..strategies import backend as acts
from ..strategies.candidates import fork_tokens
from .args import stop_args
from .resubmission import Candidate, answers_trace

__all__ = ["branch"]


@dataclass
class _Request:
    candidate: Candidate
    token: int | None  # tokur_branch_token (None: the prompt's first request)
    watch: bool  # the trigger is on (a stop that ends the request where it fires)
    probe: bool = False  # at = "first": one step, only for its top-k


def branch(
    backend, inputs: list[list[int]], names: tuple[str, ...], act: acts.BranchAct, sampling
) -> acts.Decoded:
    """Run ``act`` for the token-id prompts ``inputs`` on ``backend`` (a
    :class:`~tokur_decode.vllm.VLLMBackend`): every candidate, with ``tokens`` counting
    every token the engine decoded (the probes and the forced EOS of each fire
    included). ``trace.meta`` reports the ``rounds`` of requests and the prompt tokens
    the engine found in its prefix cache (``cached_tokens``)."""
    c, trigger = act.config, act.trigger
    k, cap, budget = c.k, c.max_branch_points, c.token_budget or None
    limit = sampling.max_new_tokens
    seed = sampling.seed
    candidates = [[Candidate(b)] for b in range(len(inputs))]
    points = [0] * len(inputs)
    events: list[list[dict]] = [[] for _ in inputs]
    pending = [
        _Request(c[0], None, watch=trigger is not None, probe=trigger is None) for c in candidates
    ]
    rounds = decoded = sent = cached = 0
    while pending:
        rounds += 1
        # when sampling, a distinct seed per request: continuations of a fork must differ
        seeds = [None if seed is None else seed + sent + i for i in range(len(pending))]
        sent += len(pending)
        outputs, traces = backend.send(
            [inputs[r.candidate.prompt] + r.candidate.ids for r in pending],
            [
                _params(r, backend, names, sampling, trigger, k, s)
                for r, s in zip(pending, seeds, strict=True)
            ],
        )
        for request, out, trace in zip(pending, outputs, traces, strict=True):
            decoded += len(out.outputs[0].token_ids)
            cached += out.num_cached_tokens or 0
            _absorb(request, out.outputs[0], trace, k)
        pending = []
        for b, mine in enumerate(candidates):
            pending += _handle_fires(mine, points, events[b], b, cap, budget, limit, trigger)

    rows = [c for mine in candidates for c in mine]
    meta = {"branching": "re-submission", "rounds": rounds, "cached_tokens": cached}
    trace = answers_trace(rows, backend.engine.get_tokenizer(), meta)
    return acts.Decoded(trace, [c.prompt for c in rows], events, decoded)


def _params(request, backend, names, sampling, trigger, k, seed):
    """The request's ``SamplingParams``: the answer's remaining budget, the top-``k``
    log-probabilities where a fork may follow, the trigger as a stop while on."""
    settings = stop_args(trigger) if request.watch else {}
    if request.token is not None:
        settings["branch_token"] = request.token
        if request.watch:  # a continuation starts after a fire, which needed min_tokens
            settings["min_tokens"] = 0
    return backend.params(
        names,
        sampling,
        seed=seed,
        settings=settings,
        max_tokens=1 if request.probe else sampling.max_new_tokens - len(request.candidate.ids),
        logprobs=k if request.watch or request.probe else None,
    )


def _absorb(request: _Request, completion, trace: Trace, k: int) -> None:
    """Add a finished request's steps to its candidate; a fire (or the probe) leaves an
    unhandled fire with the step's top-``k`` alternatives."""
    cand = request.candidate
    n = int(trace.lengths[0])
    fired = [e for e in trace.meta["actions"][0] if "blocked" not in e]
    if request.probe:
        step, value = 0, None
    elif fired:
        step, value = fired[0]["step"], fired[0]["value"]
    else:
        cand.extend(trace, n)
        cand.done = True
        return
    top = sorted(completion.logprobs[step].items(), key=lambda item: item[1].rank)
    top_ids = [t for t, lp in top if lp.rank <= k and lp.logprob > -float("inf")]
    cand.fire = {"step": len(cand.ids) + step, "top_ids": top_ids, "value": value}
    cand.extend(trace, step)


def _handle_fires(mine, points, events, b, cap, budget, limit, trigger) -> list[_Request]:
    """Handle prompt ``b``'s fires at its earliest fire step, in candidate order (the
    transformers controller's row order); returns the requests that continue them."""
    steps = [c.fire["step"] for c in mine if c.fire is not None]
    if not steps:
        return []
    s = min(steps)
    continuing: list[tuple[Candidate, int]] = []
    for cand in [c for c in mine if c.fire is not None and c.fire["step"] == s]:
        fire, cand.fire = cand.fire, None
        forked = []
        if points[b] < cap:
            forked = fork_tokens(
                fire["top_ids"],
                budget,
                spent=sum(min(len(c.ids), s) for c in mine),
                running=sum(not c.done or len(c.ids) > s for c in mine),
                remaining=limit - s,
            )
        if len(forked) < 2:
            continuing.append((cand, -1))
            continue
        points[b] += 1
        fork = Fork.of(
            trigger,
            step=s,
            candidate=mine.index(cand),
            value=fire["value"],
            forked_ids=forked,
        )
        events.append(fork.to_dict())
        continuing.append((cand, forked[0]))
        for token in forked[1:]:
            mine.append(cand.fork())
            continuing.append((mine[-1], token))
    watch = trigger is not None and points[b] < cap
    return [_Request(cand, token, watch) for cand, token in continuing]
