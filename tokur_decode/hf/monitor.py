"""A transformers ``LogitsProcessor`` that records uncertainty signals at every step."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import LogitsProcessor

from ..core.logit_stats import LogitStats, read_logits
from ..core.recording import check_alternatives
from ..core.signals import (
    CHOSEN_SIGNALS,
    DEFAULT_SIGNALS,
    REGISTRY,
    SAMPLE_SIGNALS,
    SignalSpec,
    Workspace,
    bayesian_terms,
    chosen_signals,
    implicit_reward,
    logit_signals,
    parse_signals,
)
from ..core.text import decode_rows
from ..core.trace import Alternatives, StepBuffer, Trace
from .clock import StepClock

__all__ = ["UncertaintyMonitor"]

#: TokUR's outputs known at their step (the implicit reward waits for the emitted token).
_TOKUR_STEP = REGISTRY["tokur"].step_keys


class UncertaintyMonitor(LogitsProcessor):
    r"""Record token-level uncertainty signals during ``model.generate``.

    The monitor returns the scores unchanged; it computes the requested signals of
    every row at every step in one fused pass (:class:`~tokur_decode.core.signals.SignalSpec`)
    into preallocated buffers on the logits' device, with no host synchronisation.
    After generation, :meth:`trace` turns them into a :class:`~tokur_decode.core.trace.Trace`.

    **Place it first** in ``logits_processor`` to measure the model's raw distribution.
    transformers runs user processors after its own non-warping ones (repetition
    penalty, ``min_new_tokens``, bad words, ...) and before temperature / top-k / top-p;
    a monitor placed after a masking processor (e.g. a grammar) measures the masked
    distribution instead (masked entries count as probability 0).

    Alignment: step ``t`` of the trace holds the distribution the ``t``-th generated
    token was drawn from; step 0 is the first token after the prompt. The chosen-token
    signals (``chosen_prob``, ``chosen_logprob``) are completed at the next step, when
    the emitted token appears in ``input_ids``, and for the last step by :meth:`trace`.

    Works with batches (left padding), greedy and sampling, ``num_return_sequences``
    (rows in the order of ``sequences``), and rows that finish early (steps after a
    row's EOS are excluded by the trace's ``lengths``). A new ``generate`` call
    starts a fresh record (detected from the shape of ``input_ids``; call
    :meth:`reset` to force it). Beam search and assisted decoding reorder or rewind
    rows and are not supported.

    Args:
        signals: names from :data:`tokur_decode.core.signals.SIGNALS`, ``"all"``, or
            ``"tokur"`` (with a ``sample_source``: total, aleatoric and epistemic
            uncertainty and the implicit reward of TokUR).
        eos_token_id: id(s) that end a response; when ``None``, :meth:`trace` takes the
            tokenizer's ``eos_token_id``.
        deepconf_k, logtoku_k, logtoku_evidence: see :class:`~tokur_decode.core.signals.SignalSpec`.
        capacity: initial number of steps preallocated (grows by doubling).
        alternatives: record each step's ``k`` most probable tokens and their
            probabilities (``trace.alternatives``; 0: none).
        sample_source: an object whose ``last_samples`` holds the ``[B, M, V]`` logits of
            the current step's predictive samples and ``forward_count`` counts forward
            passes (a :class:`~tokur_decode.hf.PerturbedModel`; use its ``processor()``).

    Raises:
        ValueError: naming the parameter, for unknown signals or invalid values.

    Example:
        >>> from transformers import AutoTokenizer
        >>> from tokur_decode.hf import UncertaintyMonitor
        >>> from tokur_decode.models import tiny_model
        >>> import torch
        >>> model = tiny_model("llama")
        >>> monitor = UncertaintyMonitor(["entropy", "chosen_prob"], eos_token_id=255)
        >>> out = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=5, do_sample=False,
        ...                      logits_processor=[monitor], return_dict_in_generate=True)
        >>> trace = monitor.trace(out)
        >>> trace.signals["entropy"].shape[1] == out.sequences.shape[1] - 3
        True
    """

    supports_continuous_batching = False

    def __init__(
        self,
        signals: Iterable[str] | str = DEFAULT_SIGNALS,
        *,
        eos_token_id: int | Sequence[int] | None = None,
        deepconf_k: int = 20,
        logtoku_k: int = 2,
        logtoku_evidence: str = "relu",
        capacity: int = 256,
        sample_source=None,
        alternatives: int = 0,
    ) -> None:
        names = parse_signals(signals)
        self.alternatives = check_alternatives(alternatives)
        self.sample_signals = tuple(n for n in names if n in SAMPLE_SIGNALS)
        if self.sample_signals and sample_source is None:
            raise ValueError(
                "signals: 'tokur' needs perturbed samples; use "
                "`with tokur_decode.hf.perturbed(model) as pm: pm.processor([...])`"
            )
        self.sample_source = sample_source
        self.spec = SignalSpec(
            logit_signals(names),
            deepconf_k=deepconf_k,
            logtoku_k=logtoku_k,
            logtoku_evidence=logtoku_evidence,
        )
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.eos_token_ids = as_id_list(eos_token_id, "eos_token_id")
        self.capacity = capacity
        self._chosen = tuple(n for n in self.spec.signals if n in CHOSEN_SIGNALS)
        computed = tuple(n for n in self.spec.signals if n not in CHOSEN_SIGNALS)
        self._step_spec = (
            SignalSpec(
                computed,
                deepconf_k=deepconf_k,
                logtoku_k=logtoku_k,
                logtoku_evidence=logtoku_evidence,
            )
            if computed
            else None
        )
        self._tokur = bool(self.sample_signals)
        # Values of step t known at step t, then those that need its emitted token
        # (written at step t + 1): each group is one contiguous block of the buffer.
        self._step_names = (self._step_spec.output_names if self._step_spec else ()) + (
            _TOKUR_STEP if self._tokur else ()
        )
        self._deferred_names = self._chosen + (("tokur_reward",) if self._tokur else ())
        k = range(self.alternatives)  # ids (exact in float32) then probabilities
        self._alt_names = tuple(f"_alt_id{j}" for j in k) + tuple(f"_alt_prob{j}" for j in k)
        self.output_names = self.spec.output_names + (
            SAMPLE_SIGNALS["tokur"] if self._tokur else ()
        )
        self._workspace = Workspace()  # the kept logits, reused from step to step
        self.reset()

    def reset(self) -> None:
        """Forget the current record; the next call starts a new one."""
        self._buffer: StepBuffer | None = None
        self._clock = StepClock()
        self._clear_pending()

    def _clear_pending(self) -> None:
        """Forget what the previous step left for the next one."""
        self._last_read: LogitStats | None = None
        self._last_bayes: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_forward = -1

    # ------------------------------------------------------------------ hot path

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if scores.dim() != 2 or input_ids.dim() != 2 or scores.shape[0] != input_ids.shape[0]:
            raise ValueError(  # shapes are host metadata: checking them syncs nothing
                f"scores: expected [batch, vocab] logits beside [batch, length] input_ids, got "
                f"{tuple(scores.shape)} and {tuple(input_ids.shape)}"
            )
        batch = input_ids.shape[0]
        step, new = self._clock.tick(input_ids)
        if new:
            self._start(batch, scores.device)
        buf = self._buffer
        if step > 0 and self._deferred_names:
            buf.write(step - 1, self._deferred(input_ids[:, -1]))
        values: dict[str, torch.Tensor] = {}
        keep = bool(self._chosen)  # their token is known at the next step
        if self._step_spec is not None:
            values, read = self._step_spec.compute(
                scores, top=self.alternatives, keep=keep, workspace=self._workspace
            )
        elif keep or self.alternatives:
            read = read_logits(scores, top=self.alternatives, keep=keep, workspace=self._workspace)
        if keep:
            self._last_read = read
        if self._tokur:
            values = {**values, **self._tokur_step(batch)}
        if self.alternatives:
            alt = Alternatives.of_stats(read, self.alternatives)
            columns = torch.cat([alt.ids.to(alt.probs.dtype), alt.probs], dim=-1).float()
            values |= dict(zip(self._alt_names, columns.unbind(-1), strict=True))
        if values:
            buf.write(step, values)
        return scores

    def check_step_output(self, name: str) -> None:
        """``ValueError`` unless ``name`` is an output this monitor knows at its step (not
        ``chosen_*`` or ``tokur_reward``, which wait for the emitted token)."""
        if name not in self._step_names:
            raise ValueError(
                f"signal: {name!r} is not a step-time output of this monitor "
                f"(have {list(self._step_names)})"
            )

    def values(self, name: str) -> torch.Tensor:
        """Output ``name`` of every step so far, ``[B, steps]`` (a view; see
        :meth:`check_step_output` for which outputs are complete)."""
        self.check_step_output(name)
        return self._buffer.view(self._clock.steps)[name]

    def latest(self, name: str) -> torch.Tensor:
        """Output ``name`` at the last step, ``[B]``."""
        return self.values(name)[:, -1]

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (``[B']``, repeats allowed) for the rest of the record, as a
        decoding controller forks rows (see :mod:`tokur_decode.hf.controller`)."""
        self._buffer.select_rows(index)
        self._clock.batch_size = len(index)
        if self._last_read is not None:
            self._last_read = self._last_read.select_rows(index)
        if self._last_bayes is not None:
            self._last_bayes = tuple(t.index_select(0, index) for t in self._last_bayes)

    def _tokur_step(self, batch: int) -> dict[str, torch.Tensor]:
        source = self.sample_source
        samples = source.last_samples
        if samples is None or source.forward_count == self._last_forward:
            raise RuntimeError(
                "tokur: no perturbed samples for this step; call generate inside "
                "`with perturbed(model) as pm:` and use pm.processor(...)"
            )
        if samples.shape[0] != batch:
            raise RuntimeError(f"tokur: samples for {samples.shape[0]} rows, scores for {batch}")
        self._last_forward = source.forward_count
        out, lp, log_pbar = bayesian_terms(samples)
        self._last_bayes = (lp, log_pbar)
        return {f"tokur_{k}": v for k, v in out.items()}

    def _deferred(self, emitted: torch.Tensor) -> dict[str, torch.Tensor]:
        """Values of the previous step that need its emitted tokens ``[B]``."""
        values = chosen_signals(self._last_read, emitted, self._chosen) if self._chosen else {}
        if self._tokur:
            values["tokur_reward"] = implicit_reward(*self._last_bayes, emitted)
        return values

    def _start(self, batch: int, device: torch.device) -> None:
        """A new generation (the clock has already restarted): fresh buffers and state."""
        self._clear_pending()
        self._buffer = StepBuffer(
            self._step_names + self._alt_names + self._deferred_names, batch, device, self.capacity
        )

    # ------------------------------------------------------------------ result

    def trace(self, output, tokenizer=None) -> Trace:
        """The trace of the last ``generate`` call.

        Args:
            output: what ``generate`` returned: the ``sequences`` tensor or the
                ``GenerateOutput`` (``return_dict_in_generate=True``).
            tokenizer: to decode each token's text and the responses (optional);
                also supplies ``eos_token_id`` when the monitor was built without one.

        Raises:
            ValueError: when ``output`` is not the output of the recorded generation.
        """
        if getattr(output, "beam_indices", None) is not None or hasattr(output, "sequences_scores"):
            raise ValueError(
                "output: beam search is not supported (it reorders and prunes rows between "
                "steps); use greedy decoding or sampling"
            )
        sequences = getattr(output, "sequences", output)
        if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
            raise ValueError("output: expected generate()'s sequences [B, L] or its output object")
        if self._buffer is None:
            raise ValueError("output: the monitor has not recorded any generation yet")
        steps, buf, prompt_len = self._clock.steps, self._buffer, self._clock.prompt_len
        if sequences.shape != (buf.batch_size, prompt_len + steps):
            beams = sequences.shape[0] < buf.batch_size and buf.batch_size % sequences.shape[0] == 0
            raise ValueError(
                f"output: sequences of shape {tuple(sequences.shape)} do not match the recorded "
                f"generation (batch {buf.batch_size}, prompt {prompt_len}, {steps} steps)"
                + ("; beam search (num_beams > 1) is not supported" if beams else "")
            )
        generated = sequences[:, prompt_len:].to(buf.device).clone()
        if self._deferred_names:
            # The buffers may be inference tensors (generate under inference_mode);
            # the clones below, made outside it, are normal tensors again.
            with torch.inference_mode():
                buf.write(steps - 1, self._deferred(generated[:, -1]))

        eos = self.eos_token_ids or as_id_list(getattr(tokenizer, "eos_token_id", None), "eos")
        lengths = _lengths_until_eos(generated, eos)
        recorded = buf.view(steps)
        signals = {name: recorded[name].clone() for name in self.output_names}
        tokens, texts = decode_rows(tokenizer, generated, lengths)
        alternatives = None
        if self.alternatives:
            k = self.alternatives
            columns = torch.stack([recorded[n] for n in self._alt_names], dim=-1)
            alternatives = Alternatives(columns[..., :k].long(), columns[..., k:].clone())
            if tokenizer is not None:
                alternatives = alternatives.with_tokens(tokenizer, lengths.tolist())
        return Trace(
            signals=signals,
            token_ids=generated,
            lengths=lengths,
            tokens=tokens,
            texts=texts,
            meta={
                "backend": "transformers",
                "measured_on": "logits as passed to the monitor (raw when it is first in the list)",
                "signal_params": {
                    "deepconf_k": self.spec.deepconf_k,
                    "logtoku_k": self.spec.logtoku_k,
                    "logtoku_evidence": self.spec.logtoku_evidence,
                },
            },
            alternatives=alternatives,
        )


def as_id_list(value, name: str) -> list[int]:
    """Token id(s) as a list (``None``: empty); ``ValueError`` naming ``name`` otherwise."""
    if value is None:
        return []
    ids = [value] if isinstance(value, int) else list(value)
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
        raise ValueError(f"{name} must be a non-negative int or a list of them, got {value!r}")
    return ids


def _lengths_until_eos(generated: torch.Tensor, eos: list[int]) -> torch.Tensor:
    """Tokens per row up to and including the first EOS (all of them without EOS)."""
    steps = generated.shape[1]
    if not eos:
        return torch.full((generated.shape[0],), steps, dtype=torch.long, device=generated.device)
    is_eos = torch.isin(generated, torch.tensor(eos, device=generated.device))
    position = torch.arange(steps, device=generated.device)
    first = (
        torch.where(is_eos, position, steps).amin(dim=1)
        if steps
        else position.new_zeros(len(generated))
    )
    return torch.clamp(first + 1, max=steps)
