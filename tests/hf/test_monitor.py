"""The transformers monitor: alignment, batching, padding, sampling, finished rows,
reuse, and no host synchronisation in the hot path."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tokur_decode.core.signals import compute_signals
from tokur_decode.hf import UncertaintyMonitor

from ..helpers import NoHostSync

EOS = 127  # tiny_model(vocab_size=128)
ALL = "all"


def run(model, input_ids, monitor, attention_mask=None, **kw):
    kw.setdefault("max_new_tokens", 12)
    with torch.inference_mode():
        return model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask
            if attention_mask is not None
            else torch.ones_like(input_ids),
            logits_processor=[monitor],
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=EOS,
            eos_token_id=EOS,
            **kw,
        )


def test_trace_equals_signals_of_raw_logits_at_every_step(tiny_llama):
    monitor = UncertaintyMonitor(ALL, eos_token_id=EOS)
    prompt = torch.tensor([[1, 5, 9, 3]])
    out = run(tiny_llama, prompt, monitor, do_sample=False)
    trace = monitor.trace(out)
    generated = out.sequences[:, prompt.shape[1] :]
    assert trace.token_ids.tolist() == generated.tolist()
    ref = compute_signals(torch.stack(out.logits, dim=1), ALL, generated)
    for key, value in ref.items():
        torch.testing.assert_close(trace.signals[key], value)
    # the first generated token's chosen prob is its probability under step 0's logits
    p0 = torch.softmax(out.logits[0][0], -1)[generated[0, 0]]
    assert trace.signals["chosen_prob"][0, 0].item() == pytest.approx(p0.item(), rel=1e-5)


def test_batched_padded_sampled_trace_equals_per_prompt_traces(tiny_llama):
    prompts = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    width = max(map(len, prompts))
    ids = torch.tensor([[EOS] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    monitor = UncertaintyMonitor(ALL, eos_token_id=EOS)
    torch.manual_seed(1)
    batch = run(tiny_llama, ids, monitor, attention_mask=mask, do_sample=True, temperature=1.3)
    batch_trace = monitor.trace(batch)
    for i, p in enumerate(prompts):
        # Replay each prompt alone, forcing the batch's sampled continuation with a
        # processor placed after the monitor: the monitor must see the same logits.
        n = int(batch_trace.lengths[i])
        tokens = batch.sequences[i, width : width + n]
        single = UncertaintyMonitor(ALL, eos_token_id=EOS)
        trace = single.trace(
            _run_forced(tiny_llama, torch.tensor([p]), single, _ForceTokens(tokens), n)
        )
        assert trace.token_ids[0].tolist() == tokens.tolist()
        for key in batch_trace.names:
            torch.testing.assert_close(
                batch_trace.signals[key][i, :n], trace.signals[key][0, :n], atol=2e-4, rtol=2e-4
            )


class _ForceTokens:
    """A processor that forces a given continuation (runs after the monitor)."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens
        self.prompt_len = None

    def __call__(self, input_ids, scores):
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.tokens[step]] = 0.0
        return forced


def _run_forced(model, prompt, monitor, forced, n):
    with torch.inference_mode():
        return model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            logits_processor=[monitor, forced],
            return_dict_in_generate=True,
            pad_token_id=EOS,
            eos_token_id=EOS,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=0,
        )


def test_finished_rows_and_eos_are_in_the_trace_lengths(tiny_llama):
    # Force row 0 to emit EOS at step 2; row 1 runs to the budget.
    class EosAt:
        def __call__(self, input_ids, scores):
            step = input_ids.shape[1] - 3
            if step == 2:
                scores = scores.clone()
                scores[0] = -float("inf")
                scores[0, EOS] = 0.0
            scores[1, EOS] = -float("inf")
            return scores

    monitor = UncertaintyMonitor(ALL, eos_token_id=EOS)
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with torch.inference_mode():
        out = tiny_llama.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            logits_processor=[monitor, EosAt()],
            return_dict_in_generate=True,
            pad_token_id=EOS,
            eos_token_id=EOS,
            do_sample=False,
            max_new_tokens=8,
        )
    trace = monitor.trace(out)
    assert trace.lengths.tolist() == [3, 8]
    assert trace.token_ids[0, 2].item() == EOS
    row0 = trace[0]
    assert row0.signals["entropy"].shape == (1, 3)
    # the EOS step's chosen prob is measured before the forcing processor: finite, not 1
    assert 0 < row0.signals["chosen_prob"][0, 2].item() < 1
    summary = trace.summary()
    assert summary[0]["n_tokens"] == 3 and summary[1]["n_tokens"] == 8
    for row in summary:
        assert all(v == v for v in row.values())  # no NaN


