"""The one read of a step's logits: compiled where it pays, the same numbers op by op, and
a fallback that keeps working where the compiler does not. (The signals computed from it
are checked against a float64 reference, on both paths, in test_signals.py.)"""

from __future__ import annotations

import math

import pytest
import torch

from tokur_decode.core import logit_stats as L
from tokur_decode.core import signals as S


def real_shaped_logits(vocab: int = 49152 + 17) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(16, vocab, generator=gen) * 3
    logits[0, :100] = -math.inf  # a grammar's mask
    logits[1, 7] = math.inf
    logits[2] = -math.inf  # nothing allowed
    logits[3, -3:] = 40.0  # the top in the last, shorter chunk
    logits[4, 11] = math.nan
    return logits


def test_the_compiled_read_gives_the_op_by_op_numbers(monkeypatch):
    logits = real_shaped_logits()
    tokens = torch.arange(16) * 3000
    assert L.compiles(logits)
    spec = S.SignalSpec(list(S.SIGNALS))
    got, got_read = spec.compute(logits, tokens, top=20, keep=True)
    monkeypatch.setattr(L.compilation, "enabled", False)
    want, want_read = spec.compute(logits, tokens, top=20, keep=True)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)
    assert torch.equal(got_read.logits, want_read.logits)  # the kept copy: elementwise
    torch.testing.assert_close(got_read.top_logits, want_read.top_logits)
    assert torch.equal(got_read.top_logits, torch.topk(want_read.logits, 20).values)
    assert L.compilation.enabled is False  # control: the second read really was op by op


def test_what_is_compiled():
    big = torch.zeros(2, 49152)
    assert L.compiles(big)
    assert not L.compiles(big.double())  # offline analysis: op by op
    assert not L.compiles(torch.zeros(2, 100))  # below one chunk per row
    assert not L.compiles(torch.zeros(1, 4096))  # too small to pay for a compiled call


def test_a_failed_compilation_falls_back_op_by_op_with_one_warning(monkeypatch):
    def broken(fn, **kwargs):
        def call(*args):
            raise RuntimeError("no C++ compiler")

        return call

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(L.compilation, "enabled", True)
    read = L.Compiled(L.row_fields)
    logits = real_shaped_logits()[:2]
    with pytest.warns(RuntimeWarning, match="torch.compile of the signal pass failed.*no C"):
        got = read(logits, None, 5)
    assert L.compilation.enabled is False
    want = L.row_fields(logits, None, 5)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("value", "enabled"), [("0", False), ("", False), ("1", True)])
def test_the_environment_turns_compilation_off(monkeypatch, value, enabled):
    monkeypatch.setenv("TOKUR_DECODE_COMPILE", value)
    assert L._Compilation().enabled is enabled


def test_the_kept_copy_gives_the_chosen_token_after_the_logits_change():
    """A processor learns the emitted token at the next step, when the engine has edited
    the logits in place (temperature, other processors): the kept copy has the ones read."""
    logits = real_shaped_logits()[:4].clone()
    read = L.read_logits(logits, keep=True)
    want = torch.log_softmax(torch.nan_to_num(logits[3], nan=-math.inf), dim=-1)[-1]
    logits.div_(0.01)  # what vLLM's sampler does in place
    got = read.logprob_of(torch.tensor([0, 0, 0, logits.shape[-1] - 1]))[3]
    assert got == pytest.approx(float(want), abs=1e-5)
    unkept = L.read_logits(logits)  # control: the live tensor is what a reference reads
    assert unkept.logits is not None and unkept.logits.data_ptr() == logits.data_ptr()


def test_the_compiled_sample_decomposition_gives_the_op_by_op_numbers(monkeypatch):
    samples = real_shaped_logits()[:12].reshape(3, 4, -1)  # [R, M, V], masks included
    tokens = torch.tensor([5, 7, 9])
    assert L.compiles(samples)
    got = S.bayesian_decomposition(samples, tokens)
    monkeypatch.setattr(L.compilation, "enabled", False)
    want = S.bayesian_decomposition(samples, tokens)
    for name in want:  # float32 sums of 49k terms in another order: rounding of 1e-5
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-4, msg=name)
    assert L.compilation.enabled is False
