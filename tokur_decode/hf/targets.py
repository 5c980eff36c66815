"""Where TokUR's noise goes in a transformers model: the q / k / v projections of every
attention block, separate layers or slices of a fused one, dense or quantised weights.

A :class:`Target` is one perturbed projection: its name (``model.layers.3.self_attn.
q_proj``, the same whatever the layout, so that the SVD bases cache and vLLM's TokUR
share them), the linear layer that computes it, and the slice of that layer's output
features that is the projection (all of them for a separate ``q_proj``; the first
``heads x head_dim`` of a fused ``qkv_proj``, as in Phi-3 and Phi-4).

The SVD bases come from the projection's weight, dequantised once where it is stored
quantised (:func:`dense_weight`: the layer run on the identity matrix, so any format
whose layer computes ``W x``: bitsandbytes 4-bit and 8-bit, GPTQ, AWQ, ...); the noise
is added to the layer's output as for a dense layer. A layer that cannot be run that way
is refused by name.

Example:
    >>> from tokur_decode.core.perturbation import PerturbationConfig
    >>> from tokur_decode.models import tiny_model
    >>> targets = find_targets(tiny_model("llama"), PerturbationConfig(rank=4))
    >>> [(t.name, t.size) for t in targets[:2]]
    [('model.layers.0.self_attn.q_proj', 64), ('model.layers.0.self_attn.v_proj', 32)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["FUSED", "Target", "dense_weight", "find_targets"]

#: Fused projections and the separate ones they hold, in their output order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}


@dataclass(frozen=True, eq=False)
class Target:
    """One perturbed projection: ``module``'s output features ``out``."""

    name: str
    module: torch.nn.Module
    out: slice

    @property
    def size(self) -> int:
        """The projection's output features."""
        return self.out.stop - self.out.start

    def weight(self, dtype=None) -> torch.Tensor:
        """The projection's dense weight ``[size, in_features]`` (see
        :func:`dense_weight`)."""
        return dense_weight(self.module, self.name, dtype)[self.out]


def find_targets(model, config) -> list[Target]:
    """The projections named in ``config.target_modules`` (any of ``q_proj``, ``k_proj``,
    ``v_proj``), block by block and in q, k, v order within a block.

    Raises:
        ValueError: naming ``target_modules`` when the model has none of them (listing
            the fused layers it looked for), or ``rank`` when a projection is too small.
    """
    wanted = config.target_modules
    targets: list[Target] = []
    for name, module in model.named_modules():
        parent, _, leaf = name.rpartition(".")
        if not _is_linear(module):
            if leaf in wanted or leaf in FUSED:
                raise ValueError(
                    f"target_modules: {name} is a {type(module).__name__}, not a linear "
                    "layer (no in_features / out_features)"
                )
            continue
        if leaf in wanted:
            targets.append(Target(name, module, slice(0, module.out_features)))
        elif leaf in FUSED:
            sizes = _fused_sizes(model.config, module.out_features, name)
            start = 0
            for part, size in zip(FUSED[leaf], sizes, strict=True):
                if part in wanted:
                    targets.append(Target(f"{parent}.{part}", module, slice(start, start + size)))
                start += size
    found = {t.name.rsplit(".", 1)[-1] for t in targets}
    missing = [t for t in wanted if t not in found]
    if missing:
        raise ValueError(
            f"target_modules: no linear layer named {missing} (nor a fused "
            f"{sorted(FUSED)}) in {type(model).__name__}"
        )
    for t in targets:
        limit = min(t.size, t.module.in_features)
        if config.rank > limit:
            raise ValueError(
                f"tokur: rank at most {limit} for this model (min(d_out, d_in) of {t.name}), "
                f"got {config.rank}"
            )
    return targets


def _is_linear(module: torch.nn.Module) -> bool:
    """A linear layer, dense or quantised (quantised layers of other libraries need not
    subclass ``nn.Linear`` but have its ``in_features`` / ``out_features``)."""
    features = (getattr(module, "in_features", None), getattr(module, "out_features", None))
    return isinstance(module, torch.nn.Linear) or all(isinstance(f, int) for f in features)


def _fused_sizes(config, out_features: int, name: str) -> tuple[int, int, int]:
    """The q, k and v widths of a fused ``qkv_proj`` from the model's config."""
    config = getattr(config, "text_config", None) or config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    sizes = (heads * head_dim, kv_heads * head_dim, kv_heads * head_dim)
    if sum(sizes) != out_features:
        raise ValueError(
            f"target_modules: {name} has {out_features} outputs, not the q/k/v widths "
            f"{sizes} its config gives; its layout is not a fused q/k/v"
        )
    return sizes


def dense_weight(module: torch.nn.Module, name: str = "layer", dtype=None) -> torch.Tensor:
    """The weight of a linear layer as a dense ``[out, in]`` tensor: its own where it is
    stored dense, else what the layer computes on the identity matrix (minus its bias),
    in ``dtype`` (default: float32). That reads any weight format through the layer's
    own kernel (bitsandbytes 4-bit and 8-bit, GPTQ, AWQ, ...), once, and exactly
    where the layer's output is its weight times the input: the identity's entries are
    exact in every dtype.

    Raises:
        ValueError: naming the layer and its weight type when the layer cannot be run on
            the identity.
    """
    weight = getattr(module, "weight", None)
    dense = (
        isinstance(weight, torch.Tensor)
        and weight.dtype.is_floating_point
        and getattr(weight, "quant_state", None) is None
        and tuple(weight.shape) == (module.out_features, module.in_features)
    )
    if dense:
        return weight
    try:
        device = next(t.device for t in [*module.parameters(), *module.buffers()])
        eye = torch.eye(module.in_features, dtype=dtype or torch.float32, device=device)
        with torch.no_grad():
            both = module(torch.cat([eye, torch.zeros_like(eye[:1])]))
    except (RuntimeError, TypeError, StopIteration) as error:
        stored = type(weight).__name__ if weight is not None else "no weight"
        kind = f" of {weight.dtype}" if isinstance(weight, torch.Tensor) else ""
        raise ValueError(
            f"target_modules: {name} is a {type(module).__name__} storing {stored}{kind}, "
            f"which TokUR cannot read for its SVD bases ({error})"
        ) from error
    return (both[:-1] - both[-1:]).T.contiguous()
