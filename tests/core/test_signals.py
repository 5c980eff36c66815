"""Signal formulas against an independent float64 reference (numpy/scipy), edge cases,
and hypothesis invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import digamma, logsumexp

from tokur_decode.core import logit_stats
from tokur_decode.core import signals as S


@pytest.fixture(autouse=True, params=["compiled", "op-by-op"])
def signal_pass(request, monkeypatch):
    """Every test here runs on both paths of the one read of the logits: compiled (also
    for inputs smaller than it takes in use) and op by op (the fallback). The compiled
    path must not have fallen back (it would have turned itself off, with a warning)."""
    compiled = request.param == "compiled"
    monkeypatch.setattr(logit_stats.compilation, "enabled", compiled)
    if compiled:
        monkeypatch.setattr(logit_stats, "COMPILE_MIN_ELEMENTS", 0)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        yield request.param
    assert logit_stats.compilation.enabled == compiled


# --------------------------------------------------------------------------- reference


def ref_row(z: np.ndarray, chosen: int, k_dc: int = 20, k_lt: int = 2) -> dict[str, float]:
    """Float64 reference for one row of finite-or-(-inf) logits with >= 1 finite entry."""
    z = z.astype(np.float64)
    fin = np.isfinite(z)
    lp = np.full_like(z, -np.inf)
    lp[fin] = z[fin] - logsumexp(z[fin])
    p = np.exp(lp)
    h = -np.sum(p[fin] * lp[fin])
    order = np.argsort(-lp, kind="stable")
    top = lp[order]
    floor = math.log(np.finfo(np.float32).tiny)
    alpha = np.maximum(np.where(np.isfinite(z[order][:k_lt]), z[order][:k_lt], 0.0), 0.0)
    a0 = alpha.sum()
    au = 0.0 if a0 == 0 else -np.sum(alpha / a0 * (digamma(alpha + 1) - digamma(a0 + 1)))
    eu = k_lt / (a0 + k_lt)  # candidates beyond V have zero evidence
    n_fin = fin.sum()
    return {
        "max_prob": float(p.max()),
        "chosen_prob": float(p[chosen]),
        "chosen_logprob": float(max(lp[chosen], floor)),
        "margin": float(p[order[0]] - (p[order[1]] if len(z) > 1 else 0.0)),
        "entropy": float(h),
        "varentropy": float(np.sum(p[fin] * (lp[fin] + h) ** 2)),
        "self_certainty": float(-math.log(n_fin) - lp[fin].mean()),
        "deepconf": float(-np.mean(np.maximum(top[:k_dc], floor))),
        "logtoku_aleatoric": float(au),
        "logtoku_epistemic": float(eu),
        "logtoku_unreliability": float(au * eu),
    }


def ref_bayes(zs: np.ndarray, y: int) -> dict[str, float]:
    """Float64 reference of TokUR's decomposition for [M, V] finite logits."""
    lp = zs - logsumexp(zs, axis=-1, keepdims=True)
    p = np.exp(lp)
    pbar = p.mean(axis=0)
    tu = -np.sum(pbar * np.log(pbar))
    au = np.mean(-np.sum(p * lp, axis=-1))
    return {
        "total": tu,
        "aleatoric": au,
        "epistemic": tu - au,
        "reward": math.log(pbar[y]) - lp[:, y].mean(),
    }


def check_against_reference(logits: torch.Tensor, chosen: torch.Tensor, atol=2e-4, rtol=2e-4):
    out = S.compute_signals(logits, "all", chosen)
    z64 = logits.double().numpy()
    for i in range(logits.shape[0]):
        ref = ref_row(z64[i], int(chosen[i]))
        for key, want in ref.items():
            got = float(out[key][i])
            assert math.isclose(got, want, rel_tol=rtol, abs_tol=atol), (key, i, got, want)


# --------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("scale", [1e-4, 1.0, 5.0, 30.0])
@pytest.mark.parametrize("vocab", [1, 2, 3, 50, 9000])
def test_formulas_match_float64_reference(scale, vocab):
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(4, vocab, generator=gen) * scale
    chosen = torch.randint(0, vocab, (4,), generator=gen)
    check_against_reference(logits, chosen)


def test_large_vocab_two_stage_topk_matches_reference():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 49152 + 17, generator=gen) * 4  # not a multiple of the chunk
    logits[1, -5:] = 30.0  # the top entries in the padded last chunk
    chosen = torch.tensor([0, 49152 + 16, 5])
    check_against_reference(logits, chosen)
    stats = logit_stats.read_logits(logits, top=20)
    top_v, top_i = stats.top_logits, stats.top_ids
    ref_v, _ = torch.topk(logits, 20)
    torch.testing.assert_close(top_v, ref_v)
    torch.testing.assert_close(logits.gather(-1, top_i), ref_v)


