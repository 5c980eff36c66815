"""TokUR inside stock vLLM: engine arguments, model registration, the processor's link.

TokUR (docs/reference.md 1.2) needs ``M`` forward passes per step, ``M - 1`` of them with
low-rank noise on the q/v projections. In vLLM this is a model class of ours, vLLM's
own class for the checkpoint's architecture (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE,
Gemma 2 and 3, Phi-3: :data:`ARCHITECTURES`) with one mixin
(:mod:`tokur_decode.vllm.tokur_models`), that vLLM builds for the checkpoint instead of
its own. No fork and no converted checkpoint: :func:`tokur_engine_args` returns the
``LLM`` arguments that do it:

* ``hf_overrides``: a picklable callable that renames the checkpoint's architecture
  (``LlamaForCausalLM -> TokurLlamaForCausalLM``) and stores the TokUR settings in the
  model's config, where the model class reads them in the worker process;
* ``enforce_eager=True``: the noise is added by forward hooks on the fused
  ``qkv_proj``, which a compiled or graph-captured forward would skip.

The architecture names are registered with ``vllm.ModelRegistry`` by :func:`register`,
which the package declares as a ``vllm.general_plugins`` entry point, so every vLLM
process (the caller's and the engine's, forked or spawned) knows them;
:func:`tokur_engine_args` also calls it.

Requests opt in per request with ``uncertainty_args(signals=["tokur", ...])``; the
:class:`~tokur_decode.vllm.UncertaintyProcessor` and the model meet through a
:class:`TokurLink` (one per engine, in the worker process): before each forward the
processor publishes the batch rows whose request asked for TokUR (:meth:`TokurLink.
publish`: under V1 from ``update_state``, under MRV2 from the batch the runner builds
before the forward, once the worker extension has bound it); the model runs
its perturbed passes for those rows only when there are any, and leaves the ``[R, M,
V]`` sample logits in :attr:`TokurLink.samples` for the processor's ``apply``.

Example:
    >>> args = tokur_engine_args(rank=8, sigma=0.1, samples=10)
    >>> args["enforce_eager"], args["hf_overrides"].settings["samples"]
    (True, 10)
    >>> tokur_engine_args(samples=0)
    Traceback (most recent call last):
    ...
    ValueError: samples must be a positive integer, got 0
    >>> from vllm import LLM                                            # doctest: +SKIP
    >>> from tokur_decode.vllm import UncertaintyProcessor, uncertainty_args
    >>> engine = LLM(model=path, logits_processors=[UncertaintyProcessor],
    ...              **tokur_engine_args(rank=8, sigma=0.1, samples=10))  # doctest: +SKIP
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch

from ..core.perturbation import PerturbationConfig
from ..core.signals import REGISTRY

__all__ = [
    "ARCHITECTURES",
    "TOKUR_OUTPUTS",
    "TOKUR_STEP_OUTPUTS",
    "TokurLink",
    "is_tokur_engine",
    "link_of",
    "register",
    "tokur_engine_args",
]

#: The checkpoint architectures TokUR supports in vLLM (each checked in
#: ``tests/test_architectures.py``; docs/architectures.md), and the name of our class:
#: vLLM's own class with :class:`~tokur_decode.vllm.tokur_models.PerturbedMixin`.
ARCHITECTURES = {
    arch: f"Tokur{arch}"
    for arch in (
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "Gemma2ForCausalLM",
        "Gemma3ForCausalLM",
        "Phi3ForCausalLM",
    )
}
#: The trace columns of the ``"tokur"`` signal: TU / AU / EU, known at the step, and the
#: implicit reward, which needs the emitted token (completed at the next step).
TOKUR_OUTPUTS = REGISTRY["tokur"].keys
#: The ones known at the step.
TOKUR_STEP_OUTPUTS = REGISTRY["tokur"].step_keys
#: The q/k/v slices of vLLM's fused ``qkv_proj`` that can be perturbed.
TARGETS = ("q_proj", "k_proj", "v_proj")
#: Attribute of the model's (HF) config that carries the settings into the worker.
CONFIG_KEY = "tokur_perturbation"


def register() -> None:
    """Register our architectures with vLLM (lazily: the model module is imported only
    when vLLM builds the model). Idempotent; the ``vllm.general_plugins`` entry point."""
    from vllm import ModelRegistry

    known = set(ModelRegistry.get_supported_archs())
    for ours in ARCHITECTURES.values():
        if ours not in known:
            ModelRegistry.register_model(ours, f"tokur_decode.vllm.tokur_models:{ours}")


@dataclass(frozen=True, eq=False)
class TokurOverrides:
    """The ``hf_overrides`` callable: our architecture name and the settings (a plain
    dict, so that the config stays serialisable)."""

    settings: dict

    def __call__(self, config):
        archs = [a for a in getattr(config, "architectures", None) or [] if a]
        if not archs:  # vLLM probes the callable with an empty config first
            return config
        for key, value in self.for_architectures(archs).items():
            setattr(config, key, value)
        return config

    def for_architectures(self, archs: list[str]) -> dict:
        """The same overrides as a JSON-able dict, for a checkpoint of architectures
        ``archs`` (what ``vllm serve --hf-overrides`` takes).

        Example:
            >>> TokurOverrides({"samples": 4}).for_architectures(["LlamaForCausalLM"])
            {'architectures': ['TokurLlamaForCausalLM'], 'tokur_perturbation': {'samples': 4}}
        """
        ours = set(ARCHITECTURES.values())
        refused = [a for a in archs if a not in ARCHITECTURES and a not in ours]
        if refused:
            raise ValueError(
                f"model: TokUR in vLLM supports {sorted(ARCHITECTURES)}; the checkpoint's "
                f"architecture is {refused[0]} (docs/architectures.md says what each needs)"
            )
        return {
            "architectures": [ARCHITECTURES.get(a, a) for a in archs],
            CONFIG_KEY: dict(self.settings),
        }


def tokur_engine_args(
    *,
    rank: int = 8,
    sigma: float = 0.1,
    samples: int = 10,
    seed: int = 0,
    target_modules=("q_proj", "v_proj"),
    direction: str = "right",
    mode: str = "batched",
    cache_dir: str | os.PathLike | None = None,
    **engine_kwargs,
) -> dict:
    """``kwargs`` for ``vllm.LLM`` (or ``engine_args``) that make the engine compute
    TokUR's samples for the requests that ask for ``"tokur"``.

    Args:
        rank, sigma, samples, direction: as in
            :class:`~tokur_decode.core.perturbation.PerturbationConfig` (``samples`` is
            ``M``, sample 0 being the clean model that decodes and fills the cache).
        seed: seeds every request's own noise stream: a request's uncertainties do not
            depend on what else is in the batch.
        target_modules: slices of the fused ``qkv_proj`` perturbed: any of
            ``q_proj``, ``k_proj``, ``v_proj`` (TokUR: q and v).
        mode: ``"batched"`` (the ``M - 1`` perturbed samples as extra rows of one
            forward; vLLM's CPU attention backend) or ``"sequential"`` (``M`` decoder
            passes per step, any backend): see :mod:`tokur_decode.vllm.tokur_models`.
        cache_dir: where the SVD bases are cached (the transformers path's cache,
            :func:`tokur_decode.models.cache_dir`, by default).
        engine_kwargs: other ``LLM`` arguments, returned with ours
            (``enforce_eager=False`` is refused).

    Raises:
        ValueError: naming the parameter.
    """
    targets = (target_modules,) if isinstance(target_modules, str) else tuple(target_modules)
    if not targets or any(t not in TARGETS for t in targets):
        raise ValueError(f"target_modules must be among {TARGETS}, got {target_modules!r}")
    config = PerturbationConfig(
        rank=rank,
        sigma=sigma,
        samples=samples,
        seed=seed,
        target_modules=targets,
        direction=direction,
        mode=mode,
    )
    if engine_kwargs.get("enforce_eager", True) is not True:
        raise ValueError("enforce_eager: TokUR's noise hooks need an eager forward")
    if "hf_overrides" in engine_kwargs:
        raise ValueError("hf_overrides: TokUR sets the architecture through hf_overrides")
    settings = {k: v for k, v in asdict(config).items() if k != "decode"} | {
        "cache_dir": None if cache_dir is None else str(cache_dir)
    }
    settings["target_modules"] = list(targets)
    register()
    return {**engine_kwargs, "enforce_eager": True, "hf_overrides": TokurOverrides(settings)}


def is_tokur_engine(engine) -> bool:
    """Whether the ``vllm.LLM`` ``engine`` was built with :func:`tokur_engine_args`."""
    return hasattr(engine.llm_engine.model_config.hf_config, CONFIG_KEY)


def settings_of(hf_config) -> tuple[PerturbationConfig, str | None]:
    """The validated settings and the bases' cache folder stored by
    :class:`TokurOverrides` in a model's config."""
    settings = dict(getattr(hf_config, CONFIG_KEY))
    cache_dir = settings.pop("cache_dir")
    settings["target_modules"] = tuple(settings["target_modules"])
    return PerturbationConfig(**settings), cache_dir