def test_num_return_sequences_rows_follow_sequences(tiny_llama):
    monitor = UncertaintyMonitor(["chosen_logprob", "entropy"], eos_token_id=EOS)
    prompt = torch.tensor([[1, 2, 3], [7, 8, 9]])
    torch.manual_seed(0)
    out = run(tiny_llama, prompt, monitor, do_sample=True, num_return_sequences=3)
    trace = monitor.trace(out)
    assert len(trace) == 6
    generated = out.sequences[:, 3:]
    ref = compute_signals(torch.stack(out.logits, 1), ["chosen_logprob", "entropy"], generated)
    n = trace.lengths
    for i in range(6):
        torch.testing.assert_close(
            trace.signals["chosen_logprob"][i, : n[i]], ref["chosen_logprob"][i, : n[i]]
        )


def test_monitor_is_reusable_across_generate_calls(tiny_llama):
    monitor = UncertaintyMonitor(["entropy"], eos_token_id=EOS, capacity=2)  # forces growth
    first = run(tiny_llama, torch.tensor([[1, 2]]), monitor, do_sample=False, max_new_tokens=9)
    t1 = monitor.trace(first)
    second = run(
        tiny_llama,
        torch.tensor([[5, 6, 7], [8, 9, 10]]),
        monitor,
        do_sample=False,
        max_new_tokens=5,
    )
    t2 = monitor.trace(second)
    assert t1.signals["entropy"].shape == (1, 9)
    assert t2.signals["entropy"].shape == (2, 5)
    with pytest.raises(ValueError, match="output"):
        monitor.trace(first)  # not the last generation


def test_monitor_returns_scores_unchanged(tiny_llama):
    monitor = UncertaintyMonitor(ALL)
    scores = torch.randn(2, 128)
    assert monitor(torch.ones(2, 3, dtype=torch.long), scores) is scores


def test_bf16_model(tiny_llama):
    model = tiny_llama.to(torch.bfloat16)
    monitor = UncertaintyMonitor(ALL, eos_token_id=EOS)
    out = run(model, torch.tensor([[1, 2, 3]]), monitor, do_sample=False)
    trace = monitor.trace(out)
    for value in trace.signals.values():
        assert torch.isfinite(value).all()


def test_invalid_monitor_parameters():
    with pytest.raises(ValueError, match="signals"):
        UncertaintyMonitor(["entropyy"])
    with pytest.raises(ValueError, match="eos_token_id"):
        UncertaintyMonitor(eos_token_id=-3)
    with pytest.raises(ValueError, match="capacity"):
        UncertaintyMonitor(capacity=0)


# --------------------------------------------------------------------------- host sync


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_monitor_call_performs_no_host_synchronisation(device):
    """On ``meta`` any data access (item, tolist, nonzero, printing) raises; on CPU the
    dispatch mode catches scalar reads. Several steps, so growth and chosen-token
    completion are covered."""
    monitor = UncertaintyMonitor(ALL, eos_token_id=[2, 3], capacity=2)
    ids = torch.ones(3, 4, dtype=torch.long, device=device)
    with NoHostSync():
        for _ in range(5):
            scores = torch.randn(3, 9000, device=device)
            monitor(ids, scores)
            ids = torch.cat([ids, ids[:, :1]], dim=1)
    assert monitor._clock.steps == 5


def test_dispatch_guard_catches_item():
    with pytest.raises(AssertionError, match="host synchronisation"):
        with NoHostSync():
            torch.ones(2).sum().item()


class _FakeSamples:
    """A sample source as PerturbedModel exposes it: new [B, M, V] logits per forward."""

    def __init__(self, device):
        self.device = device
        self.forward_count = 0
        self.last_samples = None

    def forward(self, batch):
        self.last_samples = torch.randn(batch, 4, 9000, device=self.device)
        self.forward_count += 1


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_tokur_recording_performs_no_host_synchronisation(device):
    source = _FakeSamples(device)
    monitor = UncertaintyMonitor(["tokur", "chosen_prob"], eos_token_id=2, sample_source=source)
    ids = torch.ones(3, 4, dtype=torch.long, device=device)
    with NoHostSync():
        for _ in range(4):
            source.forward(3)
            monitor(ids, torch.randn(3, 9000, device=device))
            ids = torch.cat([ids, ids[:, :1]], dim=1)
    assert monitor._clock.steps == 4


def test_tokur_recording_refuses_stale_samples():
    source = _FakeSamples("cpu")
    monitor = UncertaintyMonitor(["tokur"], sample_source=source)
    source.forward(2)
    monitor(torch.ones(2, 3, dtype=torch.long), torch.randn(2, 9000))
    with pytest.raises(RuntimeError, match="no perturbed samples"):
        monitor(torch.ones(2, 4, dtype=torch.long), torch.randn(2, 9000))


