"""TokUR in transformers: all perturbed samples of a decoding step in one forward pass.

Inside ``with perturbed(model, ...) as pm:`` every forward pass that extends a KV cache
(what ``generate`` does) computes, for each row, the clean model *and* ``M - 1``
perturbed samples of the current token:

* the current token is repeated ``M - 1`` times as extra query rows at the **same
  position**; a 4-D attention mask lets each copy see the cached (clean) prefix and
  itself only, and the clean token sees what it always sees;
* forward hooks on the target linear layers (``q_proj``/``v_proj``) add the low-rank
  noise of :mod:`tokur_decode.core.perturbation` to the copies' rows only, with a fresh
  ``eps`` per row, layer and sample;
* the copies' K/V are cropped from the cache afterwards, so decoding and the cache
  follow the clean model exactly;
* at prefill, the last prompt position gets the same treatment, so the first
  generated token has its uncertainty too.

``generate`` sees the clean logits (or the mean predictive distribution with
``decode="mean"``); the ``[B, M, V]`` sample logits of the step are kept for
:meth:`PerturbedModel.processor`, an :class:`~tokur_decode.hf.UncertaintyMonitor` that
records TokUR's total / aleatoric / epistemic uncertainty and implicit reward.

``mode="sequential"`` runs the ``M`` samples as ``M`` single-token passes per step (the
official implementation's cost) from the same noise draws: a reference for tests and
benchmarks.

The model's weights are never modified; on exit the hooks and the forward are removed.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterable

import torch

from ..core.perturbation import PerturbationConfig, bases_for, low_rank_noise, split_noise
from .monitor import UncertaintyMonitor
from .targets import find_targets

__all__ = ["PerturbedModel", "perturbed"]

_MASKABLE_ATTENTION = ("sdpa", "eager")


class PerturbedModel:
    """A causal LM whose cached forward passes also compute TokUR's perturbed samples.

    Use through :func:`perturbed`. Attributes after each forward pass:
    ``last_samples`` (``[B, M, V]`` logits, sample 0 clean) and ``forward_count``.
    """

    def __init__(self, model, config: PerturbationConfig, cache_dir=None) -> None:
        self.model = model
        self.config = config
        self.targets = find_targets(model, config)
        attn = getattr(model.config, "_attn_implementation", "eager")
        if config.mode == "batched" and attn not in _MASKABLE_ATTENTION:
            raise ValueError(
                f"mode: the batched mode needs a custom 4-D attention mask, which "
                f"attn_implementation={attn!r} does not take; load the model with "
                f"attn_implementation='sdpa' or pass mode='sequential'"
            )
        self._eager = attn == "eager"
        self._window = _sliding_window(model.config)  # sliding-window cache layers, if any
        self._dtype = _compute_dtype(model)  # the compute dtype of noise and masks
        weights = {t.name: t.weight(self._dtype) for t in self.targets}
        self.bases = {
            name: basis.to(device=model.device, dtype=self._dtype)
            for name, basis in bases_for(weights, config.rank, config.direction, cache_dir).items()
        }
        self._noise_sizes = [
            config.rank if config.direction == "right" else t.size for t in self.targets
        ]
        self._forward_accepts_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self._hooks: list = []
        self._generator: torch.Generator | None = None
        self._eps: list[torch.Tensor] | None = None  # per module [B, M, size] for this step
        self._rows: tuple[int, slice] | None = None  # (first perturbed row, samples used)
        self.last_samples: torch.Tensor | None = None
        self.forward_count = 0

    # ------------------------------------------------------------------ context

    def __enter__(self) -> PerturbedModel:
        model = self.model
        if "forward" in vars(model):
            raise RuntimeError("model.forward is already wrapped (nested perturbed()?)")
        self._generator = torch.Generator(device=model.device).manual_seed(self.config.seed)
        for index, target in enumerate(self.targets):
            hook = functools.partial(self._hook, index)
            self._hooks.append(target.module.register_forward_hook(hook))
        original = model.forward

        @functools.wraps(original)
        def forward(*args, **kwargs):
            return self._forward(original, *args, **kwargs)

        model.forward = forward
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        vars(self.model).pop("forward", None)
        self._eps = self._rows = None
        self.last_samples = None

    def processor(self, signals: Iterable[str] | str = ("tokur",), **kwargs) -> UncertaintyMonitor:
        """An :class:`UncertaintyMonitor` that also records TokUR's signals (``"tokur"``)
        from this model's samples; other ``signals`` and ``kwargs`` as for the monitor."""
        return UncertaintyMonitor(signals, sample_source=self, **kwargs)

    # ------------------------------------------------------------------ noise

    def _hook(self, index: int, module, args, output):
        if self._rows is None:
            return output
        start, samples = self._rows
        target = self.targets[index]
        noise = low_rank_noise(
            args[0][:, start:].to(self._dtype),
            self.bases[target.name],
            self._eps[index][:, samples],
            1.0,
            self.config.direction,
        )
        output[:, start:, target.out] += noise  # the layer's fresh output; not for autograd
        return output

    def _draw(self, batch: int) -> None:
        """One RNG call per step: eps for every module, row and sample, times sigma."""
        flat = torch.randn(
            batch,
            self.config.samples,
            sum(self._noise_sizes),
            generator=self._generator,
            device=self.model.device,
        )
        self._eps = split_noise((flat * self.config.sigma).to(self._dtype), self._noise_sizes)

    # ------------------------------------------------------------------ forward

    def _forward(self, original, *args, **kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("past_key_values")
        if input_ids is None or cache is None or not hasattr(cache, "crop") or args:
            return original(*args, **kwargs)  # not a cached generation step: untouched
        self._draw(input_ids.shape[0])
        try:
            if self.config.mode == "batched":
                out, samples = self._batched(original, input_ids, cache, kwargs)
            else:
                out, samples = self._sequential(original, input_ids, cache, kwargs)
        finally:
            self._rows = None
        self.last_samples = samples
        self.forward_count += 1
        if self.config.decode == "mean":
            lp = torch.log_softmax(samples.float(), dim=-1)
            out.logits = (torch.logsumexp(lp, dim=1, keepdim=True)).to(out.logits.dtype)
        else:
            out.logits = samples[:, :1]
        return out

    def _batched(self, original, input_ids, cache, kwargs):
        b, s = input_ids.shape
        m = self.config.samples
        past = cache.get_seq_length()
        q = s + m - 1
        device = input_ids.device
        ids = torch.cat([input_ids, input_ids[:, -1:].expand(b, m - 1)], dim=1)

        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(past, past + s, device=device).unsqueeze(0).expand(b, s)
        positions = torch.cat([positions, positions[:, -1:].expand(-1, m - 1)], dim=1)

        # Query i < s is clean token i (storage index past + i): causal as usual.
        # Query i >= s is a copy of the last token: it sees the prefix before the last
        # token and itself (storage index past + i).
        keys = torch.arange(past + q, device=device)
        own = past + torch.arange(q, device=device)
        causal = keys <= own.unsqueeze(-1)
        copy_view = (keys < past + s - 1) | (keys == own.unsqueeze(-1))
        allowed = torch.where((torch.arange(q, device=device) < s).unsqueeze(-1), causal, copy_view)
        mask2d = kwargs.get("attention_mask")
        if mask2d is not None:
            valid = torch.cat([mask2d.bool(), mask2d.new_ones(b, m - 1, dtype=torch.bool)], dim=1)
            allowed = allowed.unsqueeze(0) & valid.unsqueeze(1)
        allowed = allowed | (keys == own.unsqueeze(-1))  # a padded query still sees itself
        mask = self._as_mask(allowed.expand(b, q, past + q).unsqueeze(1))
        window = self._window
        if window is not None:
            # Sliding-window layers (Gemma 2 / 3) keep the last window - 1 tokens of the
            # past and see keys within the window of the query's token (a copy's token
            # is the last one): their own mask, over their own keys.
            at = torch.where(torch.arange(q, device=device) < s, own, past + s - 1)
            near = keys > at.unsqueeze(-1) - window
            kept = min(past, window - 1)
            sliding = (allowed & near)[..., past - kept :]
            mask = {
                "full_attention": mask,
                "sliding_attention": self._as_mask(sliding.expand(b, q, kept + q).unsqueeze(1)),
            }

        call = {
            k: v
            for k, v in kwargs.items()
            if k not in ("input_ids", "attention_mask", "position_ids")
        }
        call.update(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        if "cache_position" in kwargs:
            call["cache_position"] = torch.arange(past, past + q, device=device)
        if self._forward_accepts_keep:
            call["logits_to_keep"] = m
        self._rows = (s, slice(1, m))
        _keep_past(cache)
        out = original(**call)
        cache.crop(-(m - 1))  # drop the copies' K/V (negative: number of tokens removed)
        return out, out.logits[:, -m:]

    def _as_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A boolean mask as the attention implementation takes it (eager: additive)."""
        if not self._eager:
            return allowed
        blank = torch.zeros(allowed.shape, dtype=self._dtype, device=allowed.device)
        return blank.masked_fill(~allowed, torch.finfo(self._dtype).min)

    def _sequential(self, original, input_ids, cache, kwargs):
        s = input_ids.shape[1]
        mask2d = kwargs.get("attention_mask")
        positions = kwargs.get("position_ids")
        rest = {
            k: v
            for k, v in kwargs.items()
            if k not in ("input_ids", "attention_mask", "position_ids", "cache_position")
        }
        if self._forward_accepts_keep:
            rest["logits_to_keep"] = 1

        def part(tensor, index):
            return None if tensor is None else tensor[:, index]

        if s > 1:  # the prompt up to its last token, clean
            original(
                input_ids=input_ids[:, :-1],
                attention_mask=part(mask2d, slice(None, -1)),
                position_ids=part(positions, slice(None, -1)),
                **rest,
            )
        last = {
            "input_ids": input_ids[:, -1:],
            "attention_mask": mask2d,
            "position_ids": part(positions, slice(-1, None)),
        }
        logits = [None] * self.config.samples
        _keep_past(cache)
        for sample in [*range(1, self.config.samples), 0]:  # clean pass last: its K/V stay
            self._rows = (0, slice(sample, sample + 1)) if sample else None
            out = original(**last, **rest)
            logits[sample] = out.logits[:, -1]
            if sample:
                cache.crop(-1)
        return out, torch.stack(logits, dim=1)


def perturbed(
    model,
    *,
    rank: int = 8,
    sigma: float = 0.1,
    samples: int = 10,
    seed: int = 0,
    target_modules: Iterable[str] = ("q_proj", "v_proj"),
    direction: str = "right",
    decode: str = "clean",
    mode: str = "batched",
    cache_dir=None,
) -> PerturbedModel:
    """Context manager: TokUR samples on a stock transformers causal LM.

    Works on any model whose blocks have ``nn.Linear`` layers named like
    ``target_modules`` (Llama, Qwen2, Mistral, SmolLM2, ...), with the ``sdpa`` or
    ``eager`` attention (batched mode) or any attention (``mode="sequential"``).
    Options as in :class:`~tokur_decode.core.perturbation.PerturbationConfig`; the SVD
    bases are cached in ``cache_dir`` (default: :func:`tokur_decode.core.cache.cache_dir`).

    Raises:
        ValueError: naming the parameter (rank, sigma, samples, target_modules, ...).

    Example:
        >>> import torch
        >>> from tokur_decode.hf import perturbed
        >>> from tokur_decode.models import tiny_model
        >>> model = tiny_model("qwen2", vocab_size=64)
        >>> with perturbed(model, samples=4, rank=2) as pm:
        ...     monitor = pm.processor(["tokur", "entropy"])
        ...     out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False,
        ...                          logits_processor=[monitor], return_dict_in_generate=True)
        >>> trace = monitor.trace(out)
        >>> sorted(k for k in trace.signals if k.startswith("tokur"))
        ['tokur_aleatoric', 'tokur_epistemic', 'tokur_reward', 'tokur_total']
    """
    config = PerturbationConfig(
        rank=rank,
        sigma=sigma,
        samples=samples,
        seed=seed,
        target_modules=tuple(target_modules)
        if not isinstance(target_modules, str)
        else target_modules,
        direction=direction,
        decode=decode,
        mode=mode,
    )
    return PerturbedModel(model, config, cache_dir=cache_dir)


def _sliding_window(config) -> int | None:
    """The window of a model whose cache has sliding-window layers (``None``: none)."""
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return config.sliding_window
    return None


def _keep_past(cache) -> None:
    """Let sliding-window cache layers keep the states a crop removes (the copies')."""
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()


def _compute_dtype(model) -> torch.dtype:
    """The dtype the model computes in: its first floating-point parameter's (a
    quantised model also stores integer weights)."""
    return next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
