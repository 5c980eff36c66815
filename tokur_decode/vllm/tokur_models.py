"""The perturbed model classes vLLM builds for :func:`~tokur_decode.vllm.tokur_engine_args`.

``Tokur<Architecture>`` (``TokurQwen3ForCausalLM``, ...) is vLLM's own class for the
architecture plus :class:`PerturbedMixin`, made when vLLM first asks for it (the
module's ``__getattr__``; the architectures are :data:`~tokur_decode.vllm.tokur.
ARCHITECTURES`). The mixin needs only what every vLLM decoder of the Llama lineage has:
``model.layers[i].self_attn`` with a fused ``qkv_proj`` and its ``q_size`` /
``kv_size``; q/k norms, biases, soft-capping, sliding windows and MoE feed-forwards stay
exactly as vLLM computes them (the noise goes on the q and v slices of ``qkv_proj``'s
output, before any norm, as in transformers).

vLLM runs a step's tokens (every request's prefill chunk or decode token, flattened)
through ``forward`` and then ``compute_logits`` on the last token of each request. When
some rows of the batch asked for TokUR (``R`` rows, published by the processor through
the engine's :class:`~tokur_decode.vllm.tokur.TokurLink`), each of them needs
``M - 1`` perturbed samples of its last token: TokUR's noise ``sigma * ||x|| * U_r
eps`` on the q/v slices of the fused ``qkv_proj`` output (fresh ``eps`` per row, layer
and sample, from the request's own generator), the token attending to the clean prefix
and to itself, as in the transformers path.

Two modes (``tokur_engine_args(mode=...)``), equal to each other with the same noise:

* ``"batched"`` (the default): **one forward**. The step's ``N`` tokens are followed by
  ``M - 1`` copies of each asking request's last token at the same position
  (request-major), the noise goes on the copies only, and every layer runs once over
  ``N + R (M - 1)`` rows; attention is split by hooks on vLLM's ``Attention`` modules
  (:mod:`tokur_decode.vllm.copies_attention`): vLLM's own kernel and cache write see
  the ``N`` clean rows, the copies attend to the clean cache and to themselves, and the
  cache is left as the clean model wrote it. The runner gets the first ``N`` hidden
  rows. A step whose extra rows would exceed the engine's token budget
  (``max_num_batched_tokens``, what vLLM planned memory for) runs as M passes.
* ``"sequential"``: the reference, **M decoder passes**: passes ``1 .. M-1`` add the
  noise on the asking tokens only (every other token computed exactly as in the clean
  pass); pass ``M`` is the clean model and runs last, so the K/V it writes replace the
  perturbed ones.

``compute_logits`` turns the clean and the perturbed hidden states of the asking rows
into logits and leaves ``[R, M, V]`` (sample 0 clean) in the link for the processor. A
step where no row asked is one plain pass (a Python ``is None`` check, no device sync).

The SVD bases of the q/v weights are computed when the weights are loaded (or read
from the safetensors cache the transformers path fills: same names, same bytes, same
file) with :func:`tokur_decode.core.perturbation.bases_for`.

Example:
    >>> from vllm import LLM                                            # doctest: +SKIP
    >>> engine = LLM(model=path, **tokur_engine_args(samples=10))       # doctest: +SKIP
    >>> type(engine.llm_engine.model_executor.driver_worker.worker.model_runner.model)
    ... # doctest: +SKIP
    <class 'tokur_decode.vllm.tokur_models.TokurLlamaForCausalLM'>
"""

from __future__ import annotations

import functools

import torch
from vllm.forward_context import get_forward_context, is_forward_context_available

from ..core.perturbation import bases_for, low_rank_noise, split_noise
from . import internals
from .copies_attention import CopiesStep, unsupported
from .tokur import ARCHITECTURES, link_of, settings_of

__all__ = ["PerturbedMixin", "largest_difference", "relative_difference"]


