"""Per-sequence records of every decoding step's signals.

:class:`StepBuffer` is the recording side: preallocated ``[B, capacity]`` float32
buffers on the logits' device, written by column with a Python step index (no host
synchronisation), grown by doubling when a generation outlasts them.

:class:`Trace` is the result: for ``B`` responses, ``signals[name]`` ``[B, T]``, the
generated ``token_ids`` ``[B, T]`` and ``lengths`` ``[B]`` (tokens up to and including
EOS; padding after it is not part of the response). It computes response-level
aggregates with :mod:`tokur_decode.core.aggregate`, exports to dict/JSON/pandas, and renders
in a notebook as tokens coloured by uncertainty.

Example:
    >>> import torch
    >>> trace = Trace(
    ...     signals={"entropy": torch.tensor([[0.1, 2.0, 0.3]])},
    ...     token_ids=torch.tensor([[5, 6, 7]]),
    ...     lengths=torch.tensor([2]),
    ... )
    >>> trace.aggregate("entropy", "mean")
    tensor([1.0500])
    >>> trace.to_dict()["rows"][0]["values"]["entropy"]
    [0.10000000149011612, 2.0]
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import aggregate
from .logit_stats import LogitStats
from .signals import OUTPUTS
from .steps import DEFAULT_DELIMITER, step_index

__all__ = [
    "Alternatives",
    "StepBuffer",
    "Trace",
    "uncertainty_scale",
]


#: Signals with a fixed [0, 1] range: coloured on that absolute scale.


class StepBuffer:
    """Preallocated per-step storage of named float32 values for ``batch_size`` rows.

    Example:
        >>> import torch
        >>> buf = StepBuffer(["entropy"], batch_size=2, device="cpu", capacity=1)
        >>> buf.write(0, {"entropy": torch.tensor([0.5, 1.0])})
        >>> buf.write(1, {"entropy": torch.tensor([0.25, 0.0])})   # grows to 2 columns
        >>> buf.view(2)["entropy"]
        tensor([[0.5000, 0.2500],
                [1.0000, 0.0000]])
    """

    def __init__(
        self,
        names: Sequence[str],
        batch_size: int,
        device: torch.device | str,
        capacity: int = 256,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.names = tuple(names)
        self.batch_size = batch_size
        self.device = torch.device(device)
        self._data = torch.zeros(len(self.names), batch_size, capacity, device=self.device)
        self._index = {name: i for i, name in enumerate(self.names)}

    @property
    def capacity(self) -> int:
        return self._data.shape[-1]

    def _ensure(self, step: int) -> None:
        if step >= self.capacity:
            new_cap = max(2 * self.capacity, step + 1)
            grown = self._data.new_zeros(len(self.names), self.batch_size, new_cap)
            grown[..., : self.capacity] = self._data
            self._data = grown

    def write(self, step: int, values: Mapping[str, torch.Tensor]) -> None:
        """Store ``values[name]`` ``[B]`` at column ``step`` (a Python int).

        Names that are consecutive in :attr:`names` (in that order) are written with a
        single copy.
        """
        self._ensure(step)
        start = self._index[next(iter(values))]
        if tuple(values) == self.names[start : start + len(values)]:
            self._data[start : start + len(values), :, step] = torch.stack(tuple(values.values()))
        else:
            for name, value in values.items():
                self._data[self._index[name], :, step] = value

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (``[B']``, repeats allowed), in that order."""
        self._data = self._data.index_select(1, index)
        self.batch_size = len(index)

    def view(self, steps: int) -> dict[str, torch.Tensor]:
        """The first ``steps`` columns of every name, ``{name: [B, steps]}`` (views)."""
        return {name: self._data[i, :, :steps] for name, i in self._index.items()}


