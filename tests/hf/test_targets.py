"""Where TokUR's noise goes in transformers: separate and fused q/k/v projections, dense
and quantised weights (tokur_decode/hf/targets.py)."""

from __future__ import annotations

import pytest
import torch

from tokur_decode.core.perturbation import PerturbationConfig, low_rank_basis
from tokur_decode.hf import perturbed
from tokur_decode.hf.targets import dense_weight, find_targets
from tokur_decode.models import tiny_model

EOS = 255


def tiny_phi3():
    """A random-weight Phi-3: q, k and v in one fused ``qkv_proj``."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=EOS,
        eos_token_id=EOS,
    )
    torch.manual_seed(0)
    return Phi3ForCausalLM(config).eval()


def test_a_fused_qkv_projection_gives_its_q_and_v_slices():
    model = tiny_phi3()
    targets = find_targets(model, PerturbationConfig(rank=4))
    assert [(t.name, t.out) for t in targets[:2]] == [
        ("model.layers.0.self_attn.q_proj", slice(0, 64)),
        ("model.layers.0.self_attn.v_proj", slice(96, 128)),  # after q (64) and k (32)
    ]
    fused = model.model.layers[0].self_attn.qkv_proj.weight
    torch.testing.assert_close(targets[1].weight(), fused[96:128], rtol=0, atol=0)


def test_the_noise_lands_on_the_q_and_v_slices_only(tmp_path):
    model = tiny_phi3()
    layer = model.model.layers[0].self_attn.qkv_proj
    seen = []
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with perturbed(model, samples=3, rank=4, sigma=1.0, cache_dir=tmp_path):
        # after TokUR's hooks: the output once the noise is on it
        hook = layer.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
        try:
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=EOS)
        finally:
            hook.remove()
    step = seen[-1][0]  # the last step: the clean token, then its 2 perturbed copies
    clean, copies = step[:1], step[1:]
    assert torch.equal(copies[:, 64:96], clean[:, 64:96].expand_as(copies[:, 64:96]))  # k
    assert (copies[:, :64] - clean[:, :64]).abs().max() > 1e-3  # q moved
    assert (copies[:, 96:] - clean[:, 96:]).abs().max() > 1e-3  # v moved


def test_a_rank_beyond_the_models_projections_is_refused_naming_the_bound():
    """``--tokur-rank 100000000`` on a model whose smallest target has 32 rows: the bound
    comes from the model, and the message says it (and which setting)."""
    model = tiny_phi3()
    with pytest.raises(ValueError, match=r"tokur: rank at most 32 for this model .* got 33$"):
        find_targets(model, PerturbationConfig(rank=33))
    assert len(find_targets(model, PerturbationConfig(rank=32))) > 0  # the bound itself is fine


def test_a_projection_stored_in_an_unknown_integer_format_is_refused_by_name():
    model = tiny_model("llama", vocab_size=256)
    q = model.model.layers[0].self_attn.q_proj
    q.weight = torch.nn.Parameter(q.weight.data.to(torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match=r"target_modules: model\.layers\.0\.self_attn\.q_proj is"):
        perturbed(model, rank=4)
    assert dense_weight(model.model.layers[0].self_attn.v_proj).dtype == torch.float32  # control


@pytest.fixture(scope="module")
def nf4_model(tmp_path_factory):
    """A tiny Llama loaded in bitsandbytes 4-bit NF4 (float32 compute) on CPU."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = tmp_path_factory.mktemp("nf4")
    tiny_model("llama", vocab_size=256).save_pretrained(folder)
    quantized = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantized, device_map="cpu"
    ).eval()


def _run(model, cache_dir, **options):
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with perturbed(model, samples=4, rank=4, cache_dir=cache_dir, **options) as pm:
        monitor = pm.processor(["tokur", "margin"], eos_token_id=EOS)
        with torch.inference_mode():
            out = model.generate(
                ids,
                max_new_tokens=6,
                min_new_tokens=6,
                do_sample=False,
                pad_token_id=EOS,
                logits_processor=[monitor],
                return_dict_in_generate=True,
            )
        return out.sequences[0, ids.shape[1] :], monitor.trace(out), pm


def test_a_4bit_model_runs_tokur_with_bases_from_its_dequantised_weights(nf4_model, tmp_path):
    import bitsandbytes.functional as bnbf

    q = nf4_model.model.layers[0].self_attn.q_proj
    assert q.weight.dtype == torch.uint8  # really stored in 4 bits
    if not getattr(q.weight.quant_state, "packing_format_for_cpu", False):  # not yet repacked
        dense = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state).float()
        # bitsandbytes' own dequantisation rounds to bfloat16; the layer computes in float32
        torch.testing.assert_close(dense_weight(q), dense, rtol=0, atol=1e-3)
    tokens, trace, pm = _run(nf4_model, tmp_path, sigma=0.5)
    dense = dense_weight(q)  # the same after bitsandbytes repacked it for its CPU kernel
    x = torch.randn(3, q.in_features)
    with torch.no_grad():  # W x, to the kernel's rounding (it computes in bfloat16)
        assert ((x @ dense.T - q(x)).norm() / q(x).norm()) < 1e-2
    expected = low_rank_basis(dense.double(), 4)
    basis = pm.bases["model.layers.0.self_attn.q_proj"]
    # singular vectors up to sign, from float32 and float64 SVDs of the same matrix
    torch.testing.assert_close(basis.abs(), expected.float().abs(), atol=1e-4, rtol=0)
    eu = trace.signals["tokur_epistemic"][0]
    assert torch.isfinite(eu).all() and eu.max() > 1e-4


def test_a_4bit_model_at_sigma_zero_has_no_epistemic_uncertainty(nf4_model, tmp_path):
    from ..helpers import agreeing_steps

    tokens, trace, _ = _run(nf4_model, tmp_path, sigma=0.0)
    assert trace.signals["tokur_epistemic"].abs().max() < 1e-6
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.inference_mode():
        plain = nf4_model.generate(
            ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=EOS
        )[0, ids.shape[1] :]
    # bitsandbytes computes one token (decoding) and several (TokUR's batched rows) by
    # different kernels: the tokens agree up to a near tie
    assert agreeing_steps(tokens, plain, trace.signals["margin"][0]) >= 1
