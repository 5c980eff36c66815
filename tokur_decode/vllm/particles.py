"""Particles in vLLM: :class:`VLLMParticles`, steps as re-submitted requests.

vLLM cannot pause a running request at a step boundary, so each step of every
unfinished particle is one request, all sent together: prompt + the particle's answer
so far as token ids, ``stop=[delimiter]`` (the stop string kept in the output) and at
most ``max_tokens`` new tokens, seeded ``seed + sent`` (``sent``: requests sent before
it, so no two requests share a seed and a run is reproducible). The engine's prefix
cache holds the prompt and every step already decoded (in whole KV blocks: build the
engine with ``block_size=32`` for short answers), so a particle and its copies only
decode new tokens; ``trace().meta["cached_tokens"]`` counts the prompt tokens it found
cached. A particle has finished when its request ended on EOS or its answer
reached ``max_new_tokens``. Made by :meth:`tokur_decode.vllm.VLLMBackend.particles`.

Example:
    >>> import tokur_decode.vllm as tv
    >>> from tokur_decode.strategies.backend import Request, Sampling, StepsAct
    >>> backend = tv.VLLMBackend(tv.llm(enforce_eager=True))                # doctest: +SKIP
    >>> request = Request(("entropy",), Sampling(temperature=0.7), n=4,
    ...                   act=StepsAct("\\n\\n", 32))
    >>> with backend.particles(["What is 2 + 2?"], request) as particles:   # doctest: +SKIP
    ...     step, done = particles.advance()
    ...     particles.select([0, 0, 1, 1])
"""

from __future__ import annotations

from collections.abc import Sequence

from ..core.trace import Trace
from ..strategies import backend as acts
from .resubmission import Candidate, answers_trace

__all__ = ["VLLMParticles"]


class VLLMParticles:
    """:class:`~tokur_decode.strategies.backend.Particles` on a
    :class:`~tokur_decode.vllm.VLLMBackend` for token-id prompts ``inputs``."""

    def __init__(self, backend, inputs: list[list[int]], request: acts.Request) -> None:
        self._backend, self._inputs, self._request = backend, inputs, request
        self._rows = [Candidate(p) for p in range(len(inputs)) for _ in range(request.n)]
        self._sent = self.tokens = self._cached = 0

    def advance(self, hold: Sequence[bool] | None = None) -> tuple[Trace, list[bool]]:
        request, sampling = self._request, self._request.sampling
        steps, budget = request.act, sampling.max_new_tokens
        hold = (
            [False] * len(self._rows)
            if hold is None
            else acts.one_per_particle(hold, len(self._rows), "hold")
        )
        live = [row for row, held in zip(self._rows, hold, strict=True) if not (row.done or held)]
        seed = sampling.seed
        params = [
            self._backend.params(
                request.signals,
                sampling,
                seed=None if seed is None else seed + self._sent + i,
                max_tokens=min(steps.max_tokens, budget - len(row.ids)),
                stop=[steps.delimiter],
                include_stop_str_in_output=True,
            )
            for i, row in enumerate(live)
        ]
        self._sent += len(live)
        prompts = [self._inputs[row.prompt] + row.ids for row in live]
        outputs, traces = self._backend.send(prompts, params) if live else ([], [])
        new = {id(row): Candidate(row.prompt) for row in live}
        for row, out, trace in zip(live, outputs, traces, strict=True):
            completion, n = out.outputs[0], int(trace.lengths[0])
            self.tokens += n
            self._cached += out.num_cached_tokens or 0
            row.extend(trace, n)
            new[id(row)].extend(trace, n)
            eos = completion.finish_reason == "stop" and not isinstance(completion.stop_reason, str)
            row.done = eos or len(row.ids) >= budget
        step = [new.get(id(row), Candidate(row.prompt)) for row in self._rows]
        return self._trace(step), [row.done for row in self._rows]

    def select(self, index: Sequence[int]) -> None:
        copies = []
        for i in acts.one_per_particle(index, len(self._rows), "index"):
            copy = self._rows[i].fork()
            copy.done = self._rows[i].done
            copies.append(copy)
        self._rows = copies

    def trace(self) -> Trace:
        return self._trace(self._rows)

    def _trace(self, rows: list[Candidate]) -> Trace:
        meta = {"stepping": "re-submission", "cached_tokens": self._cached}
        return answers_trace(rows, self._backend.engine.get_tokenizer(), meta)
