"""Token-level uncertainty signals: pure, batched functions of one decoding step's logits.

Every function takes logits of shape ``[..., V]`` in any floating dtype (bf16, fp16,
fp32, fp64) on any device and returns a float32 tensor of shape ``[...]`` on the same
device. Computation happens in float32 (float64 when the input is float64), so half
precision inputs lose nothing beyond their own rounding.

Formulas (docs/reference.md section 1; ``p = softmax(z)``, ``lp = log_softmax(z)``):

==================  ==============================================================
``max_prob``        ``max_v p_v``
``chosen_logprob``  ``lp_y`` for the emitted token ``y`` (``chosen_prob = exp``)
``margin``          ``p_(1) - p_(2)`` (``p_(1)`` when ``V = 1``)
``entropy``         ``H = -sum_v p_v lp_v`` in nats
``varentropy``      ``sum_v p_v (lp_v + H)^2``
``self_certainty``  ``KL(U || p) = -log V' - mean_v lp_v`` over the ``V'`` finite entries
``deepconf``        ``-(1/k) sum_{j<=k} lp_(j)``, ``k = 20``; higher = more confident
``logtoku``         aleatoric / epistemic from top-K logits as Dirichlet evidence
==================  ==============================================================

Non-finite logits never produce NaN:

* ``-inf`` entries are *masked* (as top-k/top-p warpers and grammars produce them):
  they have probability 0, contribute 0 to entropy-type sums and are excluded from
  ``V'`` in self-certainty.
* ``NaN`` entries are treated as masked.
* A row containing ``+inf`` is the limit of a distribution concentrated on its
  ``+inf`` entries: it becomes uniform over them; its other entries have probability
  0 but stay finite (so ``self_certainty``, ``KL(U || p)``, is huge there, as its limit
  is ``+inf``), and LogTokU reads the ``+inf`` entries as huge evidence.
* A row with no finite entry at all carries no information: it is treated as uniform
  over the vocabulary (maximal uncertainty; LogTokU sees zero evidence).
* Log-probabilities entering ``deepconf`` and ``chosen_logprob`` are floored at
  ``LOGPROB_FLOOR = log(float32 tiny) ~ -87.3``, so a masked or underflowed token
  counts as "probability zero" instead of ``-inf``.

Use :func:`compute_signals` (or a reusable :class:`SignalSpec`) to compute several
signals from one read of the logits (:mod:`tokur_decode.core.logit_stats`: five row sums
and an exact top-k, compiled into two sweeps over the logits) shared by all.

Example:
    >>> import torch
    >>> from tokur_decode.core import signals
    >>> logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    >>> signals.entropy(logits)
    tensor([0.8324, 1.0986])
    >>> out = signals.compute_signals(logits, ["max_prob", "logtoku"])
    >>> sorted(out)
    ['logtoku_aleatoric', 'logtoku_epistemic', 'logtoku_unreliability', 'max_prob']
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from tokur_decode.core.logit_stats import (
    Compiled,
    LogitStats,
    Workspace,
    compute_dtype,
    log_tiny,
    logprobs,
    row_fields,
    rows_of,
    sanitized,
)

__all__ = [
    "CHOSEN_SIGNALS",
    "CONFIDENCE_KEYS",
    "DEFAULT_SIGNALS",
    "LOGPROB_FLOOR",
    "OUTPUTS",
    "REGISTRY",
    "SAMPLE_SIGNALS",
    "SIGNALS",
    "SPEC_PARAMS",
    "Output",
    "SignalInfo",
    "SignalSpec",
    "Workspace",
    "bayesian_decomposition",
    "bayesian_terms",
    "chosen_signals",
    "chosen_logprob",
    "compute_signals",
    "deepconf_confidence",
    "entropy",
    "implicit_reward",
    "logit_signals",
    "logtoku",
    "margin",
    "max_prob",
    "parse_signals",
    "self_certainty",
    "signal_of_output",
    "varentropy",
    "wants_samples",
    "warm_up",
]

#: Floor for log-probabilities that would otherwise be ``-inf`` (``log`` of the smallest
#: normal float32): a token below it has probability zero in float32 anyway.
LOGPROB_FLOOR = math.log(torch.finfo(torch.float32).tiny)


@dataclass(frozen=True)
class Output:
    """One column a signal writes into a trace, and how to read it.

    Attributes:
        key: the column's name (``"logtoku_epistemic"``).
        confidence: ``True`` when a larger value means *more* confident.
        headline: the response-level reducer its paper uses (``tokur_decode.core.aggregate``).
        unit: the values lie in ``[0, 1]`` (a fixed colour scale can be used).
        label: a short display name (table headers).
        needs_token: its value needs the step's emitted token, known only after sampling
            (a processor completes it at the next step).
    """

    key: str
    confidence: bool = False
    headline: str = "mean"
    unit: bool = False
    label: str = ""
    needs_token: bool = False


@dataclass(frozen=True)
class SignalInfo:
    """Everything the library knows about one signal, in one place.

    Attributes:
        name: what callers ask for (``"logtoku"``).
        outputs: the columns it records.
        needs_samples: it reads ``M`` predictive samples per step (TokUR), not one
            logits row: a backend must supply them (``tokur_decode.hf.perturbed``,
            ``tokur_decode.vllm.tokur_engine_args``).
        default: recorded when no signals are named.
    """

    name: str
    outputs: tuple[Output, ...]
    needs_samples: bool = False
    default: bool = False

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(o.key for o in self.outputs)

    @property
    def step_keys(self) -> tuple[str, ...]:
        """The outputs known at their own step (those that need no emitted token)."""
        return tuple(o.key for o in self.outputs if not o.needs_token)

    @property
    def needs_token(self) -> bool:
        """Every output waits for the emitted token (the chosen-token signals)."""
        return all(o.needs_token for o in self.outputs)


#: The signal registry. Adding a signal: its formula from the read's statistics in
#: :func:`step_outputs`, and an entry here; every table the library uses (what
#: ``"all"`` means, directions, headline reducers, display names) is derived from it.
REGISTRY: dict[str, SignalInfo] = {
    info.name: info
    for info in (
        SignalInfo(
            "max_prob",
            (Output("max_prob", confidence=True, headline="naive", unit=True),),
            default=True,
        ),
        SignalInfo(
            "chosen_prob",
            (Output("chosen_prob", True, unit=True, label="p(token)", needs_token=True),),
            default=True,
        ),
        SignalInfo(
            "chosen_logprob", (Output("chosen_logprob", confidence=True, needs_token=True),)
        ),
        SignalInfo("margin", (Output("margin", confidence=True, unit=True),)),
        SignalInfo("entropy", (Output("entropy", label="entropy"),), default=True),
        SignalInfo("varentropy", (Output("varentropy"),)),
        SignalInfo("self_certainty", (Output("self_certainty", confidence=True),)),
        SignalInfo(
            "deepconf", (Output("deepconf", confidence=True, headline="deepconf_lowest_group"),)
        ),
        SignalInfo(
            "logtoku",
            (
                Output("logtoku_aleatoric", label="LogTokU AU"),
                Output("logtoku_epistemic", unit=True, label="LogTokU EU"),
                Output("logtoku_unreliability", headline="topk_mean", label="AU x EU"),
            ),
            default=True,
        ),
        SignalInfo(
            "tokur",
            (
                Output("tokur_total", headline="sum", label="TokUR TU"),
                Output("tokur_aleatoric", headline="sum", label="TokUR AU"),
                Output("tokur_epistemic", headline="sum", label="TokUR EU"),
                Output("tokur_reward", confidence=True, label="TokUR reward", needs_token=True),
            ),
            needs_samples=True,
        ),
    )
}

#: Every output column of every signal, by key.
OUTPUTS: dict[str, Output] = {o.key: o for info in REGISTRY.values() for o in info.outputs}

#: Signals computed from one step's logits (:class:`SignalSpec`), with their outputs.
#: ``"all"`` means these: every signal that costs one pass over the logits.
SIGNALS: dict[str, tuple[str, ...]] = {
    name: info.keys for name, info in REGISTRY.items() if not info.needs_samples
}

#: Signals computed from several predictive samples per step (TokUR), with their outputs.
SAMPLE_SIGNALS: dict[str, tuple[str, ...]] = {
    name: info.keys for name, info in REGISTRY.items() if info.needs_samples
}

#: The keyword parameters of a signal pass (:class:`SignalSpec`), which every monitor and
#: processor takes.
SPEC_PARAMS = ("deepconf_k", "logtoku_k", "logtoku_evidence")

#: What is recorded when no signals are named.
DEFAULT_SIGNALS: tuple[str, ...] = tuple(n for n, info in REGISTRY.items() if info.default)

#: Signals that need the emitted token, known only after sampling.
CHOSEN_SIGNALS = frozenset(n for n, info in REGISTRY.items() if info.needs_token)

#: Output keys where a larger value means *more* confident (all others: more uncertain).
CONFIDENCE_KEYS = frozenset(key for key, o in OUTPUTS.items() if o.confidence)


def signal_of_output(key: str) -> str:
    """The signal that produces output ``key``.

    Example:
        >>> signal_of_output("logtoku_epistemic"), signal_of_output("tokur_total")
        ('logtoku', 'tokur')
    """
    for name, info in REGISTRY.items():
        if key in info.keys:
            return name
    raise ValueError(f"signal: unknown output {key!r}; choose from {sorted(OUTPUTS)}")


def logit_signals(names: Iterable[str]) -> tuple[str, ...]:
    """The signals among ``names`` that one logits row gives (what a
    :class:`SignalSpec` computes); ``("max_prob",)`` when there is none, so that a record
    of sample signals alone still has the naive and vanilla scores.

    Example:
        >>> logit_signals(["tokur", "entropy"]), logit_signals(["tokur"])
        (('entropy',), ('max_prob',))
    """
    return tuple(n for n in names if n in SIGNALS) or ("max_prob",)


def wants_samples(names: Iterable[str]) -> bool:
    """Whether a signal among ``names`` needs predictive samples (TokUR).

    Example:
        >>> wants_samples(["entropy", "tokur"]), wants_samples(["entropy"])
        (True, False)
    """
    return any(n in SAMPLE_SIGNALS for n in names)


def parse_signals(signals: Iterable[str] | str | None) -> tuple[str, ...]:
    """Signal names from a list or a comma-separated string, validated, duplicates
    dropped; ``"all"`` expands to every logit signal (:data:`SIGNALS`; TokUR is asked
    for by name, as it needs predictive samples); ``None`` is :data:`DEFAULT_SIGNALS`.

    Example:
        >>> parse_signals("entropy, logtoku,entropy")
        ('entropy', 'logtoku')
        >>> parse_signals("all,tokur")[-2:]
        ('logtoku', 'tokur')
        >>> parse_signals("all,bogus")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: signals: unknown 'bogus'; choose from ['chosen_logprob', ...] or 'all'
    """
    if signals is None:
        return DEFAULT_SIGNALS
    if isinstance(signals, str):
        names = [s.strip() for s in signals.split(",")]
    elif isinstance(signals, Iterable):
        names = list(signals)
    else:
        raise ValueError(f"signals: a list of names or a comma-separated string, got {signals!r}")
    if not all(isinstance(n, str) for n in names):
        raise ValueError(f"signals: names must be strings, got {signals!r}")
    names = [n for n in names if n]
    if not names:
        raise ValueError("signals: at least one signal name is required")
    out: list[str] = []
    for name in names:
        if name != "all" and name not in REGISTRY:
            raise ValueError(f"signals: unknown {name!r}; choose from {sorted(REGISTRY)} or 'all'")
        out += SIGNALS if name == "all" else [name]
    return tuple(dict.fromkeys(out))


_EVIDENCE = ("relu", "shifted")


# --------------------------------------------------------------------------- helpers


def _sanitize(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` (in the compute dtype) under the non-finite conventions, rows with no
    finite entry raised to 0 (for the sample decomposition; a single row is read by
    :func:`~tokur_decode.core.logit_stats.read_logits`)."""
    z = sanitized(logits)
    return torch.where(z.amax(dim=-1, keepdim=True) == -math.inf, 0.0, z)