def test_masked_entries_match_reference_on_finite_support():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 300, generator=gen) * 3
    logits[0, 10:] = -math.inf  # top-k / grammar style masks
    logits[1, ::2] = -math.inf
    logits[2, 1:] = -math.inf  # one allowed token
    logits[3, :299] = -math.inf
    chosen = torch.tensor([3, 1, 0, 299, 7])
    check_against_reference(logits, chosen)


def test_ties_are_handled():
    logits = torch.tensor([[1.0, 1.0, 1.0, 0.0], [2.0, 2.0, -1.0, -1.0]])
    out = S.compute_signals(logits, ["margin", "max_prob", "logtoku"])
    assert out["margin"].tolist() == [0.0, 0.0]
    check_against_reference(logits, torch.tensor([0, 1]))


def test_logtoku_matches_hand_computed_example():
    # alpha = (2, 1): AU = -(2/3 (psi(3) - psi(4)) + 1/3 (psi(2) - psi(4))) = 1/2, EU = 2/5
    out = S.logtoku(torch.tensor([2.0, 1.0, 0.0, -3.0]))
    assert out["aleatoric"].item() == pytest.approx(0.5, abs=1e-6)
    assert out["epistemic"].item() == pytest.approx(0.4, abs=1e-6)
    assert out["unreliability"].item() == pytest.approx(0.2, abs=1e-6)


def test_logtoku_zero_evidence_limit():
    out = S.logtoku(torch.tensor([[-1.0, -2.0, -3.0], [0.0, 0.0, 0.0]]))
    assert out["aleatoric"].tolist() == [0.0, 0.0]
    assert out["epistemic"].tolist() == [1.0, 1.0]


def test_logtoku_shifted_evidence_is_shift_invariant_and_nondegenerate():
    z = torch.randn(6, 100) - 50.0  # all-negative logits (GPT-2 style)
    faithful = S.logtoku(z)
    shifted = S.logtoku(z, evidence="shifted")
    assert torch.all(faithful["epistemic"] == 1.0)  # degenerate under ReLU evidence
    assert torch.all(shifted["epistemic"] < 1.0)
    moved = S.logtoku(z + 37.0, evidence="shifted")
    torch.testing.assert_close(moved["epistemic"], shifted["epistemic"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_equal_their_float32_upcast(dtype):
    logits = (torch.randn(4, 1000) * 4).to(dtype)
    chosen = torch.randint(0, 1000, (4,))
    low = S.compute_signals(logits, "all", chosen)
    ref = S.compute_signals(logits.float(), "all", chosen)
    for key in ref:
        assert low[key].dtype == torch.float32
        torch.testing.assert_close(low[key], ref[key])


def test_float64_input_is_computed_in_float64():
    logits = torch.randn(2, 500, dtype=torch.float64) * 3
    chosen = torch.tensor([1, 2])
    check_against_reference(logits, chosen, atol=1e-6, rtol=1e-6)


def test_huge_and_tiny_scales_stay_finite():
    logits = torch.randn(3, 200) * 1e6
    out = S.compute_signals(logits, "all", torch.zeros(3, dtype=torch.long))
    for key, value in out.items():
        assert torch.isfinite(value).all(), key
    assert torch.allclose(out["max_prob"], torch.ones(3))
    tiny = S.compute_signals(torch.randn(3, 200) * 1e-30, ["entropy", "max_prob"])
    assert torch.allclose(tiny["entropy"], torch.full((3,), math.log(200)))


def test_non_finite_conventions():
    nan, inf = math.nan, math.inf
    logits = torch.tensor(
        [
            [nan, 1.0, -inf, 1.0],  # NaN is masked: uniform over the two 1.0
            [inf, inf, 1.0, 0.0],  # +inf: uniform over the +inf entries
            [-inf, -inf, -inf, -inf],  # nothing finite: uniform
            [nan, nan, nan, nan],
        ]
    )
    out = S.compute_signals(logits, "all", torch.tensor([1, 0, 3, 2]))
    for key, value in out.items():
        assert not torch.isnan(value).any(), key
        assert torch.isfinite(value).all(), key
    assert out["entropy"].tolist() == pytest.approx(
        [math.log(2), math.log(2), math.log(4), math.log(4)]
    )
    assert out["max_prob"].tolist() == pytest.approx([0.5, 0.5, 0.25, 0.25])
    # KL(U || p) is +inf in the limit when p puts no mass on finite entries: huge, finite.
    assert out["self_certainty"][[0, 2, 3]].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert out["self_certainty"][1].item() > 1e30
    # +inf is infinite evidence: no epistemic uncertainty left.
    assert out["logtoku_epistemic"][1].item() < 1e-30
    # no finite logit: zero evidence.
    assert out["logtoku_epistemic"][2:].tolist() == [1.0, 1.0]


def test_outputs_are_float32_on_input_device_with_leading_shape():
    logits = torch.randn(2, 3, 40)
    out = S.compute_signals(logits, "all", torch.zeros(2, 3, dtype=torch.long))
    for value in out.values():
        assert value.shape == (2, 3) and value.dtype == torch.float32


def test_public_single_signal_functions_agree_with_fused_pass():
    logits = torch.randn(3, 70)
    fused = S.compute_signals(logits, "all", torch.tensor([1, 2, 3]), deepconf_k=7)
    torch.testing.assert_close(S.entropy(logits), fused["entropy"])
    torch.testing.assert_close(S.varentropy(logits), fused["varentropy"])
    torch.testing.assert_close(S.max_prob(logits), fused["max_prob"])
    torch.testing.assert_close(S.margin(logits), fused["margin"])
    torch.testing.assert_close(S.self_certainty(logits), fused["self_certainty"])
    torch.testing.assert_close(S.deepconf_confidence(logits, k=7), fused["deepconf"])
    torch.testing.assert_close(
        S.chosen_logprob(logits, torch.tensor([1, 2, 3])), fused["chosen_logprob"]
    )
    torch.testing.assert_close(S.logtoku(logits)["epistemic"], fused["logtoku_epistemic"])


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"signals": ["entropy", "nope"]}, "signals"),
        ({"signals": []}, "signals"),
        ({"signals": ["deepconf"], "deepconf_k": 0}, "deepconf_k"),
        ({"signals": ["logtoku"], "logtoku_k": -1}, "logtoku_k"),
        ({"signals": ["logtoku"], "logtoku_k": 2.5}, "logtoku_k"),
        ({"signals": ["logtoku"], "logtoku_evidence": "softplus"}, "logtoku_evidence"),
    ],
)
def test_invalid_parameters_raise_value_error_naming_them(kwargs, param):
    kwargs = dict(kwargs)
    signals = kwargs.pop("signals")
    with pytest.raises(ValueError, match=param):
        S.SignalSpec(signals, **kwargs)


