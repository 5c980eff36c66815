"""Scripted vLLM runners: the uncertainty processor driven the way vLLM's V1 runner and
Model Runner V2 (MRV2) drive their logits processors, without a model.

One scenario (:func:`run`) schedules requests with different settings (signals only, a
stop action, a veto resample, not opted in, a branch continuation), prompt lengths and
budgets, a preemption and its resumption, a chunked prefill and a thinking budget
that overrides a stop. Each request's logits at each step are fixed random numbers and
tokens are chosen greedily from the edited logits, so two runners that drive the
processor correctly give the same tokens, signals and events whatever their layouts:

* :class:`V1Runner`: V1's persistent batch (holes filled by adds, condensed by one-way
  moves, a swap every step), ``update_state(BatchUpdate)`` before ``apply(logits)``;
  needs a vLLM with the V1 interface (up to 0.33).
* :class:`MRV2Runner`: MRV2's bookkeeping in the installed vLLM's own terms: the
  processor built by vLLM's MRV2 loader (``build_custom_logits_processors``) from our
  FQCN, on a ``LogitsProcRequestState`` made by vLLM's ``from_request_state``;
  persistent slots from a free list (reused at once, with no removal notice), each
  new occupant's token writes staged and applied after ``add_request`` (as
  ``RequestState`` does), rows reordered every step, ``LogitsContext`` built as the
  sampler builds it, the thinking budget forced after the processors (as
  ``ThinkingBudgetState`` does: +1e9 on the end token).

Run as a script with any vLLM on ``PYTHONPATH`` (the unpacked wheels of
``scripts/vllm_interfaces.py``) it prints the MRV2 runner's traces as JSON::

    PYTHONPATH=~/.cache/tokur-decode/vllm-interfaces/0.34.0 python -m tests.vllm.scripted --control

It also prints what the vLLM's own loaders make of the processor (:func:`checks`);
``--control`` adds the run of a processor that ignores that a slot was reused (the
previous occupant is never ended), whose traces must differ.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import types

import numpy as np
import torch

V, SLOTS, MAX_LEN, EOS = 40, 6, 64, 0
END_THINK = 3  # the thinking budget's forced end-of-reasoning token
PROCESSOR = "tokur_decode.vllm.processor:UncertaintyProcessor"

SETTINGS = [
    {"signals": ["entropy", "chosen_prob", "deepconf"]},
    {"signals": ["max_prob", "logtoku"], "action": "stop", "trigger": "entropy", "threshold": 2.4},
    {
        "signals": ["margin"],
        "action": "resample",
        "trigger": "max_prob",
        "direction": "below",
        "threshold": 0.3,
        "patience": 2,
    },
    None,
    # a branch continuation: token 7 forced at its first step, the trigger watches after
    {
        "signals": ["entropy", "chosen_prob"],
        "action": "stop",
        "trigger": "entropy",
        "threshold": 0.5,
        "branch_token": 7,
    },
]
#: A stop that fires at every step (any entropy is above 0), on a request whose thinking
#: budget (0 tokens) is spent at once: vLLM forces END_THINK at step 0, over our EOS; the
#: stop at step 1 is taken.
THINKING = {"signals": ["entropy"], "action": "stop", "trigger": "entropy", "threshold": 0.0}
THINKING_BUDGET = 0
#: The request whose prompt is prefilled in two chunks (its first call is discarded).
CHUNKED = 2
#: (step of the scenario, request preempted); it comes back at step RESUME.
PREEMPT, RESUME = (5, 0), 9


def config(name: str):
    """The parts of a ``VllmConfig`` the processor reads."""
    return types.SimpleNamespace(
        model_config=types.SimpleNamespace(get_vocab_size=lambda: V, max_model_len=MAX_LEN),
        scheduler_config=types.SimpleNamespace(max_num_seqs=2),  # forces the slots to grow
        speculative_config=None,
        instance_id=name,
    )


def logits_of(req: int, step: int) -> torch.Tensor:
    """Request ``req``'s logits at output step ``step`` (whatever the batch)."""
    g = torch.Generator().manual_seed(1000 * req + step)
    return torch.randn(V, generator=g) * 2.5