def test_wrong_shapes_and_beam_search_get_a_clear_error(tiny_llama):
    monitor = UncertaintyMonitor(["entropy"], eos_token_id=127)
    with pytest.raises(ValueError, match=r"scores: expected \[batch, vocab\]"):
        monitor(torch.ones(1, 3, dtype=torch.long), torch.randn(128))
    ids = torch.tensor([[1, 2, 3]])
    out = tiny_llama.generate(
        ids,
        max_new_tokens=4,
        num_beams=2,
        do_sample=False,
        logits_processor=[monitor],
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    with pytest.raises(ValueError, match="beam search"):
        monitor.trace(out)
    with pytest.raises(ValueError, match="beam search"):  # the bare sequences too
        monitor.trace(out.sequences)
    greedy = tiny_llama.generate(  # control: the same monitor, greedy, traces
        ids,
        max_new_tokens=4,
        do_sample=False,
        logits_processor=[monitor],
        return_dict_in_generate=True,
        pad_token_id=0,
    )
    assert monitor.trace(greedy).signals["entropy"].shape[0] == 1


def test_an_empty_signal_list_is_refused():
    with pytest.raises(ValueError, match="signals: at least one"):
        UncertaintyMonitor([])


# --------------------------------------------------------------------------- alternatives


def test_alternatives_equal_a_float64_top_k_of_the_raw_logits(tiny_llama):
    """Each step's top-5 ids and probabilities equal a float64 top-k of the logits the
    token was drawn from; rows keep their own through batching and sampling."""
    monitor = UncertaintyMonitor(["entropy"], eos_token_id=EOS, alternatives=5, capacity=2)
    prompt = torch.tensor([[1, 5, 9, 3], [4, 4, 2, 8]])
    out = run(tiny_llama, prompt, monitor, do_sample=True, temperature=1.5)
    trace = monitor.trace(out)
    logits = torch.stack(out.logits, dim=1).double()  # [B, T, V]
    probs, ids = torch.softmax(logits, dim=-1).topk(5, dim=-1)
    alt = trace.alternatives
    assert alt.ids.shape == (2, logits.shape[1], 5) and alt.tokens is None
    torch.testing.assert_close(alt.probs.double(), probs, atol=1e-6, rtol=1e-5)
    distinct = (probs[..., 1:] - probs[..., :-1]).abs().amin(-1) > 1e-6  # no near-ties
    assert distinct.any()
    assert torch.equal(alt.ids[distinct], ids[distinct])
    # the drawn token is usually, but not always, the most probable: sampling at 1.5
    n = int(trace.lengths[0])
    assert (trace.token_ids[0, :n] != alt.ids[0, :n, 0]).any()
    row = trace.to_dict()["rows"][1]["alternatives"]
    assert len(row["ids"]) == int(trace.lengths[1]) and len(row["probs"][0]) == 5
    assert trace[1].alternatives.ids.shape == (1, int(trace.lengths[1]), 5)
    joined = type(trace).concat([trace[0], trace[1]])
    assert torch.equal(
        joined.alternatives.ids[1, : int(trace.lengths[1])], alt.ids[1, : int(trace.lengths[1])]
    )
    if importlib.util.find_spec("pandas") is not None:  # the experiments extra
        frame = trace.to_pandas()
        assert list(frame["alt_ids"].iloc[0]) == alt.ids[0, 0].tolist()
    first = f"{int(alt.ids[0, 0, 0])}: {float(alt.probs[0, 0, 0]):.3f}"
    assert first in trace._repr_html_()  # the hover text lists the step's alternatives
    assert first not in monitor.trace(out).select([1])._repr_html_()  # control: row 1's


def test_alternatives_of_non_finite_logits_and_bad_k():
    monitor = UncertaintyMonitor(["entropy"], eos_token_id=EOS, alternatives=3)
    scores = torch.tensor([[float("nan"), 1.0, float("inf"), -float("inf"), 0.0]] * 2)
    monitor(torch.ones(2, 3, dtype=torch.long), scores)
    (probs,) = [monitor._buffer.view(1)[f"_alt_prob{j}"] for j in (0,)]
    assert torch.isfinite(probs).all()
    for bad in (-1, 21, 2.0, True):
        with pytest.raises(ValueError, match="alternatives"):
            UncertaintyMonitor(alternatives=bad)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_alternatives_perform_no_host_synchronisation(device):
    monitor = UncertaintyMonitor(["entropy", "chosen_prob"], alternatives=5, capacity=2)
    ids = torch.ones(3, 4, dtype=torch.long, device=device)
    with NoHostSync():
        for _ in range(4):
            monitor(ids, torch.randn(3, 9000, device=device))
            ids = torch.cat([ids, ids[:, :1]], dim=1)
