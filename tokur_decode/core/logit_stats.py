"""One read of a decoding step's logits: the row statistics every single-pass signal is
a function of.

Per row of sanitised logits ``z`` (the non-finite conventions of
:mod:`tokur_decode.core.signals`), with ``m = max z``, ``d = z - m <= 0``, ``e = exp(d)``
and ``d_c = max(d, log tiny)``, the pass computes

=========================  ======================================================
``S0 = sum e``             ``log p = d - log S0``, ``max p = 1 / S0``
``S1 = sum e d_c``         entropy ``H = log S0 - S1 / S0``
``S2 = sum e d_c^2``       varentropy ``S2 / S0 - (S1 / S0)^2`` (the variance of ``d``)
``n``, ``D``               the number and the sum of the finite ``d`` (self-certainty
                           ``-log n - D / n + log S0``, the mean finite logit)
chunk maxima               the maximum of every 128 consecutive entries: the ``k``
                           largest entries lie in the ``k`` chunks with the largest
                           maxima, so an exact top-``k`` reads only those
=========================  ======================================================

Clamping ``d`` at ``log tiny`` (about ``-87.3``) instead of masking: an entry below it
has ``e < 1.2e-38`` and adds nothing a float32 sum can hold, and a masked one
(``d = -inf``, ``e = 0``) adds exactly 0.

:func:`read_logits` runs the pass through ``torch.compile`` (inductor: vectorised C++ on
a CPU, Triton on a GPU), which fuses it into two sweeps over the logits (the maxima,
then the sums), against about fifteen for the same arithmetic op by op. It compiles a
few times per process, on first use (rows and vocabulary are dynamic dimensions: no
recompilation as the batch changes), for float32 compute (float32 and half-precision
logits; float64, for offline analysis, runs op by op), falls back to running the same
function op by op where compilation is unavailable or fails (with one warning), and runs
it op by op for small inputs, where a compiled call's fixed cost is larger than the work
(below :data:`COMPILE_MIN_ELEMENTS`). ``TOKUR_DECODE_COMPILE=0`` in the environment turns
compilation off.

Example:
    >>> import torch
    >>> stats = read_logits(torch.tensor([[0.0, 0.0, float("-inf")]]), top=2)
    >>> stats.top_logprobs.exp()
    tensor([[0.5000, 0.5000]])
    >>> stats.log_s0 - stats.mean_d  # the entropy: log 2
    tensor([0.6931])
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "CHUNK",
    "COMPILE_MIN_ELEMENTS",
    "Compiled",
    "LogitStats",
    "Workspace",
    "compilation",
    "compiles",
    "compute_dtype",
    "log_tiny",
    "logprobs",
    "read_logits",
    "row_fields",
    "rows_of",
    "sanitized",
]

#: Inputs with fewer elements run op by op (a compiled call costs tens of microseconds).
COMPILE_MIN_ELEMENTS = 1 << 15

#: Entries per chunk of the two-stage top-k.
CHUNK = 128

#: Vocabularies from this size use the two-stage top-k (below it one ``torch.topk`` over
#: the sanitised row is as fast).
TWO_STAGE_MIN_VOCAB = 64 * CHUNK


def log_tiny(dtype: torch.dtype) -> float:
    """``log`` of the smallest normal number: below it a probability is zero."""
    return math.log(torch.finfo(dtype).tiny)


def logprobs(z: torch.Tensor, shift: torch.Tensor, log_s0: torch.Tensor) -> torch.Tensor:
    """``log p`` of sanitised logits ``z`` from a read's ``m`` and ``log S0`` (broadcast):
    ``(z - m) - log S0``, not ``z - (m + log S0)``, which rounds at ``m``'s magnitude."""
    return (z - shift) - log_s0