class Request:
    def __init__(self, i: int, rng: random.Random) -> None:
        from vllm import SamplingParams

        from tokur_decode.vllm import uncertainty_args

        self.id = f"req-{i}"
        self.index = i
        extra = THINKING if i == 13 else SETTINGS[i % len(SETTINGS)]
        self.params = SamplingParams(
            max_tokens=rng.randint(4, 12),
            stop_token_ids=[EOS],
            extra_args=uncertainty_args(**extra) if extra else None,
        )
        self.thinking = i == 13
        self.prompt = [rng.randint(4, V - 1) for _ in range(rng.randint(2, 5))]
        self.outputs: list[int] = []  # V1's live output_ids list
        self.chunks = 2 if i == CHUNKED else 1  # prefill calls left before the first token

    @property
    def done(self) -> bool:
        return bool(self.outputs) and (
            self.outputs[-1] == EOS or len(self.outputs) >= self.params.max_tokens
        )

    def force_thinking(self, logits: torch.Tensor) -> None:
        """vLLM's thinking-budget forcing (after the processors): the budget is spent
        at step THINKING_BUDGET, where the end token gets +1e9."""
        if self.thinking and len(self.outputs) == THINKING_BUDGET:
            logits[END_THINK] = 1.0e9


class V1Runner:
    """vLLM's V1 persistent batch: adds fill the lowest holes, then the last rows are
    moved into the remaining holes; one swap per step."""

    def __init__(self, rng: random.Random) -> None:
        from tokur_decode.vllm.processor import UncertaintyProcessor

        self.proc = UncertaintyProcessor(config("scripted-v1"), torch.device("cpu"), False)
        self.batch = types.SimpleNamespace(req_ids=[])
        self.runner = types.SimpleNamespace(input_batch=self.batch, requests={})
        self.proc.bind(self.runner)
        self.rows: list[Request] = []
        self.rng = rng

    def step(self, leaving, preempted, entering) -> None:
        from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

        removed = [i for i, r in enumerate(self.rows) if r in leaving or r in preempted]
        for r in leaving:
            self.runner.requests.pop(r.id, None)
        slots: list[Request | None] = [None if i in removed else r for i, r in enumerate(self.rows)]
        added = []
        for r in entering:
            self.runner.requests[r.id] = r
            hole = next((i for i, x in enumerate(slots) if x is None), len(slots))
            if hole == len(slots):
                slots.append(None)
            slots[hole] = r
            added.append((hole, r.params, r.prompt, r.outputs))
        moved = []
        while None in slots:
            hole = slots.index(None)
            last = max(i for i, x in enumerate(slots) if x is not None) if any(slots) else -1
            if last < hole:
                del slots[hole:]
                break
            slots[hole], slots[last] = slots[last], None
            moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
        if len(slots) >= 2:
            a, b = self.rng.sample(range(len(slots)), 2)
            slots[a], slots[b] = slots[b], slots[a]
            moved.append((a, b, MoveDirectionality.SWAP))
        self.rows = slots
        self.batch.req_ids = [r.id for r in slots]
        if removed or added or moved:
            self.proc.update_state(BatchUpdate(len(slots), removed, added, moved))

    def apply(self, live) -> dict[str, torch.Tensor]:
        logits = torch.stack([logits_of(r.index, len(r.outputs)) for r in self.rows])
        out = self.proc.apply(logits)
        for i, r in enumerate(self.rows):
            r.force_thinking(out[i])
        return {r.id: out[i] for i, r in enumerate(self.rows)}

    def sampled(self, r: Request, token: int) -> None:
        r.outputs.append(token)  # V1's live list, which the processor reads

    def collect(self, ids) -> list[dict]:
        return self.proc.collect(ids)


class _Staged:
    """``StagedWriteTensor``: writes staged on the host, applied to ``gpu`` later."""

    def __init__(self, *shape: int) -> None:
        self.gpu = torch.zeros(*shape, dtype=torch.int32)
        self._staged: list[tuple] = []

    def stage(self, index, value) -> None:
        self._staged.append((index, value))

    def apply_write(self) -> None:
        for index, value in self._staged:
            self.gpu[index] = value
        self._staged = []


class _Uva:
    """``UvaBackedTensor``: ``np`` written on the host, copied to a new ``gpu`` tensor."""

    def __init__(self, n: int) -> None:
        self.np = np.zeros(n, dtype=np.int32)
        self.gpu = torch.zeros(n, dtype=torch.int32)

    def copy_to_uva(self) -> None:
        self.gpu = torch.from_numpy(self.np.copy())


