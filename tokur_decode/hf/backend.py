"""The transformers adapter of the strategy layer: :class:`HFBackend`.

Plain, stopping and resampling decodes are one batched ``model.generate`` with the
:class:`~tokur_decode.hf.UncertaintyMonitor` first and the action's logits processor
after it (``num_return_sequences`` answers per prompt); branching, roll-back and
particles advancing in steps (:meth:`HFBackend.particles`) run in our own decoding
loop (:class:`~tokur_decode.hf.controller.Controller`). TokUR is
recorded inside :func:`~tokur_decode.hf.perturbed`.

Example:
    >>> from tokur_decode.strategies.backend import Request, Sampling
    >>> from tokur_decode.models import load_default
    >>> backend = HFBackend(*load_default())                     # doctest: +SKIP
    >>> request = Request(("entropy",), Sampling(temperature=0.7), n=2)
    >>> out = backend.decode(["What is 2 + 2?"], request)         # doctest: +SKIP
    >>> len(out.trace), out.prompt_of                            # doctest: +SKIP
    (2, [0, 0])
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch

from ..core.limits import check_context, check_logits_fit
from ..core.perturbation import PerturbationConfig, checked_options
from ..core.signals import wants_samples
from ..core.steps import StepEnds
from ..core.text import encode_prompts
from ..core.trace import Trace
from ..strategies import backend as acts
from ..strategies.backend import deferred as build_on_first_use
from .actions import ResampleOnTrigger, StopOnTrigger
from .branching import BranchPolicy
from .controller import Controller
from .monitor import UncertaintyMonitor, as_id_list
from .particles import HFParticles, step_ends
from .rollback import RollbackPolicy
from .tokur import perturbed

__all__ = ["HFBackend", "sampling_kwargs"]


def sampling_kwargs(temperature: float, top_p: float = 1.0) -> dict:
    """``generate`` keywords for sampling at ``temperature`` (> 0) or greedy decoding (0;
    the model's own sampling defaults are switched off)."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p}
    return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


class HFBackend:
    """A transformers causal LM as a :class:`~tokur_decode.strategies.Backend`.

    Args:
        model, tokenizer: the model and its tokenizer
            (``HFBackend.deferred(loader, model_name=..., **the rest)``: loaded on first
            use, see :func:`~tokur_decode.strategies.backend.deferred`).
        chat: chat template use (``None``: when the tokenizer has one).
        batch_size: prompts per batched call (``None``: all at once); batch ``k``
            starting at prompt ``i`` is seeded with ``seed + i``.
        tokur: TokUR's options where a request records ``"tokur"`` and does not set
            them (the lowest level of the precedence: the caller's, the recipe's, these,
            :class:`~tokur_decode.core.perturbation.PerturbationConfig`'s defaults).
        model_name: how :meth:`describe` names the model (default: its
            ``name_or_path``).
        signal_params: monitor and action options (``logtoku_k``, ``deepconf_k``,
            ``logtoku_evidence``).
    """

    acts = (acts.StopAct, acts.ResampleAct, acts.BranchAct, acts.RollbackAct, acts.StepsAct)

    def __init__(
        self,
        model,
        tokenizer,
        *,
        chat: bool | None = None,
        batch_size: int | None = None,
        tokur: dict | None = None,
        model_name: str | None = None,
        **signal_params,
    ) -> None:
        _check_batch_size(batch_size)
        self.model, self.tokenizer, self.chat = model, tokenizer, chat
        self.batch_size = batch_size
        self.tokur = checked_options(tokur) or {}
        self.signal_params = signal_params
        self.model_name = model_name or getattr(model, "name_or_path", type(model).__name__)
        eos = model.generation_config.eos_token_id
        self.eos_token_id = tokenizer.eos_token_id if eos is None else eos
        self._step_ends: dict[str, StepEnds] = {}  # by delimiter

    deferred = classmethod(build_on_first_use)

    @classmethod
    def description(
        cls,
        model_name: str,
        dtype: str | None,
        chat: bool | None = None,
        batch_size: int | None = None,
        tokur: dict | None = None,
        **signal_params,
    ) -> dict:
        """What :meth:`describe` says of a backend built with these arguments."""
        _check_batch_size(batch_size)
        tokur = checked_options(tokur) or {}
        return acts.description("hf", model_name, dtype, chat, signal_params, tokur=tokur)

    #: The model's dtype as :meth:`describe` reports it (a deferred backend: the one
    #: asked of its loader; else the model's).
    dtype: str | None = None

    def describe(self) -> dict:
        dtype = self.dtype or str(self.model.dtype).removeprefix("torch.")
        return self.description(
            self.model_name, dtype, self.chat, tokur=self.tokur, **self.signal_params
        )

    def score(
        self,
        prompts: Sequence,
        responses: Sequence[Sequence[int]],
        *,
        signals: Sequence[str],
        tokur_seed: int | None = None,
    ) -> Trace:
        """The trace of saved ``responses`` (token ids) teacher-forced after their
        prompts (:func:`tokur_decode.hf.scoring.score`); TokUR with this backend's
        options, ``tokur_seed`` as its noise seed when given."""
        from .scoring import score

        tokur = dict(self.tokur) if wants_samples(signals) else None
        if tokur is not None and tokur_seed is not None:
            tokur["seed"] = tokur_seed
        return score(
            self.model,
            self.tokenizer,
            list(prompts),
            list(responses),
            signals=list(signals),
            tokur=tokur,
            chat=self.chat,
            batch_size=self.batch_size or len(prompts),
            **self.signal_params,
        )

    def decode(self, prompts: Sequence[str], request: acts.Request) -> acts.Decoded:
        sampling, n, act = request.sampling, request.n, request.act
        size = self.batch_size or len(prompts)
        self._check_fits(min(size, len(prompts)) * n, request)
        parts = []
        for start in range(0, len(prompts), size):
            seed = None if sampling.seed is None else sampling.seed + start
            chunk = list(prompts[start : start + size])
            thresholds = act.thresholds if isinstance(act, acts.StopAct) else None
            part_act = act
            if thresholds is not None:
                part_act = acts.StopAct(act.trigger, thresholds[start : start + size])
            with self._monitoring(request) as monitor:
                parts.append(self._decode(chunk, monitor, sampling, seed, n, part_act))
        return _joined(parts)

    @contextlib.contextmanager
    def particles(self, prompts: Sequence[str], request: acts.Request):
        """``request.n`` particles per prompt advancing in the steps of ``request.act``
        (a :class:`~tokur_decode.strategies.backend.StepsAct`), all in one batch of our
        decoding loop (``batch_size`` does not split it): a context manager giving
        :class:`~tokur_decode.hf.particles.HFParticles`."""
        if not isinstance(request.act, acts.StepsAct):
            raise ValueError("act: particles advance in Steps")
        sampling, n = request.sampling, request.n
        self._check_fits(len(prompts) * n, request)
        enc = self._encode(prompts, sampling)
        with self._monitoring(request) as monitor:
            controller = self._controller(monitor, sampling, sampling.seed)
            controller.start({k: v.repeat_interleave(n, dim=0) for k, v in enc.items()})
            ends = self._ends(request.act.delimiter)
            yield HFParticles(controller, ends, request.act.max_tokens, self.tokenizer)

    def _encode(self, prompts: Sequence[str], sampling: acts.Sampling):
        """The prompts as a left-padded batch on the model's device, each checked to fit
        the model's context with the answer budget."""
        enc = encode_prompts(self.tokenizer, prompts, chat=self.chat, device=self.model.device)
        context = getattr(self.model.config, "max_position_embeddings", None)
        check_context(enc["attention_mask"].sum(-1).tolist(), sampling.max_new_tokens, context)
        return enc

    def _tokur_options(self, request: acts.Request) -> dict:
        """TokUR's options for ``request``: its own over this backend's."""
        return {**self.tokur, **(request.tokur or {})}

    def _check_fits(self, rows: int, request: acts.Request) -> None:
        """Refuse, before decoding, rows whose step logits (TokUR's samples each) would not
        fit in the model's device memory (:func:`~tokur_decode.core.limits.check_logits_fit`)."""
        samples = 1
        if request.wants_samples:
            samples = PerturbationConfig(**self._tokur_options(request)).samples
        vocab = getattr(self.model.config, "vocab_size", None) or len(self.tokenizer)
        what = "n x batch_size" + (" x TokUR's samples" if samples > 1 else "")
        check_logits_fit(rows * samples, vocab, what=what, device=self.model.device)

    def _ends(self, delimiter: str) -> StepEnds:
        if delimiter not in self._step_ends:
            size = self.model.get_output_embeddings().weight.shape[0]
            self._step_ends[delimiter] = step_ends(
                self.tokenizer, delimiter, size, self.model.device
            )
        return self._step_ends[delimiter]

    def _controller(self, monitor, sampling: acts.Sampling, seed) -> Controller:
        return Controller(
            self.model,
            monitor,
            eos_token_ids=as_id_list(self.eos_token_id, "eos_token_id"),
            pad_token_id=self.tokenizer.pad_token_id,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=seed,
            max_new_tokens=sampling.max_new_tokens,
        )

    @contextlib.contextmanager
    def _monitoring(self, request: acts.Request):
        """A fresh monitor, inside :func:`perturbed` when TokUR is recorded, in inference
        mode."""
        options = self._tokur_options(request)
        context = perturbed(self.model, **options) if request.wants_samples else None
        with context or contextlib.nullcontext() as source, torch.inference_mode():
            yield UncertaintyMonitor(
                request.signals,
                eos_token_id=self.eos_token_id,
                sample_source=source,
                **dataclasses.asdict(request.recording),
                **self.signal_params,
            )

    def _decode(self, prompts, monitor, sampling, seed, n, act) -> acts.Decoded:
        if isinstance(act, acts.BranchAct | acts.RollbackAct):
            return self._controlled(prompts, monitor, sampling, seed, act)
        processor = self._processor(act, n)
        enc = self._encode(prompts, sampling)
        if seed is not None:
            torch.manual_seed(seed)
        out = self.model.generate(
            **enc,
            max_new_tokens=sampling.max_new_tokens,
            logits_processor=[monitor] + ([processor] if processor else []),
            pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            num_return_sequences=n,
            **sampling_kwargs(sampling.temperature, sampling.top_p),
        )
        trace = monitor.trace(out, self.tokenizer)
        events = processor.events(trace.lengths) if processor else [[] for _ in range(len(trace))]
        return acts.Decoded(
            trace=trace,
            prompt_of=[i for i in range(len(prompts)) for _ in range(n)],
            events=events,
            tokens=int(trace.lengths.sum()),
        )

    def _processor(self, act, n: int):
        if isinstance(act, acts.StopAct):
            thresholds = None
            if act.thresholds is not None:
                thresholds = [t for t in act.thresholds for _ in range(n)]
            return StopOnTrigger(
                act.trigger,
                eos_token_id=self.eos_token_id,
                thresholds=thresholds,
                **self.signal_params,
            )
        if isinstance(act, acts.ResampleAct):
            rule = act.rule
            coefficients = {name: getattr(rule, name) for name in rule.RULE}
            return ResampleOnTrigger(act.trigger, rule.mode, **coefficients, **self.signal_params)
        return None

    def _controlled(self, prompts, monitor, sampling, seed, act) -> acts.Decoded:
        """Branch or roll back in our own decoding loop."""
        c = act.config
        if isinstance(act, acts.BranchAct):
            policy = BranchPolicy(
                c.k,
                act.trigger,
                max_branch_points=c.max_branch_points,
                token_budget=c.token_budget or None,
            )
        else:
            policy = RollbackPolicy(
                act.trigger, rewind=c.rewind, temperature=c.temperature, max_retries=c.max_retries
            )
        enc = self._encode(prompts, sampling)
        controller = self._controller(monitor, sampling, seed)
        trace = controller.run(enc, policy, self.tokenizer)
        prompt_of = policy.origin if isinstance(act, acts.BranchAct) else list(range(len(prompts)))
        return acts.Decoded(trace, list(prompt_of), policy.events, int(controller.generated))


def _check_batch_size(batch_size) -> None:
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
    ):
        raise ValueError(f"batch_size: must be an integer >= 1 or None, got {batch_size!r}")


def _joined(parts: list[acts.Decoded]) -> acts.Decoded:
    """Batches' results as one (prompt indices offset by the prompts before them)."""
    if len(parts) == 1:
        return parts[0]
    prompt_of, offset = [], 0
    for part in parts:
        prompt_of += [offset + p for p in part.prompt_of]
        offset += max(part.prompt_of) + 1
    return acts.Decoded(
        trace=Trace.concat([p.trace for p in parts]),
        prompt_of=prompt_of,
        events=[e for p in parts for e in p.events],
        tokens=sum(p.tokens for p in parts),
    )