def sanitized(x: torch.Tensor, empty: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` under the non-finite conventions: ``NaN -> -inf``, ``+inf -> dtype max``;
    rows flagged ``empty`` (no finite entry) become 0. Elementwise, so the compiled pass
    fuses it into its reads (``x == x`` is false exactly at NaN; written without
    ``isnan``, which inductor does not vectorise)."""
    z = torch.where(x == x, x.clamp_max(torch.finfo(x.dtype).max), -math.inf)
    return z if empty is None else torch.where(empty, 0.0, z)


def compute_dtype(logits: torch.Tensor) -> torch.dtype:
    """float64 for float64 logits, else float32 (half precision loses nothing beyond its
    own rounding); refuses what is not a floating-point tensor."""
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"logits: expected a torch.Tensor, got {type(logits).__name__} "
            "(torch.as_tensor converts a numpy array)"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {logits.dtype}")
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _row_statistics(x: torch.Tensor, kept: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """The pass over ``x`` ``[N, V]`` (float32 or float64): ``(empty, chunk maxima [N,
    ceil(V / CHUNK)], m, S0, S1, S2, n, D)`` per row; writes the sanitised logits into
    ``kept`` when given."""
    rows, vocab = x.shape
    z = sanitized(x)
    whole = vocab - vocab % CHUNK
    chunks = z[:, :whole].view(rows, -1, CHUNK).amax(dim=-1)
    if vocab % CHUNK:  # the last, shorter chunk (no padding: masked loads are slow)
        chunks = torch.cat([chunks, z[:, whole:].amax(dim=-1, keepdim=True)], dim=-1)
    m = chunks.amax(dim=-1, keepdim=True)
    empty = m == -math.inf
    z = torch.where(empty, 0.0, z)
    chunks = torch.where(empty, 0.0, chunks)
    m = torch.where(empty, 0.0, m)
    d = z - m
    e = d.exp()
    d_c = d.clamp_min(log_tiny(x.dtype))
    e_d = e * d_c
    finite = d > -math.inf
    if kept is not None:
        kept.copy_(z)
    return (
        empty.squeeze(-1),
        chunks,
        m.squeeze(-1),
        e.sum(dim=-1),
        e_d.sum(dim=-1),
        (e_d * d_c).sum(dim=-1),
        torch.where(finite, 1.0, 0.0).sum(dim=-1),
        torch.where(finite, d, 0.0).sum(dim=-1, dtype=torch.float64),  # cannot overflow
    )


class _Compilation:
    """The process's switch: ``compilation.enabled = False`` runs every pass op by op
    (``TOKUR_DECODE_COMPILE=0`` in the environment starts it off)."""

    def __init__(self) -> None:
        self.enabled = os.environ.get("TOKUR_DECODE_COMPILE", "1").strip() not in ("0", "")


compilation = _Compilation()

#: Compiled variants a function may collect (dynamo's default, 8, is reached by a test
#: suite's shapes; a server uses two to four: rows of 1 or more, kept or not).
RECOMPILE_LIMIT = 64


class Compiled:
    """``fn(x [..., V], *args)`` through ``torch.compile`` (dynamic sizes), built on first
    use, where :func:`compiles` says so; op by op otherwise, and from the first failure on
    (no C++ compiler, an unsupported platform: one warning), since the same function op
    by op is always correct."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None

    def __call__(self, x: torch.Tensor, *args: Any) -> Any:
        if not (compilation.enabled and compiles(x)):
            return self.fn(x, *args)
        if self._compiled is None:
            # raised once, process-wide (a per-call config patch costs more than the pass
            # at one row)
            limit = torch._dynamo.config
            limit.recompile_limit = max(limit.recompile_limit, RECOMPILE_LIMIT)
            self._compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self._compiled(x.detach(), *args)  # not a view: no guards on a base
        except Exception as exc:
            compilation.enabled = False
            warnings.warn(
                f"tokur_decode: torch.compile of the signal pass failed ({type(exc).__name__}: "
                f"{str(exc)[:200]}); computing it op by op from now on",
                RuntimeWarning,
                stacklevel=3,
            )
            return self.fn(x, *args)


def compiles(x: torch.Tensor) -> bool:
    """Whether a pass over ``x`` ``[..., V]`` is compiled: float32 (float64, for offline
    analysis, runs op by op), at least one whole chunk per row, and enough elements to be
    worth a compiled call (:data:`COMPILE_MIN_ELEMENTS`)."""
    return x.dtype == torch.float32 and x.shape[-1] >= CHUNK and x.numel() >= COMPILE_MIN_ELEMENTS


def row_fields(x: torch.Tensor, kept: torch.Tensor | None, top: int) -> tuple[torch.Tensor, ...]:
    """The read of ``x`` ``[N, V]`` in the compute dtype, packed for
    :meth:`LogitStats.of_rows` (few outputs: each costs a compiled call some
    microseconds): ``(empty, [m, log S0, S1 / S0, S2 / S0, n] [N, 5], D, top logits,
    top ids)`` with the ``top`` largest entries (``min(top, V)``)."""
    empty, chunks, m, s0, s1, s2, n, d_sum = _row_statistics(x, kept)
    top_z, top_ids = _top(x, chunks, empty, min(top, x.shape[1]))
    moments = torch.stack([m, s0.log(), s1 / s0, s2 / s0, n], dim=-1)
    return empty, moments, d_sum, top_z, top_ids


_read = Compiled(row_fields)


class Workspace:
    """Memory that :func:`read_logits` reuses from call to call.

    A read that keeps a copy of the logits (``keep=True``: for the log-probability of a
    token known at the next step) writes ``[rows, V]`` floats. A fresh tensor of that size
    each step is cheap on a GPU (PyTorch caches device memory) but not on a CPU, where
    it page-faults. A workspace keeps one flat buffer per role, grown to the largest
    shape seen; what a read keeps in it stays valid until the next read with the same
    workspace.

    Example:
        >>> import torch
        >>> ws = Workspace()
        >>> first = read_logits(torch.zeros(2, 4), keep=True, workspace=ws)
        >>> second = read_logits(torch.ones(2, 4), keep=True, workspace=ws)
        >>> first.logits.data_ptr() == second.logits.data_ptr()
        True
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def like(self, name: str, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A tensor of ``x``'s shape and device and ``dtype`` from buffer ``name``
        (its content is whatever the last user left)."""
        n = x.numel()
        buf = self._buffers.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != x.device:
            buf = torch.empty(n, dtype=dtype, device=x.device)
            self._buffers[name] = buf
        return buf[:n].view(x.shape)


@dataclass(frozen=True)
class LogitStats:
    """What one read of logits ``[..., V]`` gives, per row (shapes ``[...]`` unless said).

    Attributes:
        empty: the row had no finite logit (it is read as all zeros: uniform).
        shift: ``m``, the row's largest sanitised logit (0 for a row with no finite one).
        log_s0: ``log S0``; ``log p = z - shift - log_s0``.
        mean_d: ``S1 / S0``, the mean of ``d_c`` under ``p``.
        second_d: ``S2 / S0``.
        n_finite: the number of finite entries (float).
        sum_finite: the sum of their ``d`` (float64).
        top_logits: ``[..., k]`` the ``k`` largest sanitised logits, largest first.
        top_ids: ``[..., k]`` their token ids.
        logits: ``[..., V]`` the sanitised logits when read with ``keep=True``, else the
            input itself (then valid only while its owner leaves it unchanged).
    """

    empty: torch.Tensor
    shift: torch.Tensor
    log_s0: torch.Tensor
    mean_d: torch.Tensor
    second_d: torch.Tensor
    n_finite: torch.Tensor
    sum_finite: torch.Tensor
    top_logits: torch.Tensor
    top_ids: torch.Tensor
    logits: torch.Tensor

    @property
    def top_logprobs(self) -> torch.Tensor:
        """``[..., k]`` log-probabilities of :attr:`top_ids`."""
        return logprobs(self.top_logits, self.shift.unsqueeze(-1), self.log_s0.unsqueeze(-1))

    def logprob_of(self, token_ids: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """``log p`` of ``token_ids`` ``[...]`` (unfloored), one per row; ``rows`` ``[T]``
        picks each token's row of a 2-D read instead."""
        ids = token_ids.long()
        if rows is None:
            z = self.logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
            empty, shift, log_s0 = self.empty, self.shift, self.log_s0
        else:
            z = self.logits[rows, ids]
            empty, shift, log_s0 = self.empty[rows], self.shift[rows], self.log_s0[rows]
        return logprobs(sanitized(z.to(shift.dtype), empty), shift, log_s0)

    @classmethod
    def of_rows(
        cls, fields: tuple[torch.Tensor, ...], shape: torch.Size, logits: torch.Tensor
    ) -> LogitStats:
        """From :func:`row_fields` of ``[N, V]`` rows, for logits of ``shape``
        ``[..., V]``."""
        lead = shape[:-1]

        def shaped(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(lead + t.shape[1:])

        empty, moments, d_sum, top_z, top_ids = fields
        m, log_s0, mean_d, second_d, n = moments.reshape(lead + (5,)).unbind(-1)
        return cls(
            empty=shaped(empty),
            shift=m,
            log_s0=log_s0,
            mean_d=mean_d,
            second_d=second_d,
            n_finite=n,
            sum_finite=shaped(d_sum),
            top_logits=shaped(top_z),
            top_ids=shaped(top_ids),
            logits=logits.reshape(shape),
        )

    def select_rows(self, index: torch.Tensor) -> LogitStats:
        """The statistics of rows ``index`` (``[B']`` of a 2-D read)."""
        rows = {
            f.name: getattr(self, f.name).index_select(0, index) for f in dataclasses.fields(self)
        }
        return LogitStats(**rows)


def read_logits(
    logits: torch.Tensor, *, top: int = 0, keep: bool = False, workspace: Workspace | None = None
) -> LogitStats:
    """Read ``logits`` ``[..., V]`` once: the row statistics and the ``top`` largest
    entries (``min(top, V)``), in float32 (float64 for float64 input).

    Args:
        logits: any floating dtype, any device.
        top: how many of the largest entries to return (0: none).
        keep: keep a sanitised copy of the logits in the result (for the log-probability
            of a token known only later), written by the same pass.
        workspace: where to keep that copy (reused memory saves the page faults of a
            fresh tensor on a CPU).

    No host synchronisation: every result stays on the logits' device.
    """
    x, kept = rows_of(logits, keep, workspace)
    return LogitStats.of_rows(_read(x, kept, top), logits.shape, x if kept is None else kept)


def rows_of(
    logits: torch.Tensor, keep: bool, workspace: Workspace | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``logits`` as ``[N, V]`` rows in the compute dtype (half precision widened here:
    vLLM and transformers hand float32 logits to processors), and where a kept copy goes."""
    dtype = compute_dtype(logits)
    x = logits.reshape(-1, logits.shape[-1]).to(dtype)
    if not keep:
        return x, None
    if workspace is None:
        return x, torch.empty(x.shape, dtype=dtype, device=x.device)
    return x, workspace.like("kept", x, dtype)


def _top(
    x: torch.Tensor, chunks: torch.Tensor, empty: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest sanitised entries of ``x`` ``[N, V]`` and their ids, largest
    first."""
    rows, vocab = x.shape
    if k == 0:
        return chunks.new_empty(rows, 0), torch.empty(rows, 0, dtype=torch.long, device=x.device)
    empty = empty.unsqueeze(-1)
    if vocab < TWO_STAGE_MIN_VOCAB or k > 64:
        return torch.topk(sanitized(x, empty), k, dim=-1)
    chunk_ids = chunks.topk(k, dim=-1).indices  # [N, k]
    offsets = torch.arange(CHUNK, device=x.device)
    ids = (chunk_ids.unsqueeze(-1) * CHUNK + offsets).reshape(rows, -1)  # [N, k * CHUNK]
    inside = ids < vocab  # the last chunk's padding
    candidates = sanitized(x.gather(1, ids.clamp_max(vocab - 1)), empty)
    values, pos = torch.where(inside, candidates, -math.inf).topk(k, dim=-1)
    return values, ids.gather(1, pos)