class MRV2Runner:
    """MRV2's request state, slots and sampler as vLLM's ``GPUModelRunner`` and
    ``Sampler`` drive them, with the installed vLLM's interface modules."""

    def __init__(self, rng: random.Random) -> None:
        from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors

        self.states = self.request_state()
        (self.proc,) = build_custom_logits_processors(
            config("scripted-mrv2"), self.states, False, [PROCESSOR]
        )
        self.prepare_inputs = lambda layout: types.SimpleNamespace(idx_mapping_np=layout)
        self.req_states = self.states
        self.proc.bind(self)  # the runner: req_states, prepare_inputs (wrapped by bind)
        self.free = list(range(SLOTS))
        self.slot_of: dict[str, int] = {}
        self.rng = rng
        self.order: list[Request] = []

    @staticmethod
    def request_state() -> types.SimpleNamespace:
        """MRV2's ``RequestState``: the buffers ``LogitsProcRequestState`` wraps."""
        return types.SimpleNamespace(
            device=torch.device("cpu"),
            max_num_reqs=SLOTS,
            vocab_size=V,
            all_token_ids=_Staged(SLOTS, MAX_LEN),
            prompt_len=_Uva(SLOTS),
            prefill_len=_Uva(SLOTS),
            total_len=_Staged(SLOTS),
            index_to_req_id={},
        )

    def step(self, leaving, preempted, entering) -> None:
        states = self.states
        for r in [*leaving, *preempted]:  # finish_requests: the slot is freed, silently
            slot = self.slot_of.pop(r.id)
            del states.index_to_req_id[slot]
            self.free.append(slot)
        for r in entering:  # add_requests: staged writes, then the sampler's add_request
            slot = self.free.pop()
            self.slot_of[r.id] = slot
            states.index_to_req_id[slot] = r.id
            tokens = r.prompt + r.outputs
            states.prompt_len.np[slot] = len(r.prompt)
            states.prefill_len.np[slot] = len(tokens)
            states.total_len.stage(slot, len(tokens))
            states.all_token_ids.stage((slot, slice(0, len(tokens))), torch.tensor(tokens))
            params = r.params.clone()  # MRV2 deserialises a new object on each (re)add
            self.proc.add_request(slot, params)
        if entering:
            states.prompt_len.copy_to_uva()
            states.prefill_len.copy_to_uva()
            states.total_len.apply_write()
            states.all_token_ids.apply_write()
            self.proc.apply_staged_writes()

    def apply(self, live) -> dict[str, torch.Tensor]:
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

        order = list(live)
        self.rng.shuffle(order)  # rows reordered every step
        slots = np.array([self.slot_of[r.id] for r in order], dtype=np.int32)
        self.prepare_inputs(slots)  # the batch, before the forward
        idx = torch.from_numpy(slots).long()
        total = self.states.total_len.gpu[idx]
        # a partial prefill chunk ends before the prompt does
        fed = torch.tensor([len(r.prompt) - (r.chunks - 1) for r in order]) + torch.tensor(
            [len(r.outputs) for r in order]
        )
        pos = torch.minimum(total, fed) - 1
        ctx = LogitsContext(
            expanded_idx_mapping=idx,
            idx_mapping=idx,
            idx_mapping_np=slots,
            expanded_local_pos=torch.zeros_like(idx),
            input_ids=self.states.all_token_ids.gpu[idx, pos.long()].long(),
            pos=pos.long(),
            seq_lens_upper_bound_np=(pos + 1).numpy().astype(np.int32),
        )
        logits = torch.stack([logits_of(r.index, len(r.outputs)) for r in order])
        out = self.proc.apply(logits, ctx)
        for i, r in enumerate(order):
            r.force_thinking(out[i])
        return {r.id: out[i] for i, r in enumerate(order)}

    def sampled(self, r: Request, token: int) -> None:
        r.outputs.append(token)
        slot = self.slot_of[r.id]
        n = int(self.states.total_len.gpu[slot])
        self.states.all_token_ids.gpu[slot, n] = token
        self.states.total_len.gpu[slot] = n + 1

    def collect(self, ids) -> list[dict]:
        return self.proc.collect(ids)


