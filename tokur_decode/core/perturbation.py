"""TokUR: training-free low-rank Bayesian weight perturbation (docs/reference.md 1.2).

For a linear layer ``y = W x + b`` with ``W = U S V^T``, TokUR perturbs
``W' = W + U_r E`` with ``E_ij ~ N(0, sigma^2)`` (``U_r``: the top-``r`` left singular
vectors). For one input row ``x`` this is exactly, by the local reparameterisation,

    y' = W x + b + sigma * ||x||_2 * U_r eps,        eps ~ N(0, I_r)

(``direction="right"``, the default). ``direction="left"`` perturbs
``W' = W + E V_r^T`` instead: ``y' = W x + b + sigma * ||V_r^T x||_2 * eps`` with
``eps ~ N(0, I_{d_out})``.

This module holds the backend-independent parts: the validated configuration, the
bases (computed once per model and cached on disk as safetensors keyed by a hash of
the weights) and the noise itself. The transformers adapter is
:func:`tokur_decode.hf.perturbed`; the uncertainty decomposition of the samples is
:func:`tokur_decode.core.signals.bayesian_decomposition`.

Example:
    >>> import torch
    >>> w = torch.randn(6, 4)
    >>> basis = low_rank_basis(w, rank=2)
    >>> basis.shape
    torch.Size([6, 2])
    >>> x, eps = torch.randn(3, 4), torch.randn(3, 2)
    >>> low_rank_noise(x, basis, eps, sigma=0.1).shape
    torch.Size([3, 6])
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

__all__ = [
    "PerturbationConfig",
    "bases_for",
    "checked_options",
    "low_rank_basis",
    "low_rank_noise",
    "split_noise",
    "weights_fingerprint",
]

_DIRECTIONS = ("right", "left")
_DECODE = ("clean", "mean")
_MODES = ("batched", "sequential")


@dataclass(frozen=True)
class PerturbationConfig:
    """Validated TokUR settings.

    Args:
        rank: ``r``, number of singular directions perturbed (TokUR: 8).
        sigma: noise scale (TokUR: 0.1); 0 makes every sample the clean model.
        samples: ``M`` predictive samples per step, sample 0 being the clean model (10).
        seed: seed of the noise generator (same seed, same uncertainties).
        target_modules: names of the linear layers perturbed in every block.
        direction: ``"right"`` (``U_r``, faithful) or ``"left"`` (``V_r``).
        decode: ``"clean"`` (decode from the clean model, faithful) or ``"mean"`` (from
            the mean of the ``M`` predictive distributions).
        mode: ``"batched"`` (all samples in one forward per step) or ``"sequential"``
            (``M`` passes per step, the official implementation's cost; a reference).

    Raises:
        ValueError: naming the parameter.
    """

    rank: int = 8
    sigma: float = 0.1
    samples: int = 10
    seed: int = 0
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    direction: str = "right"
    decode: str = "clean"
    mode: str = "batched"

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not isinstance(self.sigma, int | float) or not self.sigma >= 0:
            raise ValueError(f"sigma must be a number >= 0, got {self.sigma!r}")
        samples = self.samples
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive integer, got {samples!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        targets = (
            (self.target_modules,)
            if isinstance(self.target_modules, str)
            else tuple(self.target_modules)
        )
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"target_modules must be non-empty names, got {self.target_modules!r}")
        object.__setattr__(self, "target_modules", targets)
        for name, value, allowed in (
            ("direction", self.direction, _DIRECTIONS),
            ("decode", self.decode, _DECODE),
            ("mode", self.mode, _MODES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def checked_options(options, name: str = "tokur") -> dict | None:
    """TokUR options as a caller gave them (only those: what is not given stays the
    backend's, an engine's or :class:`PerturbationConfig`'s default), checked once where
    they enter: an unknown key or a bad value raises ``ValueError`` naming it.

    Example:
        >>> checked_options({"samples": 4})
        {'samples': 4}
        >>> checked_options({"smaples": 4})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: tokur: unknown option(s) ['smaples']; choose from ['decode', ...]
        >>> checked_options({"samples": 0})
        Traceback (most recent call last):
        ...
        ValueError: tokur: samples must be a positive integer, got 0
    """
    if options is None:
        return None
    if isinstance(options, PerturbationConfig):
        return {f.name: getattr(options, f.name) for f in fields(PerturbationConfig)}
    known = {f.name for f in fields(PerturbationConfig)}
    unknown = set(options) - known
    if unknown:
        raise ValueError(
            f"{name}: unknown option(s) {sorted(unknown)}; choose from {sorted(known)}"
        )
    try:
        PerturbationConfig(**options)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None
    return dict(options)


def low_rank_basis(weight: torch.Tensor, rank: int, direction: str = "right") -> torch.Tensor:
    """Top-``rank`` left (``"right"`` direction: ``U_r`` ``[d_out, r]``) or right
    (``"left"``: ``V_r`` ``[d_in, r]``) singular vectors of ``weight``, float32."""
    d_out, d_in = weight.shape
    if rank > min(d_out, d_in):
        raise ValueError(f"rank must be <= min(d_out, d_in) = {min(d_out, d_in)}, got {rank}")
    u, _, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    return (u[:, :rank] if direction == "right" else vh[:rank].T).contiguous()


def low_rank_noise(
    x: torch.Tensor,
    basis: torch.Tensor,
    eps: torch.Tensor,
    sigma: float,
    direction: str = "right",
) -> torch.Tensor:
    """The perturbation of ``W x`` for input rows ``x`` ``[..., d_in]``.

    ``"right"``: ``sigma * ||x|| * eps @ U_r^T`` with ``eps`` ``[..., r]``;
    ``"left"``: ``sigma * ||V_r^T x|| * eps`` with ``eps`` ``[..., d_out]``.
    Computed in ``x``'s dtype (the model's compute dtype), the norm in float32.
    """
    if direction == "right":
        scale = x.float().norm(dim=-1, keepdim=True).to(x.dtype) * sigma
        return scale * (eps @ basis.T)
    scale = (x @ basis).float().norm(dim=-1, keepdim=True).to(x.dtype) * sigma
    return scale * eps


def weights_fingerprint(weights: Mapping[str, torch.Tensor], rank: int, direction: str) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of ``weights`` and the settings."""
    digest = hashlib.sha256(f"tokur-bases-v1|{rank}|{direction}".encode())
    for name in sorted(weights):
        w = weights[name].detach().contiguous().cpu()
        digest.update(f"|{name}|{tuple(w.shape)}|{w.dtype}|".encode())
        digest.update(w.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def bases_for(
    weights: Mapping[str, torch.Tensor],
    rank: int,
    direction: str = "right",
    cache: str | os.PathLike | None = None,
) -> dict[str, torch.Tensor]:
    """Bases of every weight in ``weights``, float32 on CPU, cached on disk.

    The cache file is ``<cache>/tokur-bases/<fingerprint>.safetensors`` (``cache``
    defaults to :func:`tokur_decode.core.cache.cache_dir`); it is written atomically and
    never pickled. ``cache=False``-like behaviour: pass a temporary folder.
    """
    from safetensors.torch import load_file, save_file

    if cache is None:
        from .cache import cache_dir

        cache = cache_dir()
    path = (
        Path(cache) / "tokur-bases" / f"{weights_fingerprint(weights, rank, direction)}.safetensors"
    )
    if path.is_file():
        loaded = load_file(str(path))
        if set(loaded) == set(weights):
            return loaded
    bases = {name: low_rank_basis(w, rank, direction) for name, w in weights.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".bases-", suffix=".safetensors", dir=path.parent)
    os.close(fd)
    try:
        save_file(bases, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return bases


def split_noise(eps: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    """Split one draw ``[..., sum(sizes)]`` into per-module noise (one RNG call per step)."""
    return list(torch.split(eps, list(sizes), dim=-1))
