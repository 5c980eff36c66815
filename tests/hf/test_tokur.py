"""TokUR in transformers: batched samples equal the sequential reference, sigma = 0 is
the clean model, the noise has its law, the cache stays clean, determinism, restoration,
errors, and the embedded model."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tokur_decode.core.perturbation import bases_for, low_rank_basis
from tokur_decode.hf import UncertaintyMonitor, perturbed
from tokur_decode.models import tiny_model

EOS = 127
PROMPTS = torch.tensor([[EOS, EOS, 5, 6, 7], [1, 2, 3, 4, 9]])
MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


def generate(model, monitor=None, max_new_tokens=6, **kw):
    with torch.inference_mode():
        return model.generate(
            input_ids=PROMPTS,
            attention_mask=MASK,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=EOS,
            eos_token_id=EOS,
            logits_processor=[monitor] if monitor else None,
            return_dict_in_generate=True,
            **kw,
        )


def tokur_run(model, tmp_path, **options):
    with perturbed(model, cache_dir=tmp_path, **options) as pm:
        monitor = pm.processor(["tokur", "entropy"], eos_token_id=EOS)
        out = generate(model, monitor)
        return out, monitor.trace(out)


@pytest.fixture(params=["llama", "qwen2"])
def model(request):
    return tiny_model(request.param, vocab_size=128)


def test_batched_equals_sequential_reference_for_the_same_noise(model, tmp_path):
    """Padded batch, Llama and Qwen2 (q/v biases): one forward with M query rows gives
    the numbers of M single-token passes drawing the same eps."""
    opts = dict(samples=5, rank=4, sigma=0.5, seed=1)
    out_b, tr_b = tokur_run(model, tmp_path, mode="batched", **opts)
    out_s, tr_s = tokur_run(model, tmp_path, mode="sequential", **opts)
    assert torch.equal(out_b.sequences, out_s.sequences)
    for key in ("tokur_total", "tokur_aleatoric", "tokur_epistemic", "tokur_reward"):
        torch.testing.assert_close(tr_b.signals[key], tr_s.signals[key], atol=2e-5, rtol=1e-4)
    assert tr_b.signals["tokur_epistemic"].max() > 1e-4  # the noise did something


def test_sigma_zero_is_the_clean_model(model, tmp_path):
    plain = generate(model, output_logits=True)
    with perturbed(model, sigma=0.0, samples=4, rank=2, cache_dir=tmp_path) as pm:
        monitor = pm.processor(["tokur", "entropy"], eos_token_id=EOS)
        out = generate(model, monitor, output_logits=True)
        samples = pm.last_samples
    assert torch.equal(out.sequences, plain.sequences)
    for a, b in zip(out.logits, plain.logits, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(samples, samples[:, :1].expand_as(samples), atol=1e-5, rtol=1e-5)
    trace = monitor.trace(out)
    assert trace.signals["tokur_epistemic"].abs().max() < 1e-6
    torch.testing.assert_close(
        trace.signals["tokur_total"], trace.signals["entropy"], atol=1e-5, rtol=1e-5
    )


def test_one_sample_has_no_epistemic_uncertainty(model, tmp_path):
    _, trace = tokur_run(model, tmp_path, samples=1, rank=2)
    assert torch.all(trace.signals["tokur_epistemic"] == 0)
    torch.testing.assert_close(
        trace.signals["tokur_total"], trace.signals["entropy"], atol=1e-5, rtol=1e-5
    )


def test_first_token_after_prefill_has_its_uncertainty(model, tmp_path):
    _, trace = tokur_run(model, tmp_path, samples=6, rank=4, sigma=0.5)
    assert torch.all(trace.signals["tokur_epistemic"][:, 0] > 0)


def test_noise_has_the_claimed_law(tmp_path):
    """Layer 0's q_proj sees the same x in every copy, so the copies' output deviations
    are draws of sigma ||x|| U_r eps: covariance sigma^2 ||x||^2 U_r U_r^T."""
    model = tiny_model("llama", vocab_size=64, hidden_size=32)
    q_proj = model.model.layers[0].self_attn.q_proj
    seen = {}
    sigma, rank, m = 0.3, 3, 6000
    with (
        perturbed(model, sigma=sigma, rank=rank, samples=m, cache_dir=tmp_path),
        torch.inference_mode(),
    ):
        # registered after the perturbation's hook: sees the perturbed output
        q_proj.register_forward_hook(
            lambda mod, args, out: seen.update(x=args[0][0, -1], y=out[0].clone())
        )
        model.generate(torch.tensor([[1, 2]]), max_new_tokens=1, do_sample=False, pad_token_id=63)
    x, y = seen["x"], seen["y"]
    clean, copies = y[1], y[2:]  # rows: token 0, clean last token, then the m - 1 copies
    dev = (copies - clean).double()
    basis = low_rank_basis(q_proj.weight, rank).double()
    expected = sigma**2 * x.double().norm() ** 2 * basis @ basis.T
    empirical = dev.T @ dev / dev.shape[0]
    assert torch.allclose(
        dev.mean(0), torch.zeros_like(dev[0]), atol=4 * expected.diag().max().sqrt() / m**0.5
    )
    assert (empirical - expected).abs().max() < 0.1 * expected.abs().max()
    # no noise outside the span of U_r
    residual = dev - dev @ basis @ basis.T
    assert residual.abs().max() < 1e-4 * dev.abs().max()


def test_cache_stays_clean(model, tmp_path):
    plain = generate(model)
    with perturbed(model, samples=5, rank=4, sigma=1.0, cache_dir=tmp_path):
        out = generate(model)
    assert torch.equal(out.sequences, plain.sequences)
    for layer_p, layer_o in zip(
        plain.past_key_values.layers, out.past_key_values.layers, strict=True
    ):
        torch.testing.assert_close(layer_o.keys, layer_p.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer_o.values, layer_p.values, atol=1e-5, rtol=1e-5)


def test_same_seed_same_values_other_seed_differs(model, tmp_path):
    _, a = tokur_run(model, tmp_path, samples=4, rank=2, seed=7)
    _, b = tokur_run(model, tmp_path, samples=4, rank=2, seed=7)
    _, c = tokur_run(model, tmp_path, samples=4, rank=2, seed=8)
    assert torch.equal(a.signals["tokur_epistemic"], b.signals["tokur_epistemic"])
    assert not torch.equal(a.signals["tokur_epistemic"], c.signals["tokur_epistemic"])


def test_decode_from_the_sample_mean(model, tmp_path):
    plain = generate(model)
    with perturbed(model, sigma=0.0, samples=3, rank=2, decode="mean", cache_dir=tmp_path):
        assert torch.equal(generate(model).sequences, plain.sequences)
    with perturbed(model, sigma=2.0, samples=3, rank=2, decode="mean", cache_dir=tmp_path) as pm:
        monitor = pm.processor(["tokur"], eos_token_id=EOS)
        out = generate(model, monitor)
    assert monitor.trace(out).signals["tokur_epistemic"].max() > 0


def test_model_is_restored_exactly(model, tmp_path):
    def digest(m):
        h = hashlib.sha256()
        for name, t in sorted(m.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    before, logits_before = digest(model), model(PROMPTS).logits
    with perturbed(model, sigma=1.0, samples=3, rank=2, cache_dir=tmp_path):
        generate(model)
    assert digest(model) == before
    assert "forward" not in vars(model)
    assert not any(mod._forward_hooks for mod in model.modules())
    torch.testing.assert_close(model(PROMPTS).logits, logits_before, atol=0, rtol=0)


def test_bases_are_cached_as_safetensors_keyed_by_weights(tmp_path):
    model = tiny_model("llama", vocab_size=64)
    weights = {n: m.weight for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    first = bases_for(weights, 4, cache=tmp_path)
    files = list((tmp_path / "tokur-bases").glob("*.safetensors"))
    assert len(files) == 1 and not list((tmp_path / "tokur-bases").glob("*.pkl"))
    again = bases_for(weights, 4, cache=tmp_path)
    for name in first:
        assert torch.equal(first[name], again[name])
    other = tiny_model("llama", vocab_size=64, seed=1)
    bases_for(
        {n: m.weight for n, m in other.named_modules() if n.endswith("q_proj")}, 4, cache=tmp_path
    )
    assert len(list((tmp_path / "tokur-bases").glob("*.safetensors"))) == 2


def test_monitor_records_all_signals_with_tokur(model, tmp_path):
    with perturbed(model, samples=3, rank=2, cache_dir=tmp_path) as pm:
        monitor = pm.processor(["all", "tokur"], eos_token_id=EOS)
        out = generate(model, monitor)
    trace = monitor.trace(out)
    assert {"entropy", "logtoku_epistemic", "tokur_total", "tokur_reward"} <= set(trace.signals)
    summary = trace.summary()[0]
    assert summary["sum_tokur_total"] == pytest.approx(
        float(trace.signals["tokur_total"][0].sum()), rel=1e-5
    )


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"rank": 0}, "rank"),
        ({"rank": 10_000}, "rank"),
        ({"sigma": -0.1}, "sigma"),
        ({"samples": 0}, "samples"),
        ({"target_modules": ("nope_proj",)}, "target_modules"),
        (
            {"target_modules": ("q_proj", "nope")},
            r"target_modules: no linear layer named \['nope'\]",
        ),
        ({"direction": "up"}, "direction"),
        ({"decode": "median"}, "decode"),
        ({"mode": "parallel"}, "mode"),
    ],
)
def test_invalid_options_raise_value_error(kwargs, param, tmp_path):
    with pytest.raises(ValueError, match=param):
        perturbed(tiny_model("llama", vocab_size=64), cache_dir=tmp_path, **kwargs)


def test_tokur_signal_without_samples_is_refused():
    with pytest.raises(ValueError, match="tokur"):
        UncertaintyMonitor(["tokur"])


def test_left_direction_runs_and_matches_sequential(tmp_path):
    model = tiny_model("qwen2", vocab_size=128)
    opts = dict(samples=4, rank=3, sigma=0.5, direction="left")
    _, a = tokur_run(model, tmp_path, mode="batched", **opts)
    _, b = tokur_run(model, tmp_path, mode="sequential", **opts)
    torch.testing.assert_close(
        a.signals["tokur_epistemic"], b.signals["tokur_epistemic"], atol=2e-5, rtol=1e-4
    )


@pytest.mark.slow
def test_embedded_model(embedded, tmp_path):
    from tokur_decode.hf import generate as monitored_generate

    model, tokenizer = embedded
    plain = monitored_generate(
        model, tokenizer, "What is the capital of France?", max_new_tokens=12
    )
    result = monitored_generate(
        model,
        tokenizer,
        "What is the capital of France?",
        max_new_tokens=12,
        signals=["chosen_prob", "tokur"],
        tokur={"samples": 10},
    )
    assert result.texts == plain.texts and "Paris" in result.texts[0]
    trace = result.trace
    for key in ("tokur_total", "tokur_aleatoric", "tokur_epistemic", "tokur_reward"):
        values = trace.signals[key]
        assert torch.isfinite(values).all() and (values >= 0).all(), key
    assert trace.signals["tokur_epistemic"][0, 0] > 0  # the first token has its uncertainty
    assert trace.summary()[0]["sum_tokur_epistemic"] > 0