@dataclass(eq=False)
class TokurLink:
    """What the processor and the perturbed model of one engine share (both live in
    the engine's worker process).

    The processor writes :attr:`rows` (batch rows whose request asked for TokUR, in the
    order it will read the samples back) with :meth:`publish`; the model reads them in
    its forward, draws each row's noise from that request's own generator
    (:attr:`generators`), scaled by the request's :attr:`sigma`, and leaves ``[R, M, V]``
    logits in :attr:`samples`, sample 0 clean. :attr:`config` is set when the model is
    built (``None``: the engine has no TokUR model).
    """

    config: PerturbationConfig | None = None
    rows: torch.Tensor | None = None  # [R] long, on the logits' device
    sigma: torch.Tensor | None = None  # [R] float32: each request's noise scale
    span: int = 0  # 1 + the largest row: a batch with fewer rows is not ours
    generators: list[torch.Generator] = field(default_factory=list)
    samples: torch.Tensor | None = None  # [R, M, V] logits of the last forward
    steps: int = 0  # forwards with asking rows (a plain counter)
    batched_steps: int = 0  # of those, how many ran as one batched forward
    check: str | None = None  # diagnostics: None, "on" or "broken" (see tokur_check)
    checks: list[dict] = field(default_factory=list)  # what the diagnostics found
    _streams: dict[int, torch.Generator] = field(default_factory=dict)

    def publish(self, rows: list[int], keys: list[int], sigmas: list[float | None], device) -> None:
        """Rows that want samples from now on, each with its request's key (a request
        keeps its noise stream while it lives, across steps and batch moves) and noise
        scale (``None``: the engine's ``sigma``)."""
        if not rows or self.config is None:
            self.rows, self.sigma, self.generators, self.span = None, None, [], 0
            return
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        scales = [self.config.sigma if s is None else s for s in sigmas]
        self.sigma = torch.tensor(scales, dtype=torch.float32, device=device)
        self.generators = [self._stream(key, device) for key in keys]
        self.span = max(rows) + 1

    def forget(self, key: int) -> None:
        """A request finished: drop its noise stream."""
        self._streams.pop(key, None)

    def _stream(self, key: int, device: torch.device) -> torch.Generator:
        if key not in self._streams:
            gen = torch.Generator(device=device)
            self._streams[key] = gen.manual_seed(self.config.seed)
        return self._streams[key]


_LINKS: dict[str, TokurLink] = {}


def link_of(vllm_config) -> TokurLink:
    """The engine's :class:`TokurLink` (keyed by ``vllm_config.instance_id``, which the
    engine's processor and model share even where the config was copied)."""
    return _LINKS.setdefault(vllm_config.instance_id, TokurLink())