class PerturbedMixin:
    """TokUR's perturbed samples for a vLLM decoder whose attention modules have a fused
    ``qkv_proj`` with ``q_size`` / ``kv_size``."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        _refuse_unsupported(vllm_config)
        _check_layout(self)
        self.tokur, self._cache_dir = settings_of(vllm_config.model_config.hf_config)
        self._link = link_of(vllm_config)
        self._link.config = self.tokur
        # (name, layer, slice of the fused output) per perturbed weight, in the order
        # of the transformers path (layer by layer; q, k, v): the noise draws line up.
        self._targets: list[tuple[str, int, slice]] = []
        for layer, block in enumerate(self.model.layers):
            attn = block.self_attn
            bounds = {
                "q_proj": slice(0, attn.q_size),
                "k_proj": slice(attn.q_size, attn.q_size + attn.kv_size),
                "v_proj": slice(attn.q_size + attn.kv_size, attn.q_size + 2 * attn.kv_size),
            }
            for name in ("q_proj", "k_proj", "v_proj"):
                if name in self.tokur.target_modules:
                    self._targets.append(
                        (f"model.layers.{layer}.self_attn.{name}", layer, bounds[name])
                    )
            attn.qkv_proj.register_forward_hook(functools.partial(self._add_noise, layer))
        self._by_layer: dict[int, list[int]] = {}
        for index, (_, layer, _) in enumerate(self._targets):
            self._by_layer.setdefault(layer, []).append(index)
        self._bases: list[torch.Tensor] = []
        self._noise_sizes: list[int] = []
        # this pass's noise: ("tokens", token indices, per-target [R, size]) for a
        # perturbed pass, ("copies", N, per-target [R (M-1), size]) for a batched forward
        self._noise: tuple | None = None
        self._pending: torch.Tensor | None = None  # [R, M - 1, H] perturbed hidden states
        self._copies: CopiesStep | None = None  # a batched forward's attention state
        self._budget = vllm_config.scheduler_config.max_num_batched_tokens
        if self.tokur.mode == "batched":
            for block in self.model.layers:
                attn = block.self_attn.attn
                reason = unsupported(attn)
                if reason is not None:
                    raise ValueError(f"mode: {reason}")
                attn.register_forward_pre_hook(self._attention_pre_hook, with_kwargs=True)
                attn.register_forward_hook(self._attention_hook, with_kwargs=True)

    # ------------------------------------------------------------------ loading

    def load_weights(self, weights):
        loaded = super().load_weights(weights)
        fused = [
            self.model.layers[layer].self_attn.qkv_proj.weight for _, layer, _ in self._targets
        ]
        w = {name: f[bounds] for (name, _, bounds), f in zip(self._targets, fused, strict=True)}
        for name, weight in w.items():
            limit = min(weight.shape)
            if self.tokur.rank > limit:
                raise ValueError(
                    f"tokur: rank at most {limit} for this model (min(d_out, d_in) of "
                    f"{name}), got {self.tokur.rank}"
                )
        bases = bases_for(w, self.tokur.rank, self.tokur.direction, self._cache_dir)
        dtype = fused[0].dtype
        self._bases = [bases[name].to(fused[0].device, dtype) for name, _, _ in self._targets]
        right = self.tokur.direction == "right"
        self._noise_sizes = [
            self.tokur.rank if right else w[n].shape[0] for n, _, _ in self._targets
        ]
        return loaded

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        self._link.samples = None
        tokens = self._asking_tokens()
        if tokens is None:
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        eps = self._draw()
        link = self._link
        link.steps += 1
        args = (input_ids, positions, intermediate_tensors, inputs_embeds, tokens, eps)
        if link.check is not None:
            return self._checked(*args)
        if self._fits(input_ids, positions, inputs_embeds, tokens):
            link.batched_steps += 1
            clean, self._pending = self._batched(*args)
        else:
            clean, self._pending = self._passes(*args)
        return clean

    def _fits(self, input_ids, positions, inputs_embeds, tokens) -> bool:
        """Whether this step can run batched: the mode, token inputs, and the extra
        rows within the token budget vLLM planned memory for."""
        if self.tokur.mode != "batched" or inputs_embeds is not None or positions.dim() != 1:
            return False
        return input_ids.shape[0] + self._extra_rows(tokens) <= self._budget

    def _extra_rows(self, tokens: torch.Tensor) -> int:
        """The rows a batched forward adds: ``M - 1`` copies per asking token."""
        return tokens.numel() * (self.tokur.samples - 1)

    def _batched(self, input_ids, positions, intermediate_tensors, inputs_embeds, tokens, eps):
        """One forward with the copies as extra rows: ``(clean hidden [N, H], the
        copies' hidden [R, M - 1, H])``."""
        copies = self.tokur.samples - 1
        n = input_ids.shape[0]
        ids = torch.cat([input_ids, input_ids.index_select(0, tokens).repeat_interleave(copies)])
        pos = torch.cat([positions, positions.index_select(0, tokens).repeat_interleave(copies)])
        broken = self._link.check == "broken"
        self._copies = CopiesStep(self._link.rows, tokens, n, copies, broken)
        self._noise = ("copies", n, [e[:, 1:].flatten(0, 1) for e in eps])
        try:
            hidden = super().forward(ids, pos, intermediate_tensors, None)
        finally:
            self._copies, self._noise = None, None
        return hidden[:n], hidden[n:].view(tokens.numel(), copies, -1)

    def _passes(self, input_ids, positions, intermediate_tensors, inputs_embeds, tokens, eps):
        """M decoder passes (the reference): the same result as :meth:`_batched`."""
        kept = []
        for sample in range(1, self.tokur.samples):
            self._noise = ("tokens", tokens, [e[:, sample] for e in eps])
            try:
                hidden = super().forward(
                    input_ids,
                    positions,
                    intermediate_tensors,
                    None if inputs_embeds is None else inputs_embeds.clone(),  # normed in place
                )
            finally:
                self._noise = None
            kept.append(hidden.index_select(0, tokens))
        clean = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        width = clean.shape[-1]
        pending = torch.stack(kept, 1) if kept else clean.new_zeros(tokens.numel(), 0, width)
        return clean, pending

    def _checked(self, *args):
        """Diagnostics (:meth:`~tokur_decode.vllm.worker.TraceExtension.tokur_check`):
        the batched forward, then the M passes with the same noise; how far apart their
        clean and perturbed hidden states are (largest and relative differences), how
        far the KV cache after the batched forward is from the one the passes leave, and
        how far the noise moved the perturbed states. The two schemes compute the same
        thing; they agree to the dtype's rounding, not bit for bit: the batched forward
        runs its GEMMs and the copies' attention on other row counts, and a CPU library
        may pick another kernel (and rounding) for another shape."""
        clean_b, copies_b = self._batched(*args)
        caches = [block.self_attn.attn.kv_cache.clone() for block in self.model.layers]
        clean_s, copies_s = self._passes(*args)
        tokens = args[4]
        n = args[0].shape[0]
        metadata = next(iter(get_forward_context().attn_metadata.values()))
        self._link.checks.append(
            {
                "tokens": int(n),
                "asking": int(tokens.numel()),
                "longest_query": int(metadata.max_query_len),
                "scale": float(clean_s.abs().max()),
                "clean": largest_difference(clean_b, clean_s),
                "copies": largest_difference(copies_b, copies_s),
                "noise": largest_difference(copies_s, clean_s.index_select(0, tokens)[:, None]),
                "cache": max(
                    largest_difference(c, block.self_attn.attn.kv_cache)
                    for c, block in zip(caches, self.model.layers, strict=True)
                ),
                "clean_relative": relative_difference(clean_b, clean_s),
                "copies_relative": relative_difference(copies_b, copies_s),
                "noise_relative": relative_difference(
                    copies_s, clean_s.index_select(0, tokens)[:, None].expand_as(copies_s)
                ),
            }
        )
        self._pending = copies_b
        return clean_b

    def compute_logits(self, hidden_states):
        logits = super().compute_logits(hidden_states)
        pending, self._pending = self._pending, None
        if pending is not None and logits is not None:
            # The clean rows again, in the same call as the perturbed ones: one GEMM
            # shape for all M samples, so sigma = 0 gives M bit-equal samples.
            clean = hidden_states.index_select(0, self._link.rows).unsqueeze(1)
            every = torch.cat([clean, pending], dim=1)  # [R, M, H]
            samples = super().compute_logits(every.flatten(0, 1))
            self._link.samples = samples.view(*every.shape[:2], -1)
        return logits

    def _asking_tokens(self) -> torch.Tensor | None:
        """Flat token index of the last scheduled token of every asking row (the row
        vLLM computes logits for), or ``None`` when nothing asks or the forward is a
        warm-up without attention metadata."""
        rows = self._link.rows
        if rows is None or not self._bases or not is_forward_context_available():
            return None
        metadata = get_forward_context().attn_metadata
        if not isinstance(metadata, dict) or not metadata:
            return None
        starts = next(iter(metadata.values())).query_start_loc  # [num_reqs + 1]
        if starts.shape[0] <= self._link.span:  # a dummy batch smaller than ours
            return None
        return starts.index_select(0, rows + 1) - 1

    def _draw(self) -> list[torch.Tensor]:
        """Per target, ``[R, M, size]`` noise times the row's sigma: each row from its
        request's generator, one call per row and step (the transformers path's law and
        order of draws)."""
        link = self._link
        device = link.rows.device
        flat = torch.stack(
            [
                torch.randn(
                    self.tokur.samples, sum(self._noise_sizes), generator=gen, device=device
                )
                for gen in link.generators
            ]
        )
        scaled = flat * link.sigma[:, None, None]
        return split_noise(scaled.to(self._bases[0].dtype), self._noise_sizes)

    def _add_noise(self, layer: int, module, args, output):
        if self._noise is None:
            return output
        kind, where, eps = self._noise
        out = output[0]
        for index in self._by_layer.get(layer, ()):
            bounds = self._targets[index][2]
            base = self._bases[index]
            if kind == "copies":  # rows `where:` are the copies, one noise row each
                noise = low_rank_noise(args[0][where:], base, eps[index], 1.0, self.tokur.direction)
                out[where:, bounds] += noise
            else:  # a perturbed pass: the asking tokens only
                x = args[0].index_select(0, where)
                noise = low_rank_noise(x, base, eps[index], 1.0, self.tokur.direction)
                out[:, bounds].index_add_(0, where, noise)
        return output

    def _attention_pre_hook(self, module, args, kwargs):
        return None if self._copies is None else self._copies.pre_hook(module, args, kwargs)

    def _attention_hook(self, module, args, kwargs, output):
        return None if self._copies is None else self._copies.hook(module, args, kwargs, output)


def _refuse_unsupported(vllm_config) -> None:
    """What TokUR's model cannot run under, refused by name when the engine starts."""
    parallel = vllm_config.parallel_config
    refused = {
        "tensor_parallel_size": parallel.tensor_parallel_size > 1,
        "pipeline_parallel_size": parallel.pipeline_parallel_size > 1,
        "speculative_config": vllm_config.speculative_config is not None,
        "kv_transfer_config": vllm_config.kv_transfer_config is not None,
        "enable_lora": vllm_config.lora_config is not None,
        "quantization": getattr(vllm_config.model_config, "quantization", None) is not None,
    }
    for name, bad in refused.items():
        if bad:
            raise ValueError(
                f"{name}: TokUR in vLLM runs on one worker, without speculative decoding, "
                "KV connectors, LoRA or quantised weights (the perturbed samples would not "
                "be drawn or kept consistently there; quantised checkpoints run TokUR in "
                "transformers)"
            )


def _check_layout(model) -> None:
    """Refuse, naming the architecture and what is missing, a model whose layers do not
    have the attention layout the mixin perturbs."""
    name = type(model).__name__.removeprefix("Tokur")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"model: TokUR needs {name}.model.layers, which it does not have")
    for block in layers:
        attn = getattr(block, "self_attn", None)
        missing = [a for a in ("qkv_proj", "q_size", "kv_size") if not hasattr(attn, a)]
        if missing:
            raise ValueError(
                f"model: TokUR needs a fused qkv_proj with q_size / kv_size in every "
                f"layer's self_attn; {name}'s has no {missing}"
            )