@dataclass
class Alternatives:
    """The ``k`` most probable tokens of every step, from the distribution the step's
    token was drawn from (the monitor's logits): ``ids`` ``[B, T, k]`` and their
    probabilities ``probs`` ``[B, T, k]``, most probable first; ``tokens`` their text
    per row and step (when a tokenizer was given).

    Example:
        >>> from tokur_decode.core.logit_stats import read_logits
        >>> read = read_logits(torch.log(torch.tensor([[0.1, 0.6, 0.3]])), top=2)
        >>> alt = Alternatives.of_stats(read, 2)
        >>> alt.ids.tolist(), [round(p, 2) for p in alt.probs[0].tolist()]
        ([[1, 2]], [0.6, 0.3])
    """

    ids: torch.Tensor
    probs: torch.Tensor
    tokens: list[list[list[str]]] | None = None

    @classmethod
    def of_stats(cls, stats: LogitStats, k: int) -> Alternatives:
        """The top ``k`` of one step's read of the logits (read with ``top >= k``; on
        their device)."""
        return cls(stats.top_ids[..., :k], stats.top_logprobs[..., :k].exp())

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    def rows(self, rows: list[int]) -> Alternatives:
        index = torch.tensor(rows, dtype=torch.long, device=self.ids.device)
        tokens = None if self.tokens is None else [self.tokens[i] for i in rows]
        return Alternatives(
            self.ids.index_select(0, index), self.probs.index_select(0, index), tokens
        )

    def trimmed(self, row: int, n: int) -> Alternatives:
        tokens = None if self.tokens is None else [self.tokens[row][:n]]
        return Alternatives(self.ids[row : row + 1, :n], self.probs[row : row + 1, :n], tokens)

    def padded(self, width: int) -> Alternatives:
        pad = (0, 0, 0, width - self.ids.shape[1])
        return Alternatives(
            torch.nn.functional.pad(self.ids, pad),
            torch.nn.functional.pad(self.probs, pad),
            self.tokens,
        )

    def with_tokens(self, tokenizer, lengths: list[int]) -> Alternatives:
        """A copy with each valid step's alternatives decoded by ``tokenizer``."""
        ids = self.ids.detach().cpu().tolist()
        tokens = [
            [[tokenizer.decode([t]) for t in step] for step in row[:n]]
            for row, n in zip(ids, lengths, strict=True)
        ]
        return Alternatives(self.ids, self.probs, tokens)

    def row(self, i: int, n: int) -> dict[str, list]:
        """Row ``i``'s first ``n`` steps as plain lists (``ids``, ``probs``, ``tokens``)."""
        out = {
            "ids": self.ids[i, :n].detach().cpu().tolist(),
            "probs": self.probs[i, :n].detach().cpu().tolist(),
        }
        if self.tokens is not None:
            out["tokens"] = self.tokens[i][:n]
        return out


