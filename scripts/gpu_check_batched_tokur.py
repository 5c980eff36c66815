"""GPU check of TokUR's batched-mode attention on vLLM's FlashAttention backend.

PREPARED, NOT RUN: no GPU was available to this project. On a machine with an NVIDIA GPU
and the CUDA build of vLLM 0.32:

    python scripts/gpu_check_batched_tokur.py        # about a minute

It fills a random paged KV cache with vLLM's ``reshape_and_cache_flash``, runs
:func:`tokur_decode.vllm.copies_attention.split_merge` for requests of lengths 1 (no
prefix), block edges and ~2k tokens, compares it with a float64 dense reference (prefix
+ self), and times it against the clean decode attention of the same rows. It prints the
largest error per case (bf16: expect ~1e-2) and exits non-zero above the tolerance.
"""

from __future__ import annotations

import sys
import time

import torch

from tokur_decode.vllm.copies_attention import split_merge

DEVICE = "cuda"
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3}


def paged_case(lengths, heads=32, kv_heads=8, size=128, block=16, copies=9, dtype=torch.bfloat16):
    """A random paged cache holding each request's clean prefix, and random copies."""
    from vllm.v1.attention.backends.fa_utils import reshape_and_cache_flash

    g = torch.Generator().manual_seed(0)
    per = [max(1, (n + block - 1) // block) for n in lengths]
    order = (torch.randperm(sum(per), generator=g) + 1).tolist()  # block 0 unused
    table = torch.zeros(len(lengths), max(per), dtype=torch.int32)
    keys, values, slots, used = [], [], [], 0
    for i, n in enumerate(lengths):
        ids = torch.tensor(order[used : used + per[i]])
        used += per[i]
        table[i, : len(ids)] = ids.int()
        p = torch.arange(n)
        slots.append(ids[p // block] * block + p % block)
        keys.append(torch.randn(n, kv_heads, size, generator=g).to(dtype))
        values.append(torch.randn(n, kv_heads, size, generator=g).to(dtype))
    cache = torch.zeros(sum(per) + 1, block, kv_heads, 2 * size, dtype=dtype, device=DEVICE)
    key_cache, value_cache = cache.permute(0, 2, 1, 3).transpose(1, 2).split(size, dim=-1)
    one = torch.ones((), device=DEVICE)
    if sum(lengths):
        reshape_and_cache_flash(
            torch.cat(keys).to(DEVICE),
            torch.cat(values).to(DEVICE),
            key_cache,
            value_cache,
            torch.cat(slots).to(DEVICE),
            "auto",
            one,
            one,
        )
    r = len(lengths)
    q = torch.randn(r, copies, heads, size, generator=g).to(dtype)
    k = torch.randn(r, copies, kv_heads, size, generator=g).to(dtype)
    v = torch.randn(r, copies, kv_heads, size, generator=g).to(dtype)
    return dict(
        lengths=lengths,
        keys=keys,
        values=values,
        q=q,
        k=k,
        v=v,
        scale=size**-0.5,
        key_cache=key_cache,
        value_cache=value_cache,
        table=table.to(DEVICE),
    )


def reference(case) -> torch.Tensor:
    """Each copy attends to its request's prefix and to itself, in float64."""
    q, k, v = case["q"].double(), case["k"].double(), case["v"].double()
    group = q.shape[2] // k.shape[2]
    out = torch.zeros_like(q)
    for i in range(len(case["lengths"])):
        for j in range(q.shape[1]):
            keys = torch.cat([case["keys"][i].double(), k[i, j : j + 1]]).repeat_interleave(
                group, 1
            )
            vals = torch.cat([case["values"][i].double(), v[i, j : j + 1]]).repeat_interleave(
                group, 1
            )
            w = torch.softmax(torch.einsum("hd,shd->hs", q[i, j], keys) * case["scale"], -1)
            out[i, j] = torch.einsum("hs,shd->hd", w, vals)
    return out


def run(case) -> torch.Tensor:
    lengths = torch.tensor(case["lengths"], dtype=torch.int32, device=DEVICE)
    return split_merge(
        case["q"].to(DEVICE),
        case["k"].to(DEVICE),
        case["v"].to(DEVICE),
        case["key_cache"],
        case["value_cache"],
        case["table"],
        lengths,
        case["scale"],
    )


def main() -> int:
    print(torch.cuda.get_device_name())
    ok = True
    for name, lengths in [
        ("edges", [0, 1, 15, 16, 17, 33, 300]),  # prefix lengths (0: a 1-token prompt)
        ("64 x ~2k", [2000 + 7 * i for i in range(64)]),
    ]:
        case = paged_case(lengths)
        got = run(case)
        if len(lengths) < 20:
            err = (got.double().cpu() - reference(case)).abs().max().item()
            ok &= err <= TOLERANCE[torch.bfloat16]
            print(f"{name}: max |error| vs float64 {err:.2e}")
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(20):
            run(case)
        torch.cuda.synchronize()
        print(f"{name}: {1e3 * (time.perf_counter() - start) / 20:.3f} ms per layer")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