def test_chosen_signals_require_token_ids():
    with pytest.raises(ValueError, match="token_ids"):
        S.compute_signals(torch.randn(2, 5), ["chosen_prob"])


# --------------------------------------------------------------------------- TokUR


def test_bayesian_decomposition_matches_float64_reference():
    gen = torch.Generator().manual_seed(3)
    zs = torch.randn(4, 10, 500, generator=gen) * 2
    y = torch.randint(0, 500, (4,), generator=gen)
    out = S.bayesian_decomposition(zs, y)
    for i in range(4):
        ref = ref_bayes(zs[i].double().numpy(), int(y[i]))
        for key, want in ref.items():
            assert float(out[key][i]) == pytest.approx(want, abs=2e-5, rel=1e-4), key


def test_bayesian_decomposition_identical_samples_have_no_epistemic():
    z = torch.randn(3, 1, 64).expand(3, 10, 64)
    out = S.bayesian_decomposition(z, torch.tensor([0, 1, 2]))
    assert torch.all(out["epistemic"] == 0.0)
    assert torch.all(out["reward"] == 0.0)
    torch.testing.assert_close(out["total"], S.entropy(z[:, 0]))


def test_bayesian_decomposition_bf16_never_negative():
    zs = (torch.randn(8, 10, 2000) * 0.01 + torch.randn(8, 1, 2000) * 5).bfloat16()
    out = S.bayesian_decomposition(zs, torch.zeros(8, dtype=torch.long))
    assert torch.all(out["epistemic"] >= 0) and torch.all(out["reward"] >= 0)


# --------------------------------------------------------------------------- invariants

finite_logits = st.integers(1, 40).flatmap(
    lambda v: arrays(np.float32, (3, v), elements=st.floats(-60, 60, width=32))
)


@st.composite
def masked_logits(draw):
    arr = draw(finite_logits)
    mask = draw(arrays(np.bool_, arr.shape))
    mask[:, 0] = False  # keep one finite entry per row
    arr = arr.copy()
    arr[mask] = -np.inf
    return torch.from_numpy(arr)