def _entropy_terms(lp: torch.Tensor):
    """``(p, lp clamped at the floor, p * lp_clamped, H)``; masked entries have ``p = 0``
    and add 0.

    Clamping instead of masking: a token below the floor has ``p < 1.2e-38`` and a
    contribution far below float32 resolution.
    """
    p = lp.exp()
    lp_c = lp.clamp_min(log_tiny(lp.dtype))
    plp = p * lp_c
    return p, lp_c, plp, 0.0 - plp.sum(dim=-1)  # 0.0 - s: no IEEE negative zero


def _out(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32)


# --------------------------------------------------------------------------- fused entry


@dataclass(frozen=True)
class SignalSpec:
    """A validated choice of signals and their parameters, computed in one fused pass.

    Args:
        signals: names from :data:`SIGNALS` (``"logtoku"`` yields three outputs).
        deepconf_k: number of top log-probabilities averaged by DeepConf (paper: 20).
        logtoku_k: number of top logits used as Dirichlet evidence (LogTokU: 2).
        logtoku_evidence: ``"relu"`` (faithful: ``ReLU`` of the raw top-K logits) or
            ``"shifted"`` (``ReLU`` of the top-K logits minus the row's mean finite
            logit, robust for models whose logits are all negative).

    Raises:
        ValueError: naming the parameter, for an unknown signal or a bad value.

    Example:
        >>> import torch
        >>> spec = SignalSpec(["entropy", "deepconf"], deepconf_k=5)
        >>> spec.output_names
        ('entropy', 'deepconf')
        >>> out = spec(torch.randn(4, 100))
        >>> out["entropy"].shape
        torch.Size([4])
    """

    signals: tuple[str, ...]
    deepconf_k: int = 20
    logtoku_k: int = 2
    logtoku_evidence: str = "relu"

    def __init__(
        self,
        signals: Iterable[str] | str,
        *,
        deepconf_k: int = 20,
        logtoku_k: int = 2,
        logtoku_evidence: str = "relu",
    ) -> None:
        names = parse_signals(signals)
        unknown = [n for n in names if n not in SIGNALS]
        if unknown:
            raise ValueError(
                f"signals: {unknown} need predictive samples, not one logits row; "
                f"a SignalSpec computes {sorted(SIGNALS)} or 'all'"
            )
        for pname, value in (("deepconf_k", deepconf_k), ("logtoku_k", logtoku_k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{pname} must be a positive integer, got {value!r}")
        if logtoku_evidence not in _EVIDENCE:
            raise ValueError(
                f"logtoku_evidence must be one of {_EVIDENCE}, got {logtoku_evidence!r}"
            )
        object.__setattr__(self, "signals", names)
        object.__setattr__(self, "deepconf_k", deepconf_k)
        object.__setattr__(self, "logtoku_k", logtoku_k)
        object.__setattr__(self, "logtoku_evidence", logtoku_evidence)

    @property
    def output_names(self) -> tuple[str, ...]:
        """The keys of the dictionary returned by :meth:`__call__`, in order."""
        return tuple(key for name in self.signals for key in SIGNALS[name])

    def __call__(
        self, logits: torch.Tensor, token_ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Compute the signals of ``logits`` ``[..., V]``; see :meth:`compute`."""
        return self.compute(logits, token_ids)[0]

    def compute(
        self,
        logits: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        *,
        top: int = 0,
        keep: bool = False,
        workspace: Workspace | None = None,
    ) -> tuple[dict[str, torch.Tensor], LogitStats]:
        """Signals of ``logits`` and the one read of them they were computed from.

        ``token_ids`` ``[...]`` (the emitted tokens) is required for the chosen-token
        signals. The returned :class:`~tokur_decode.core.logit_stats.LogitStats` holds at
        least the ``top`` most probable tokens and, with ``keep``, a copy of the logits
        that lets a caller that learns the emitted token later (a logits processor)
        finish the chosen-token signals with :func:`chosen_signals`. With a ``workspace``
        that copy reuses memory (valid until the workspace's next use).

        The read and every step output are one compiled function (one call per step:
        a compiled call's fixed cost is paid once), the same for every choice of signals;
        the outputs not asked for cost a few operations on ``[rows]`` tensors.
        """
        x, kept = rows_of(logits, keep, workspace)
        params = (self.deepconf_k, self.logtoku_k, self.logtoku_evidence == "shifted")
        fields, outputs = _step(x, kept, max(top, 2, self.deepconf_k, self.logtoku_k), *params)
        stats = LogitStats.of_rows(fields, logits.shape, x if kept is None else kept)
        lead = logits.shape[:-1]
        columns = outputs.reshape(*lead, len(STEP_OUTPUTS)).unbind(-1)
        values = dict(zip(STEP_OUTPUTS, columns, strict=True))
        if CHOSEN_SIGNALS.intersection(self.signals):
            if token_ids is None:
                raise ValueError("token_ids: required for chosen_prob / chosen_logprob")
            values |= chosen_signals(stats, token_ids, self.signals)
        return {name: values[name] for name in self.output_names}, stats


#: The outputs a signal pass computes at its step (all but the chosen-token ones).
STEP_OUTPUTS = tuple(
    key for name, keys in SIGNALS.items() for key in keys if name not in CHOSEN_SIGNALS
)


def step_outputs(
    x: torch.Tensor,
    kept: torch.Tensor | None,
    top: int,
    deepconf_k: int,
    logtoku_k: int,
    shifted: bool,
) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """The read of ``x`` ``[N, V]`` (:func:`~tokur_decode.core.logit_stats.row_fields`)
    and every output of :data:`STEP_OUTPUTS` from it, float32 ``[N, outputs]``."""
    fields = row_fields(x, kept, top)
    _, moments, d_sum, top_z, _ = fields
    m, log_s0, mean_d, second_d, n = moments.unbind(-1)
    top_lp = logprobs(top_z, m.unsqueeze(-1), log_s0.unsqueeze(-1))
    shift = d_sum / n + m if shifted else None  # the row's mean finite logit
    aleatoric, epistemic = _logtoku_from_top(top_z[..., :logtoku_k], logtoku_k, shift)
    values = {
        "max_prob": (0.0 - log_s0).exp(),
        "margin": _margin_from_top(top_lp),
        "entropy": log_s0 - mean_d,
        "varentropy": (second_d - mean_d**2).clamp_min(0.0),  # the variance of d under p
        "self_certainty": _self_certainty(n, d_sum, log_s0),
        "deepconf": _deepconf_from_top(top_lp[..., :deepconf_k]),
        "logtoku_aleatoric": aleatoric,
        "logtoku_epistemic": epistemic,
        "logtoku_unreliability": aleatoric * epistemic,
    }
    return fields, torch.stack([_out(values[key]) for key in STEP_OUTPUTS], dim=-1)


_step = Compiled(step_outputs)


def warm_up(vocab: int, device: torch.device | str = "cpu") -> None:
    """Compile the signal pass for logits of ``vocab`` entries on ``device`` now: for one
    row and for several, keeping a copy of the logits or not (a server calls it once as
    it starts, so that no request's first step waits for the compiler; a no-op where the
    pass is not compiled).

    Example:
        >>> warm_up(100)  # too small to be compiled: returns at once
    """
    spec = SignalSpec(["max_prob"])
    for rows in (1, 2):
        logits = torch.zeros(rows, vocab, device=device)
        for keep in (False, True):
            spec.compute(logits, keep=keep)


def compute_signals(
    logits: torch.Tensor,
    signals: Iterable[str] | str = "all",
    token_ids: torch.Tensor | None = None,
    **params,
) -> dict[str, torch.Tensor]:
    """Compute several signals of ``logits`` ``[..., V]`` in one fused pass.

    ``signals`` and ``params`` are those of :class:`SignalSpec`; ``"all"`` means every
    signal (then ``token_ids`` is required for the chosen-token ones).

    Example:
        >>> import torch
        >>> out = compute_signals(torch.zeros(2, 4), ["entropy", "max_prob"])
        >>> out["max_prob"]
        tensor([0.2500, 0.2500])
    """
    spec = SignalSpec(signals, **params)
    if token_ids is not None and isinstance(logits, torch.Tensor) and token_ids.numel():
        # an offline call: reading the ids on the host is fine here (never per step)
        vocab = logits.shape[-1]
        if bool((token_ids < 0).any()) or bool((token_ids >= vocab).any()):
            raise ValueError(f"token_ids: must be in [0, {vocab}) (the logits' vocabulary)")
    return spec(logits, token_ids)


def chosen_signals(
    stats: LogitStats,
    token_ids: torch.Tensor,
    signals: Iterable[str] = tuple(CHOSEN_SIGNALS),
    rows: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``chosen_logprob`` / ``chosen_prob`` of ``token_ids`` ``[...]`` from a read of the
    logits (:func:`~tokur_decode.core.logit_stats.read_logits`).

    ``rows`` ``[N]`` picks, for each of ``N`` tokens, its row of a 2-D read (default:
    the read's leading dimensions are those of ``token_ids``).

    Example:
        >>> import torch
        >>> from tokur_decode.core.logit_stats import read_logits
        >>> stats = read_logits(torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]])), keep=True)
        >>> tokens, rows = torch.tensor([1, 0]), torch.tensor([1, 1])
        >>> chosen_signals(stats, tokens, ["chosen_prob"], rows=rows)
        {'chosen_prob': tensor([0.1000, 0.9000])}
    """
    chosen = stats.logprob_of(token_ids, rows).clamp_min(LOGPROB_FLOOR)
    out = {}
    if "chosen_prob" in signals:
        out["chosen_prob"] = _out(chosen.exp())
    if "chosen_logprob" in signals:
        out["chosen_logprob"] = _out(chosen)
    return out


# --------------------------------------------------------------------------- formulas


def _margin_from_top(top_lp: torch.Tensor) -> torch.Tensor:
    first = top_lp[..., 0].exp()
    if top_lp.shape[-1] < 2:
        return first
    return first - top_lp[..., 1].exp()


def _self_certainty(n: torch.Tensor, d_sum: torch.Tensor, log_s0: torch.Tensor) -> torch.Tensor:
    # KL(U || p) over the n finite entries: -log n - mean(log p), mean(log p) = D / n - log S0;
    # 0.0 - ...: no negative zero; the cap keeps the +inf limit (rows with +inf logits) finite
    mean_d = (d_sum / n).to(log_s0.dtype)
    return (0.0 - torch.log(n) - mean_d + log_s0).clamp(0.0, torch.finfo(n.dtype).max)


def _deepconf_from_top(top_lp: torch.Tensor) -> torch.Tensor:
    return -top_lp.clamp_min(LOGPROB_FLOOR).mean(dim=-1)


def _logtoku_from_top(
    top_z: torch.Tensor, k: int, shift: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LogTokU (aleatoric, epistemic) from the top-K logits ``[..., K']`` (``K' <= K``).

    Missing candidates (``V < K``) and masked ones have zero evidence. The tiny
    ``[..., K]`` tensor is handled in float64 so that huge logits cannot overflow
    ``alpha_0``.
    """
    z = top_z.to(torch.float64)
    if shift is not None:
        z = z - shift.to(torch.float64).unsqueeze(-1)
    alpha = torch.relu(z).nan_to_num(nan=0.0)  # relu(-inf) = 0; nan cannot occur after _sanitize
    alpha0 = alpha.sum(dim=-1, keepdim=True)
    weights = alpha / alpha0.clamp_min(torch.finfo(torch.float64).tiny)
    digamma_gap = torch.special.digamma(alpha + 1) - torch.special.digamma(alpha0 + 1)
    aleatoric = (0.0 - (weights * digamma_gap).sum(dim=-1)).clamp_min(0.0)
    # Candidates beyond V have alpha = 0, i.e. they add 1 each to sum(alpha + 1).
    epistemic = k / (alpha0.squeeze(-1) + k)
    return _out(aleatoric), _out(epistemic)


# --------------------------------------------------------------------------- public API


def max_prob(logits: torch.Tensor) -> torch.Tensor:
    """Probability of the most likely token, ``max_v softmax(z)_v``.

    Example:
        >>> import torch
        >>> max_prob(torch.tensor([0.0, 0.0]))
        tensor(0.5000)
    """
    return compute_signals(logits, "max_prob")["max_prob"]


def chosen_logprob(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Log-probability of the emitted tokens ``token_ids`` ``[...]`` (floored at
    :data:`LOGPROB_FLOOR`).

    Example:
        >>> import torch
        >>> chosen_logprob(torch.tensor([[0.0, 0.0]]), torch.tensor([1]))
        tensor([-0.6931])
    """
    return compute_signals(logits, "chosen_logprob", token_ids)["chosen_logprob"]


def margin(logits: torch.Tensor) -> torch.Tensor:
    """Difference of the two largest probabilities, ``p_(1) - p_(2)``.

    Example:
        >>> import torch
        >>> margin(torch.tensor([0.0, 0.0, -math.inf]))
        tensor(0.)
    """
    return compute_signals(logits, "margin")["margin"]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy of ``softmax(z)`` in nats; masked entries contribute 0.

    Example:
        >>> import torch
        >>> entropy(torch.zeros(4))
        tensor(1.3863)
    """
    return compute_signals(logits, "entropy")["entropy"]


def varentropy(logits: torch.Tensor) -> torch.Tensor:
    """Variance of the surprisal ``-lp`` under ``p`` (entropix).

    Example:
        >>> import torch
        >>> varentropy(torch.zeros(4))
        tensor(0.)
    """
    return compute_signals(logits, "varentropy")["varentropy"]


def self_certainty(logits: torch.Tensor) -> torch.Tensor:
    """``KL(U || p)`` over the finite entries (Kang et al. 2025); 0 for a uniform row.

    Example:
        >>> import torch
        >>> self_certainty(torch.zeros(3))
        tensor(0.)
    """
    return compute_signals(logits, "self_certainty")["self_certainty"]


def deepconf_confidence(logits: torch.Tensor, k: int = 20) -> torch.Tensor:
    """DeepConf token confidence ``-(1/k) sum_{j<=k} lp_(j)`` (Fu et al. 2025).

    Uses ``min(k, V)`` entries; higher means more confident.

    Example:
        >>> import torch
        >>> deepconf_confidence(torch.zeros(4), k=2)
        tensor(1.3863)
    """
    return compute_signals(logits, "deepconf", deepconf_k=k)["deepconf"]


def logtoku(logits: torch.Tensor, k: int = 2, evidence: str = "relu") -> dict[str, torch.Tensor]:
    """LogTokU (Ma et al. 2025): top-``k`` logits as Dirichlet evidence.

    ``alpha = ReLU(top-k logits)``, ``alpha_0 = sum alpha``;
    ``aleatoric = -sum (alpha/alpha_0) (digamma(alpha+1) - digamma(alpha_0+1))``,
    ``epistemic = k / sum (alpha + 1)``, ``unreliability = aleatoric * epistemic``.
    ``alpha_0 = 0`` gives the limit ``aleatoric = 0, epistemic = 1``.

    Returns a dict with ``aleatoric``, ``epistemic`` and ``unreliability``.

    Example:
        >>> import torch
        >>> out = logtoku(torch.tensor([5.0, 5.0, 1.0]))
        >>> round(out["epistemic"].item(), 4)
        0.1667
    """
    out = compute_signals(logits, "logtoku", logtoku_k=k, logtoku_evidence=evidence)
    return {key.removeprefix("logtoku_"): value for key, value in out.items()}


def bayesian_decomposition(
    sample_logits: torch.Tensor, token_ids: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """TokUR's decomposition of ``M`` predictive samples ``[..., M, V]`` (REFERENCE 1.2).

    With ``p_m = softmax(z_m)`` and ``p_bar = mean_m p_m`` (via ``logsumexp``):

    * ``aleatoric = mean_m H(p_m)``
    * ``epistemic = mean_m KL(p_m || p_bar)`` (the mutual information), computed term
      by term so that it is never negative (each KL is clamped at 0 against rounding)
    * ``total = aleatoric + epistemic`` (``= H(p_bar)``)
    * ``reward`` (only with ``token_ids`` ``[...]``): TokUR's implicit reward
      ``log p_bar(y) - mean_m lp_m(y) >= 0``.

    Example:
        >>> import torch
        >>> same = torch.randn(1, 7).expand(3, 7)        # three identical samples
        >>> out = bayesian_decomposition(same)
        >>> float(out["epistemic"]) < 1e-6
        True

    Raises:
        ValueError: ``sample_logits`` not ``[..., M, V]``, or ``token_ids`` not one per
            leading position (a shape check: no device read).
    """
    if sample_logits.dim() < 2:
        raise ValueError(
            f"sample_logits: expected [..., M, V], got shape {tuple(sample_logits.shape)}"
        )
    if token_ids is not None and tuple(token_ids.shape) != tuple(sample_logits.shape[:-2]):
        raise ValueError(
            f"token_ids: one per position, shape {tuple(sample_logits.shape[:-2])}, got "
            f"{tuple(token_ids.shape)}"
        )
    out, lp, log_pbar = bayesian_terms(sample_logits)
    if token_ids is not None:
        out["reward"] = implicit_reward(lp, log_pbar, token_ids)
    return out


def bayesian_terms(
    sample_logits: torch.Tensor,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """``(total/aleatoric/epistemic, lp [..., M, V], log p_bar [..., 1, V])``.

    The log-probabilities let a caller that learns the emitted token later (a logits
    processor) compute :func:`implicit_reward` then, without recomputing them. Compiled
    like the single-row pass (:class:`~tokur_decode.core.logit_stats.Compiled`).
    """
    if sample_logits.dim() < 2:
        raise ValueError("sample_logits: expected shape [..., M, V]")
    x = sample_logits.to(compute_dtype(sample_logits))
    terms, lp, log_pbar = _bayes(x)
    return (
        dict(zip(("total", "aleatoric", "epistemic"), terms.unbind(-1), strict=True)),
        lp,
        log_pbar,
    )


def _bayesian_pass(
    x: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``([..., 3] total/aleatoric/epistemic, lp, log p_bar)`` of samples ``x`` ``[..., M,
    V]`` in the compute dtype."""
    lp = torch.log_softmax(_sanitize(x), dim=-1)  # [..., M, V]
    p, lp_c, _, h = _entropy_terms(lp)
    aleatoric = h.mean(dim=-1)
    log_pbar = torch.logsumexp(lp, dim=-2, keepdim=True) - math.log(lp.shape[-2])
    # Masked in every sample: both floors cancel; masked in some: p = 0 there.
    kl = (p * (lp_c - log_pbar.clamp_min(log_tiny(lp.dtype)))).sum(dim=-1).clamp_min(0.0)
    epistemic = kl.mean(dim=-1) + 0.0  # + 0.0: no IEEE negative zero
    terms = torch.stack([aleatoric + epistemic, aleatoric, epistemic], dim=-1)
    return _out(terms), lp, log_pbar


_bayes = Compiled(_bayesian_pass)


def implicit_reward(
    lp: torch.Tensor, log_pbar: torch.Tensor, token_ids: torch.Tensor
) -> torch.Tensor:
    """TokUR's implicit reward ``log p_bar(y) - mean_m lp_m(y)`` of tokens ``y`` ``[...]``,
    from the outputs of :func:`bayesian_terms`; never negative (Jensen)."""
    idx = token_ids.long()[..., None, None]
    lp_y = lp.gather(-1, idx.expand(*lp.shape[:-1], 1)).squeeze(-1).clamp_min(LOGPROB_FLOOR)
    lpbar_y = log_pbar.gather(-1, idx).squeeze(-1).squeeze(-1).clamp_min(LOGPROB_FLOOR)
    return _out((lpbar_y - lp_y.mean(dim=-1)).clamp_min(0.0))
