"""Random-weight models of the architectures TokUR supports, from small configs.

Each entry is a transformers config (real layer layout: q/k norms, biases, soft-capping,
sliding windows, fused projections, MoE feed-forwards) at reduced width and depth, with
the embedded model's tokenizer and vocabulary. :func:`build` writes one as a model
folder that transformers and vLLM both load (no download).
"""

from __future__ import annotations

from pathlib import Path

import torch

#: The embedded tokenizer's vocabulary (SmolLM2): the models answer its token ids.
VOCAB = 49152
_COMMON = {
    "vocab_size": VOCAB,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

#: architecture -> (transformers config class, what the config adds to the common part)
ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "LlamaForCausalLM": (
        "LlamaConfig",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            }
        },
    ),
    "MistralForCausalLM": ("MistralConfig", {"sliding_window": None, "head_dim": 32}),
    "Qwen2ForCausalLM": ("Qwen2Config", {}),
    "Qwen3ForCausalLM": ("Qwen3Config", {"head_dim": 64}),
    "Qwen3MoeForCausalLM": (
        "Qwen3MoeConfig",
        {
            "head_dim": 32,
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
    ),
    # Gemma ties its embeddings (vLLM's Gemma classes have no lm_head)
    "Gemma2ForCausalLM": (
        "Gemma2Config",
        {
            "tie_word_embeddings": True,
            "head_dim": 64,
            "sliding_window": 8,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 64,
        },
    ),
    "Gemma3ForCausalLM": (
        "Gemma3TextConfig",
        {
            "tie_word_embeddings": True,
            "head_dim": 64,
            "sliding_window": 8,
            "query_pre_attn_scalar": 64,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "Phi3ForCausalLM": ("Phi3Config", {"sliding_window": None}),
}


def config_of(architecture: str):
    import transformers

    name, extra = ARCHITECTURES[architecture]
    config = getattr(transformers, name)(**(_COMMON | extra))
    config.architectures = [architecture]
    return config


def build(architecture: str, folder: Path, tokenizer_folder: Path, seed: int = 0) -> Path:
    """Write a random-weight ``architecture`` model with the tokenizer of
    ``tokenizer_folder`` into ``folder`` (kept when it exists)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (folder / "config.json").is_file():
        return folder
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config_of(architecture), dtype=torch.float32)
        for p in model.parameters():  # larger weights than the init's: peaked distributions
            p.data.normal_(0.0, 0.2) if p.dim() > 1 else None
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(folder)
    return folder
