"""Contract tests: the V1 and MRV2 adapters of the uncertainty processor, driven the way
their samplers drive them, give identical edited logits and identical traces.

One synthetic engine schedules requests with different settings (signals only, a stop
action, a veto resample, not opted in), different prompt lengths and budgets; each
request's logits at each step are fixed random numbers, so both adapters see the same
rows in their own layouts: the V1 persistent batch (holes filled by adds, condensed by
one-way moves, a swap every step, a preemption and its resumption) and MRV2's
per-slot bookkeeping (slots recycled, rows reordered every step). Tokens are chosen
greedily from the V1 adapter's edited logits.
"""

from __future__ import annotations

import random
import types

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.engine

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext  # noqa: E402

from tokur_decode.vllm import uncertainty_args  # noqa: E402
from tokur_decode.vllm.processor import UncertaintyProcessor  # noqa: E402
from tokur_decode.vllm.processor_v2 import UncertaintyProcessorV2  # noqa: E402

V, SLOTS, MAX_LEN, EOS = 40, 6, 64, 0
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


def _config(name: str):
    return types.SimpleNamespace(
        model_config=types.SimpleNamespace(get_vocab_size=lambda: V, max_model_len=MAX_LEN),
        scheduler_config=types.SimpleNamespace(max_num_seqs=2),  # forces the slots to grow
        speculative_config=None,
        instance_id=name,
    )


def _logits(req: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * req + step)
    return torch.randn(V, generator=g) * 2.5


class _Request:
    def __init__(self, i: int, rng: random.Random) -> None:
        self.id = f"req-{i}"
        self.index = i
        extra = SETTINGS[i % len(SETTINGS)]
        self.params = SamplingParams(
            max_tokens=rng.randint(4, 12),
            stop_token_ids=[EOS],
            extra_args=uncertainty_args(**extra) if extra else None,
        )
        self.prompt = [rng.randint(1, V - 1) for _ in range(rng.randint(2, 5))]
        self.outputs: list[int] = []  # V1's live output_ids list

    @property
    def done(self) -> bool:
        return bool(self.outputs) and (
            self.outputs[-1] == EOS or len(self.outputs) >= self.params.max_tokens
        )


class _V1Driver:
    """vLLM's V1 persistent batch: adds fill the lowest holes, then the last rows are
    moved into the remaining holes; one swap per step."""

    def __init__(self, rng: random.Random) -> None:
        self.proc = UncertaintyProcessor(_config("contract-v1"), torch.device("cpu"), False)
        self.batch = types.SimpleNamespace(req_ids=[])
        self.runner = types.SimpleNamespace(input_batch=self.batch, requests={})
        self.proc.bind(self.runner)
        self.rows: list[_Request] = []
        self.rng = rng

    def step(self, leaving, preempted, entering) -> None:
        removed = [i for i, r in enumerate(self.rows) if r in leaving or r in preempted]
        for r in leaving:
            self.runner.requests.pop(r.id, None)
        slots: list[_Request | None] = [
            None if i in removed else r for i, r in enumerate(self.rows)
        ]
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

    def apply(self, step_of) -> dict[str, torch.Tensor]:
        logits = torch.stack([_logits(r.index, step_of(r)) for r in self.rows])
        out = self.proc.apply(logits)
        return {r.id: out[i] for i, r in enumerate(self.rows)}


class _V2Driver:
    """MRV2's bookkeeping: slots from a free list, per-slot token history on the device
    (writes for a new occupant land after ``add_request``), rows reordered every step."""

    def __init__(self, rng: random.Random) -> None:
        self.prompt_np = np.zeros(SLOTS, dtype=np.int32)
        self.states = types.SimpleNamespace(
            device=torch.device("cpu"),
            prompt_len=types.SimpleNamespace(
                np=self.prompt_np, gpu=torch.from_numpy(self.prompt_np)
            ),
            total_len=types.SimpleNamespace(gpu=torch.zeros(SLOTS, dtype=torch.int32)),
            all_token_ids=types.SimpleNamespace(gpu=torch.zeros(SLOTS, MAX_LEN, dtype=torch.int32)),
        )
        self.proc = UncertaintyProcessorV2(_config("contract-v2"), self.states)
        self.ids: dict[int, str] = {}
        self.proc.bind(
            types.SimpleNamespace(req_states=types.SimpleNamespace(index_to_req_id=self.ids))
        )
        self.free = list(range(SLOTS))
        self.slot_of: dict[str, int] = {}
        self.rng = rng

    def step(self, leaving, preempted, entering) -> None:
        for r in [*leaving, *preempted]:
            slot = self.slot_of.pop(r.id)
            del self.ids[slot]
            self.free.append(slot)
        for r in entering:
            slot = self.free.pop()
            self.slot_of[r.id] = slot
            self.ids[slot] = r.id
            self.prompt_np[slot] = len(r.prompt)
            params = r.params.clone()  # MRV2 deserialises a new object on each (re)add
            self.proc.add_request(slot, params)
            tokens = r.prompt + r.outputs  # the staged writes, applied after the adds
            self.states.all_token_ids.gpu[slot, : len(tokens)] = torch.tensor(tokens)
            self.states.total_len.gpu[slot] = len(tokens)

    def apply(self, live, step_of) -> dict[str, torch.Tensor]:
        order = list(live)
        self.rng.shuffle(order)
        slots = np.array([self.slot_of[r.id] for r in order], dtype=np.int32)
        total = self.states.total_len.gpu[torch.from_numpy(slots).long()]
        idx = torch.from_numpy(slots).long()
        ctx = LogitsContext(
            expanded_idx_mapping=idx,
            idx_mapping=idx,
            idx_mapping_np=slots,
            expanded_local_pos=torch.zeros_like(idx),
            input_ids=torch.zeros_like(idx),
            pos=(total - 1).long(),
            seq_lens_upper_bound_np=total.numpy().copy(),
        )
        logits = torch.stack([_logits(r.index, step_of(r)) for r in order])
        out = self.proc.apply(logits, ctx)
        return {r.id: out[i] for i, r in enumerate(order)}

    def sampled(self, r: _Request, token: int) -> None:
        slot = self.slot_of[r.id]
        n = int(self.states.total_len.gpu[slot])
        self.states.all_token_ids.gpu[slot, n] = token
        self.states.total_len.gpu[slot] = n + 1