def largest_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference of two tensors of one shape (``inf`` where one
    holds a NaN the other does not), compared in float32.

    Example:
        >>> largest_difference(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.5]))
        0.5
        >>> largest_difference(torch.tensor([float("nan")]), torch.tensor([float("nan")]))
        0.0
    """
    if torch.equal(a, b):
        return 0.0
    difference = (a.float() - b.float()).abs().nan_to_num(nan=float("inf"))
    both_nan = a.isnan() & b.isnan()
    return float(difference.masked_fill(both_nan, 0.0).max())


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` (Frobenius norms, float64; 0 for equal tensors): a
    difference on the scale of the dtype's rounding, whatever the values' magnitude.

    Example:
        >>> relative_difference(torch.tensor([3.0, 4.5]), torch.tensor([3.0, 4.0]))
        0.1
    """
    if torch.equal(a, b):
        return 0.0
    reference = b.double()
    return float((a.double() - reference).norm() / reference.norm().clamp_min(1e-300))


def __getattr__(name: str) -> type:
    """``Tokur<Architecture>``: vLLM's class for a supported architecture with
    :class:`PerturbedMixin`, made once (vLLM's registry imports our classes by name)."""
    arch = name.removeprefix("Tokur")
    if ARCHITECTURES.get(arch) != name:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    base = internals.model_class(arch)
    doc = f"vLLM's ``{base.__name__}`` with TokUR's perturbed samples."
    cls = type(name, (PerturbedMixin, base), {"__module__": __name__, "__doc__": doc})
    globals()[name] = cls
    return cls