@settings(max_examples=150, deadline=None)
@given(masked_logits())
def test_invariants_of_token_signals(logits):
    v = logits.shape[-1]
    out = S.compute_signals(logits, "all", torch.zeros(3, dtype=torch.long))
    for value in out.values():
        assert torch.isfinite(value).all()
    n_finite = torch.isfinite(logits).sum(-1).float()
    assert torch.all(out["entropy"] >= 0)
    assert torch.all(out["entropy"] <= torch.log(n_finite) + 1e-4)
    assert torch.all(out["varentropy"] >= 0)
    assert torch.all(out["self_certainty"] >= 0)
    assert torch.all((out["max_prob"] > 0) & (out["max_prob"] <= 1 + 1e-6))
    assert torch.all((out["margin"] >= 0) & (out["margin"] <= out["max_prob"] + 1e-6))
    assert torch.all(out["deepconf"] >= 0)
    assert torch.all(out["logtoku_aleatoric"] >= 0)
    assert torch.all((out["logtoku_epistemic"] > 0) & (out["logtoku_epistemic"] <= 1))
    assert torch.all(out["logtoku_unreliability"] >= 0)
    assert torch.all(out["chosen_prob"] <= out["max_prob"] + 1e-6)
    assert v >= 1


@settings(max_examples=100, deadline=None)
@given(masked_logits(), st.floats(-1e3, 1e3))
def test_softmax_signals_are_invariant_to_adding_a_constant(logits, c):
    names = ["entropy", "varentropy", "max_prob", "margin", "self_certainty", "deepconf"]
    a = S.compute_signals(logits.double(), names)
    b = S.compute_signals(logits.double() + c, names)
    for key in names:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-4)


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda m: arrays(np.float32, (2, m, 12), elements=st.floats(-30, 30, width=32))
    )
)
def test_invariants_of_bayesian_decomposition(arr):
    out = S.bayesian_decomposition(torch.from_numpy(arr), torch.tensor([0, 5]))
    assert torch.all(out["epistemic"] >= 0)
    assert torch.all(out["aleatoric"] >= 0)
    assert torch.all(out["reward"] >= 0)
    torch.testing.assert_close(out["total"], out["aleatoric"] + out["epistemic"])
    assert torch.all(out["total"] <= math.log(12) + 1e-4)


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float32, (2, 9), elements=st.sampled_from([np.nan, np.inf, -np.inf, 0.0, 3.0, -2.0]))
)
def test_no_nan_for_any_mixture_of_non_finite_logits(arr):
    out = S.compute_signals(torch.from_numpy(arr), "all", torch.tensor([0, 8]))
    for key, value in out.items():
        assert not torch.isnan(value).any(), key
    samples = torch.from_numpy(arr).unsqueeze(0).expand(3, 2, 9).transpose(0, 1)
    for key, value in S.bayesian_decomposition(samples, torch.tensor([0, 8])).items():
        assert not torch.isnan(value).any(), key


def test_workspace_gives_the_same_signals_and_reuses_its_memory():
    """Calls with one workspace, shrinking and growing rows, dtypes and non-finite rows
    in between, give exactly what fresh allocations give; the kept logits live in the
    workspace."""
    spec = S.SignalSpec(list(S.SIGNALS))
    ws = S.Workspace()
    g = torch.Generator().manual_seed(3)
    seen = set()
    for rows, dtype in [(4, torch.float32), (2, torch.float32), (6, torch.bfloat16), (3, None)]:
        logits = torch.randn(rows, 300, generator=g) * 4
        logits[0, :7] = -math.inf
        logits[-1, 5] = math.nan
        if dtype is None:  # a row with +inf and a fully masked one
            logits[1, 2] = math.inf
            logits[2] = -math.inf
        else:
            logits = logits.to(dtype)
        tokens = torch.randint(0, 300, (rows,), generator=g)
        want, want_stats = spec.compute(logits, tokens, keep=True)
        got, got_stats = spec.compute(logits, tokens, keep=True, workspace=ws)
        for name in want:
            assert torch.equal(got[name], want[name]), name
        assert torch.equal(got_stats.logits, want_stats.logits)
        seen.add(got_stats.logits.untyped_storage().data_ptr())
    assert len(seen) <= 2  # grown once (4 -> 6 rows), never allocated per call otherwise


def test_inputs_of_the_wrong_kind_are_refused_naming_them():
    import numpy as np

    with pytest.raises(TypeError, match="logits: expected a torch.Tensor, got ndarray"):
        S.entropy(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"token_ids: must be in \[0, 4\)"):
        S.compute_signals(torch.zeros(2, 4), ["chosen_prob"], torch.tensor([1, 4]))
    with pytest.raises(ValueError, match=r"token_ids: must be in \[0, 4\)"):
        S.compute_signals(torch.zeros(2, 4), ["chosen_prob"], torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="signals: a list of names or a comma-separated"):
        S.SignalSpec(5)
    out = S.compute_signals(torch.zeros(2, 4), ["chosen_prob"], torch.tensor([0, 3]))  # control
    assert torch.allclose(out["chosen_prob"], torch.full((2,), 0.25))