@dataclass
class Trace:
    """Token-level signals of ``B`` generated responses.

    Attributes:
        signals: ``{name: [B, T]}`` float32 values; step ``t`` is the distribution the
            ``t``-th generated token was drawn from.
        token_ids: ``[B, T]`` generated token ids (padding after EOS included).
        lengths: ``[B]`` valid tokens per row, EOS included.
        tokens: per row, the text of each valid token (when a tokenizer was given).
        texts: per row, the decoded response without special tokens.
        meta: free-form facts about how the trace was measured (e.g. ``measured_on``).
        alternatives: each step's top-``k`` tokens (:class:`Alternatives`), when asked.
    """

    signals: dict[str, torch.Tensor]
    token_ids: torch.Tensor
    lengths: torch.Tensor
    tokens: list[list[str]] | None = None
    texts: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    alternatives: Alternatives | None = None

    # ------------------------------------------------------------------ access

    def __len__(self) -> int:
        return self.token_ids.shape[0]

    def __iter__(self) -> Iterator[Trace]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int) -> Trace:
        """The trace of one response, trimmed to its length."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"trace has {len(self)} rows, got index {index}")
        index %= len(self)
        n = int(self.lengths[index])
        return Trace(
            signals={k: v[index : index + 1, :n] for k, v in self.signals.items()},
            token_ids=self.token_ids[index : index + 1, :n],
            lengths=self.lengths[index : index + 1],
            tokens=None if self.tokens is None else [self.tokens[index]],
            texts=None if self.texts is None else [self.texts[index]],
            meta=dict(self.meta),
            alternatives=None if self.alternatives is None else self.alternatives.trimmed(index, n),
        )

    def select(self, rows) -> Trace:
        """A trace of the given rows (indices, in that order), padding kept."""
        rows = list(rows)
        index = torch.tensor(rows, dtype=torch.long, device=self.token_ids.device)
        return Trace(
            signals={k: v.index_select(0, index) for k, v in self.signals.items()},
            token_ids=self.token_ids.index_select(0, index),
            lengths=self.lengths.index_select(0, index.to(self.lengths.device)),
            tokens=None if self.tokens is None else [self.tokens[i] for i in rows],
            texts=None if self.texts is None else [self.texts[i] for i in rows],
            meta=dict(self.meta),
            alternatives=None if self.alternatives is None else self.alternatives.rows(rows),
        )

    @classmethod
    def concat(cls, traces: Sequence[Trace]) -> Trace:
        """The rows of ``traces`` (same signals) one after another, padded to the longest.

        Example:
            >>> a = Trace({"entropy": torch.ones(1, 2)}, torch.ones(1, 2, dtype=torch.long),
            ...           torch.tensor([2]))
            >>> b = Trace({"entropy": torch.ones(2, 3)}, torch.ones(2, 3, dtype=torch.long),
            ...           torch.tensor([3, 1]))
            >>> Trace.concat([a, b]).lengths.tolist()
            [2, 3, 1]
        """
        if not traces:
            raise ValueError("traces: at least one trace is required")
        names = traces[0].names
        if any(t.names != names for t in traces):
            raise ValueError("traces: every trace must record the same signals")
        width = max(t.token_ids.shape[1] for t in traces)

        def padded(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1]))

        def joined(lists):
            return None if any(x is None for x in lists) else [r for x in lists for r in x]

        alternatives = None
        alts = [t.alternatives for t in traces if t.alternatives is not None]
        if len(alts) == len(traces) and len({a.k for a in alts}) == 1:
            alts = [a.padded(width) for a in alts]
            alternatives = Alternatives(
                torch.cat([a.ids for a in alts]),
                torch.cat([a.probs for a in alts]),
                joined([a.tokens for a in alts]),
            )
        return cls(
            signals={n: torch.cat([padded(t.signals[n]) for t in traces]) for n in names},
            token_ids=torch.cat([padded(t.token_ids) for t in traces]),
            lengths=torch.cat([t.lengths for t in traces]),
            tokens=joined([t.tokens for t in traces]),
            texts=joined([t.texts for t in traces]),
            meta=dict(traces[0].meta),
            alternatives=alternatives,
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.signals)

    def values(self, name: str) -> list[list[float]]:
        """Valid values of signal ``name`` per row, as Python floats."""
        if name not in self.signals:
            raise KeyError(f"signal {name!r} not recorded; have {list(self.signals)}")
        rows = self.signals[name].detach().cpu().tolist()
        return [row[:n] for row, n in zip(rows, self.lengths.tolist(), strict=True)]

    # ------------------------------------------------------------------ aggregates

    def aggregate(self, name: str, reducer: str = "mean", **params) -> torch.Tensor:
        """Response-level value ``[B]`` of signal ``name`` by ``reducer`` (see
        :data:`tokur_decode.core.aggregate.REDUCERS`); a step reducer reads the steps
        of :meth:`step_index`."""
        if name not in self.signals:
            raise KeyError(f"signal {name!r} not recorded; have {list(self.signals)}")
        if reducer in aggregate.STEP_REDUCERS:
            params["step_of"] = self.step_index().to(self.lengths.device)
        return aggregate.reduce(reducer, self.signals[name], self.lengths, **params)

    def step_index(self) -> torch.Tensor:
        """Each token's reasoning step ``[B, T]``
        (:func:`tokur_decode.core.steps.step_index`), steps ending at
        ``meta["step_delimiter"]`` (default a blank line).

        Raises:
            ValueError: the trace has no token texts (it was made without a tokenizer).
        """
        if self.tokens is None:
            raise ValueError(
                "reducer: step reducers read the answer's token texts; this trace has none "
                "(record it with a tokenizer)"
            )
        delimiter = self.meta.get("step_delimiter", DEFAULT_DELIMITER)
        return step_index(self.tokens, delimiter, self.token_ids.shape[1])

    def steps_from(self, starts: torch.Tensor) -> Trace:
        """Each row's steps from ``starts[i]`` on, left-aligned (what a row added since
        it was ``starts[i]`` tokens long), padded to the same width; token texts kept,
        response texts joined from them.

        Example:
            >>> t = Trace({"entropy": torch.tensor([[1.0, 2.0, 3.0]])},
            ...           torch.tensor([[4, 5, 6]]), torch.tensor([3]), tokens=[["a", "b", "c"]])
            >>> tail = t.steps_from(torch.tensor([1]))
            >>> tail.signals["entropy"].tolist(), tail.lengths.tolist(), tail.texts
            ([[2.0, 3.0, 0.0]], [2], ['bc'])
        """
        starts = torch.as_tensor(starts, device=self.token_ids.device).long()
        starts = torch.minimum(starts, self.lengths.to(starts.device))
        width = self.token_ids.shape[1]
        column = torch.arange(width, device=starts.device) + starts.unsqueeze(-1)
        index = column.clamp_max(max(width - 1, 0))
        lengths = self.lengths.to(starts.device) - starts
        valid = torch.arange(width, device=starts.device) < lengths.unsqueeze(-1)

        def shifted(x: torch.Tensor) -> torch.Tensor:
            moved = x.gather(1, index.to(x.device)) if width else x
            return torch.where(valid.to(x.device), moved, torch.zeros_like(moved))

        tokens = None
        if self.tokens is not None:
            tokens = [row[s:] for row, s in zip(self.tokens, starts.tolist(), strict=True)]
        return Trace(
            signals={k: shifted(v) for k, v in self.signals.items()},
            token_ids=shifted(self.token_ids),
            lengths=lengths.to(self.lengths.device),
            tokens=tokens,
            texts=None if tokens is None else ["".join(row) for row in tokens],
            meta=dict(self.meta),
        )

    def summary(self, *, unreliable_k: int = 25) -> list[dict[str, float]]:
        """Standard response-level scores per row.

        ``n_tokens``; ``naive`` and ``vanilla`` uncertainty (from ``max_prob``);
        ``mean_<signal>`` of every recorded signal; ``logtoku_topk_mean`` (mean of the
        ``unreliable_k`` most unreliable tokens, LogTokU's response score);
        ``deepconf_lowest_group`` (DeepConf, window 2048); ``sum_tokur_*`` (TokUR's
        detection scores; its selection scores are the means).
        """
        columns: dict[str, torch.Tensor] = {"n_tokens": self.lengths.float()}
        if "max_prob" in self.signals:
            columns["naive"] = aggregate.naive(self.signals["max_prob"], self.lengths)
            columns["vanilla"] = aggregate.vanilla(self.signals["max_prob"], self.lengths)
        for name in self.signals:
            columns[f"mean_{name}"] = self.aggregate(name, "mean")
        if "logtoku_unreliability" in self.signals:
            columns["logtoku_topk_mean"] = self.aggregate(
                "logtoku_unreliability", "topk_mean", k=unreliable_k
            )
        if "deepconf" in self.signals:
            columns["deepconf_lowest_group"] = self.aggregate("deepconf", "deepconf_lowest_group")
        for name in ("tokur_total", "tokur_aleatoric", "tokur_epistemic"):
            if name in self.signals:  # TokUR's detection aggregate is the sum
                columns[f"sum_{name}"] = self.aggregate(name, "sum")
        table = {k: v.detach().cpu().tolist() for k, v in columns.items()}
        return [
            {k: (int(v[i]) if k == "n_tokens" else float(v[i])) for k, v in table.items()}
            for i in range(len(self))
        ]

    # ------------------------------------------------------------------ export

    def to_dict(self) -> dict[str, Any]:
        """Plain Python structure (JSON-serialisable)."""
        ids = self.token_ids.detach().cpu().tolist()
        values = {name: self.values(name) for name in self.signals}
        summaries = self.summary()
        rows = []
        for i, n in enumerate(self.lengths.tolist()):
            row: dict[str, Any] = {"n_tokens": n, "token_ids": ids[i][:n]}
            if self.texts is not None:
                row["text"] = self.texts[i]
            if self.tokens is not None:
                row["tokens"] = self.tokens[i]
            row["values"] = {name: values[name][i] for name in self.signals}
            if self.alternatives is not None:
                row["alternatives"] = self.alternatives.row(i, n)
            row["summary"] = summaries[i]
            rows.append(row)
        return {"signals": list(self.signals), "meta": self.meta, "rows": rows}

    def to_json(self, **kwargs) -> str:
        """JSON text of :meth:`to_dict` (``kwargs`` go to :func:`json.dumps`)."""
        return json.dumps(self.to_dict(), **kwargs)

    def to_pandas(self):
        """Long-format ``pandas.DataFrame``: one row per (response, step)."""
        import pandas as pd

        records = []
        for i, row in enumerate(self.to_dict()["rows"]):
            for t in range(row["n_tokens"]):
                rec = {"row": i, "step": t, "token_id": row["token_ids"][t]}
                if "tokens" in row:
                    rec["token"] = row["tokens"][t]
                rec.update({name: vals[t] for name, vals in row["values"].items()})
                if "alternatives" in row:  # lists per step: the top-k ids, probabilities
                    alt = row["alternatives"]
                    rec["alt_ids"], rec["alt_probs"] = alt["ids"][t], alt["probs"][t]
                    if "tokens" in alt:
                        rec["alt_tokens"] = alt["tokens"][t]
                records.append(rec)
        return pd.DataFrame.from_records(records)

    def _repr_html_(self, color_by: str | None = None) -> str:
        """Tokens coloured from green (confident) to red (uncertain) by ``color_by``
        (default: ``chosen_prob``, else ``max_prob``, else the first signal); hovering
        a token shows the value and, when recorded, its step's top-``k`` alternatives."""
        name = color_by or next(
            (n for n in ("chosen_prob", "max_prob") if n in self.signals), self.names[0]
        )
        ids = self.token_ids.detach().cpu().tolist()
        parts = [f"<div><small>coloured by <b>{html.escape(name)}</b></small></div>"]
        for i, vals in enumerate(self.values(name)):
            scale = uncertainty_scale(name, vals)
            toks = self.tokens[i] if self.tokens is not None else [str(t) for t in ids[i]]
            alts = None if self.alternatives is None else self.alternatives.row(i, len(vals))
            spans = []
            for t, (tok, v, u) in enumerate(zip(toks, vals, scale, strict=True)):
                title = f"{name}={v:.4g}"
                if alts is not None:
                    names = alts["tokens"][t] if "tokens" in alts else alts["ids"][t]
                    title += "".join(
                        f"\n{a!r}: {p:.3f}" for a, p in zip(names, alts["probs"][t], strict=True)
                    )
                spans.append(
                    f'<span title="{html.escape(title)}" style="background:{_rgb(u)};'
                    f'padding:0 1px;border-radius:2px">{html.escape(tok)}</span>'
                )
            parts.append(
                f'<div style="font-family:monospace;white-space:pre-wrap;margin:4px 0">'
                f"{''.join(spans)}</div>"
            )
        return "".join(parts)


def uncertainty_scale(name: str, values: Sequence[float]) -> list[float]:
    """Map values of signal ``name`` to ``[0, 1]`` where 1 is the most uncertain.

    Outputs with values in [0, 1] (probabilities, LogTokU's epistemic) use that
    absolute scale; others are min-max scaled over ``values``. Confidence outputs are
    flipped (both facts from :data:`tokur_decode.core.signals.OUTPUTS`).
    """
    output = OUTPUTS.get(name)
    vals = [float(v) for v in values]
    if not vals:
        return []
    if output is not None and output.unit:
        scaled = [min(max(v, 0.0), 1.0) for v in vals]
    else:
        lo, hi = min(vals), max(vals)
        span = hi - lo
        scaled = [(v - lo) / span if span > 0 and math.isfinite(span) else 0.0 for v in vals]
    if output is not None and output.confidence:
        scaled = [1.0 - s for s in scaled]
    return scaled


def _rgb(u: float) -> str:
    """Green (u = 0) through yellow to red (u = 1), light enough to read text on."""
    u = min(max(u, 0.0), 1.0)
    red = int(120 + 135 * min(1.0, 2 * u))
    green = int(120 + 135 * min(1.0, 2 * (1 - u)))
    return f"rgb({red},{green},130)"