def run(runner_class) -> dict:
    """The scenario on one runner: ``{"traces": {request id: trace}, "edited": rows
    whose logits the processor changed, "tokens": every request's tokens}``."""
    rng = random.Random(0)
    requests = [Request(i, rng) for i in range(14)]
    requests[0].params.max_tokens = 12
    runner = runner_class(random.Random(1))
    waiting, live, parked = list(requests), [], []
    edited = 0
    for step in range(80):
        leaving = [r for r in live if r.done]
        preempted = [requests[PREEMPT[1]]] if step == PREEMPT[0] else []
        preempted = [r for r in preempted if r in live]
        live = [r for r in live if r not in leaving and r not in preempted]
        parked += preempted
        entering = []
        if step == RESUME:
            entering += parked
            parked = []
        while waiting and len(live) + len(entering) < 4:
            entering.append(waiting.pop(0))
        live += entering
        if not live:
            break
        runner.step(leaving, preempted, entering)
        out = runner.apply(live)
        for r in live:
            edited += int(not torch.equal(out[r.id], logits_of(r.index, len(r.outputs))))
            if r.chunks > 1:  # a partial prefill: its token is discarded
                r.chunks -= 1
                continue
            runner.sampled(r, int(out[r.id].argmax()))
    assert not waiting and not parked
    opted = sorted(r.id for r in requests if r.params.extra_args is not None)
    traces = {t["request_id"]: t for t in runner.collect(opted)}
    return {"traces": traces, "edited": edited, "tokens": {r.id: r.outputs for r in requests}}


def assert_same_traces(got: dict, want: dict) -> None:
    """Tokens and events equal, signals equal to 1e-5 (NaN where the other is NaN)."""
    import pytest

    assert set(got) == set(want)
    for rid, trace in want.items():
        other = got[rid]
        assert other["token_ids"] == trace["token_ids"], rid
        assert set(other["signals"]) == set(trace["signals"]), rid
        for name, values in trace["signals"].items():
            torch.testing.assert_close(
                torch.tensor(other["signals"][name], dtype=torch.float64),
                torch.tensor(values, dtype=torch.float64),
                rtol=0,
                atol=1e-5,
                equal_nan=True,
                msg=f"{rid} {name}",
            )
        assert len(other["events"]) == len(trace["events"]), rid
        for a, b in zip(other["events"], trace["events"], strict=True):
            assert {k: v for k, v in a.items() if k != "value"} == {
                k: v for k, v in b.items() if k != "value"
            }, rid
            assert a["value"] == pytest.approx(b["value"], abs=1e-5), rid


def _break_slot_reuse() -> None:
    """The control: a processor that does not end a reused slot's previous occupant."""
    from tokur_decode.vllm.mrv2_slots import MRV2Slots

    def add_request(self, slot, params):
        req = self.core.new_request(params, [])
        if req is None:
            return False
        req.req_id = self.core.runner.req_states.index_to_req_id.get(slot)
        self._by_slot[slot], self._prompt[slot], self._dirty = (
            req,
            int(self.states.prompt_len.np[slot]),
            True,
        )
        return True

    MRV2Slots.add_request = add_request


def checks() -> dict[str, str]:
    """What the installed vLLM's own loaders make of the processor, as messages:
    ``"admission"``, its params validator on a request with a bad ``tokur_`` key (the
    error a client gets); ``"speculative"``, its MRV2 loader on an engine with
    speculative decoding; ``"plugins"``, our two entry points loaded; ``"models"``,
    TokUR's model class over this vLLM's own."""
    from vllm import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor import (
        build_custom_logits_processors,
        build_custom_logits_processors_params_validator,
    )

    from tokur_decode.vllm.server import TraceEndpoints
    from tokur_decode.vllm.tokur import register

    found = {}
    validate = build_custom_logits_processors_params_validator([PROCESSOR])
    validate(SamplingParams(extra_args={"tokur_signals": "entropy"}))  # control: admitted
    try:
        validate(SamplingParams(extra_args={"tokur_signals": "entropy", "tokur_window": 0}))
    except Exception as error:  # vLLM's VLLMValidationError
        found["admission"] = f"{type(error).__name__}: {error}"
    speculative = config("scripted-speculative")
    speculative.speculative_config = types.SimpleNamespace(num_speculative_tokens=2)
    try:
        build_custom_logits_processors(speculative, MRV2Runner.request_state(), False, [PROCESSOR])
    except ValueError as error:
        found["speculative"] = str(error)
    register()
    found["plugins"] = TraceEndpoints.__name__
    from tokur_decode.vllm import tokur_models  # TokUR's classes over this vLLM's models

    found["models"] = [c.__name__ for c in tokur_models.TokurLlamaForCausalLM.__mro__[1:3]]
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--control", action="store_true", help="also run the broken control")
    args = parser.parse_args(argv)
    import vllm

    out = {"vllm": vllm.__version__, "checks": checks()}
    with torch.inference_mode():
        out["run"] = run(MRV2Runner)
        if args.control:
            _break_slot_reuse()
            out["broken"] = run(MRV2Runner)
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