def test_v1_and_mrv2_adapters_agree_through_churn():
    rng = random.Random(0)
    requests = [_Request(i, rng) for i in range(14)]
    requests[0].params.max_tokens = 12
    v1, v2 = _V1Driver(random.Random(1)), _V2Driver(random.Random(2))
    waiting, live, finished, parked = list(requests), [], [], []
    preempt_at = {5: requests[0]}  # signals with chosen_prob: completed across the gap
    edited_rows = 0
    for step in range(80):
        leaving = [r for r in live if r.done]
        preempted = [r for r in [preempt_at.get(step)] if r is not None and r in live]
        live = [r for r in live if r not in leaving and r not in preempted]
        finished += leaving
        parked += preempted
        entering = []
        if step == 9:
            entering += parked
            parked = []
        while waiting and len(live) + len(entering) < 4:
            entering.append(waiting.pop(0))
        live += entering
        if not live:
            break
        v1.step(leaving, preempted, entering)
        v2.step(leaving, preempted, entering)

        def step_of(r):
            return len(r.outputs)

        out1 = v1.apply(step_of)
        out2 = v2.apply(live, step_of)
        for r in live:
            torch.testing.assert_close(out2[r.id], out1[r.id], rtol=0, atol=0)
            raw = _logits(r.index, step_of(r))
            edited_rows += int(not torch.equal(out1[r.id], raw))
            token = int(out1[r.id].argmax())
            r.outputs.append(token)
            v2.sampled(r, token)
    assert not waiting and not parked and len(finished) + len(live) == len(requests)
    opted = {r.id for r in requests if r.params.extra_args is not None}
    traces1 = {t["request_id"]: t for t in v1.proc.collect(sorted(opted))}
    traces2 = {t["request_id"]: t for t in v2.proc.collect(sorted(opted))}
    assert set(traces1) == set(traces2) == opted
    for rid in opted:
        assert traces2[rid] == traces1[rid]
    events = [e for t in traces1.values() for e in t["events"]]
    assert {e["action"] for e in events} == {"stop", "resample"}
    assert edited_rows >= 2
    preempted = traces1[requests[0].id]
    assert len(preempted["token_ids"]) == len(requests[0].outputs) > 5
    chosen = preempted["signals"]["chosen_prob"]
    assert all(c > 0 for c in chosen)  # every step completed, the one before the gap too
    branched = [r for r in requests if "tokur_branch_token" in (r.params.extra_args or {})]
    assert len(branched) == 2
    for r in branched:
        trace, raw = traces1[r.id], _logits(r.index, 0)
        assert trace["token_ids"][0] == 7  # forced, though not the argmax
        assert int(raw.argmax()) != 7
        expected = torch.softmax(raw.double(), -1)[7].item()
        assert trace["signals"]["chosen_prob"][0] == pytest.approx(expected, rel=1e-5)
        # the entropy is above the threshold at every step: the trigger skips the first
        assert [e["step"] for e in trace["events"]] == [1]


def test_request_settings_name_a_bad_signal_list():
    import tokur_decode.vllm as tv

    for bad in (5, [], "all,bogus"):
        with pytest.raises(ValueError, match="tokur_signals: "):
            tv.uncertainty_args(signals=bad)
        with pytest.raises(ValueError, match="tokur_signals: "):
            tv.parse_settings({"tokur_signals": bad})
    assert tv.uncertainty_args(["entropy"])["tokur_signals"] == "entropy"  # control


def test_a_branch_token_beyond_the_vocabulary_is_named_and_not_forced(caplog):
    def first_logits(branch_token: int) -> torch.Tensor:
        proc = UncertaintyProcessor(_config("branch-token"), torch.device("cpu"), False)
        extra = uncertainty_args(["entropy"], branch_token=branch_token)
        params = SamplingParams(max_tokens=4, stop_token_ids=[EOS], extra_args=extra)
        proc.update_state(BatchUpdate(1, [], [(0, params, [1, 2], [])], []))
        return proc.apply(_logits(0, 0).unsqueeze(0).clone())[0]

    with caplog.at_level("WARNING", logger="tokur_decode.vllm.processor_core"):
        beyond = first_logits(V + 5)
    assert "tokur_branch_token=45" in caplog.text and f"vocabulary {V}" in caplog.text
    torch.testing.assert_close(beyond, _logits(0, 0), rtol=0, atol=0)  # not forced
    forced = first_logits(7)  # control: a valid token is forced
    assert int(forced.argmax()) == 7 != int(_logits(0, 0).argmax())
