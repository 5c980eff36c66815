"""Controller-level actions: a decoding loop of ours around the model and its KV cache.

A logits processor sees one step of a fixed batch: it cannot fork a row or take tokens
back. :class:`Controller` runs the loop itself, with the inputs ``model.generate``
builds (positions from the attention mask, one cached forward per step, float32
last-step logits), so that a *policy* can:

* **branch** (:class:`~.branching.BranchPolicy`): when a trigger fires for a row, or at
  the first token (CoT-decoding, Wang & Zhou 2024), fork the step's top-``k``
  alternatives into ``k`` rows that share the prefix cache
  (``DynamicCache.reorder_cache``), continue them all, and keep the best by a
  response-level score (chosen by the caller, :func:`tokur_decode.hf.generate`);
* **roll back** (:class:`~.rollback.RollbackPolicy`): when a (window) signal fires, take
  back the row's last ``rewind`` tokens, regenerate them with a fresh draw at
  ``temperature``, and keep whichever continuation scores better on the trigger's signal; at most
  ``max_retries`` times per row;
* **advance in reasoning steps** (:meth:`Controller.advance`): every row decodes to the
  end of its next step and waits there (masked padding) for the others, so that a
  caller can reweight and resample rows between steps (particle filtering,
  :mod:`tokur_decode.hf.particles`).

Taking tokens back does not crop the cache (the rows of a batch share one cache length):
the taken-back columns are masked out of attention and the last kept token is fed again
at its own position, so the next distribution is exactly the one after the kept prefix.
A restore works the same way in reverse. Every step still appends one column per row;
the visible columns of a row always hold its prefix, one token per position (tested
against a plain forward over prompt + answer).

With no policy, the controller reproduces ``model.generate`` token for token under
greedy decoding (tested). The per-step work stays on the device; the loop reads one
boolean per step to stop when every row has finished (as ``generate`` does) and, with a
policy, one per step to see whether a trigger fired; forks and rewinds (rare) read what
they need from the device.

Example:
    >>> import torch
    >>> from tokur_decode.hf import UncertaintyMonitor
    >>> from tokur_decode.models import tiny_model
    >>> model = tiny_model("llama")
    >>> monitor = UncertaintyMonitor(["entropy", "margin"], eos_token_id=255)
    >>> ctrl = Controller(model, monitor, eos_token_ids=[255], pad_token_id=0, max_new_tokens=4)
    >>> enc = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.ones(1, 3)}
    >>> trace = ctrl.run(enc)
    >>> reference = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
    >>> torch.equal(trace.token_ids, reference[:, 3:])
    True
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from ..core.checks import check_temperature, check_top_p
from ..core.steps import StepEnds
from ..core.text import decode_rows
from ..core.trace import Trace
from .monitor import UncertaintyMonitor

__all__ = ["Controller"]

#: Per-row state tensors that forks select and every step extends or updates.
_ROW_STATE = (
    "tokens",
    "attention",
    "positions",
    "answer",
    "finished",
    "n_answer",
    "next_pos",
    "temperature",
    "force",
    "forced_token",
    "refeed",
    "refeed_token",
    "refeed_pos",
    "paused",
    "just_paused",
    "step_start",
    "step_tail",
)


class Controller:
    """Decode a left-padded batch step by step, letting a policy fork and rewind rows.

    Args:
        model: a transformers causal LM (a :func:`~tokur_decode.hf.perturbed` one works:
            the monitor then records TokUR too).
        monitor: records every step's signals; it sees the logits first.
        eos_token_ids: ids that end a row's answer.
        pad_token_id: what finished rows append.
        temperature: 0 decodes greedily; otherwise samples (with ``top_p``) from the
            controller's own generator seeded with ``seed``.
        max_new_tokens: answer tokens per row (taken-back tokens do not count).

    State, per row, on the model's device: ``tokens``/``attention``/``positions``
    ``[B, L]`` for every column ever fed; ``answer`` ``[B, S]``: whether step ``s``'s token
    is in the row's answer now; ``finished``, ``n_answer``, ``temperature`` ``[B]``.
    """

    def __init__(
        self,
        model,
        monitor: UncertaintyMonitor,
        *,
        eos_token_ids: Sequence[int],
        pad_token_id: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        max_new_tokens: int = 64,
    ) -> None:
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_temperature(temperature)
        check_top_p(top_p)
        if not eos_token_ids:
            raise ValueError("eos_token_ids: at least one EOS id is required")
        self.model = model
        self.monitor = monitor
        self.device = model.device
        self.eos = torch.tensor(list(eos_token_ids), device=self.device)
        self.pad_token_id = pad_token_id
        self.base_temperature = temperature
        self.top_p = top_p
        self.max_new_tokens = max_new_tokens
        self._may_sample = False  # whether any row may sample (see set_temperature)
        self.generator = torch.Generator(device=self.device)
        if seed is not None:
            self.generator.manual_seed(seed)
        self._keep = (
            {"logits_to_keep": 1}
            if "logits_to_keep" in inspect.signature(model.forward).parameters
            else {}
        )

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.tokens.shape[1] - self.answer.shape[1]

    # ------------------------------------------------------------------ loop

    @torch.no_grad()  # as model.generate: decoding builds no autograd graph
    def run(self, enc, policy=None, tokenizer=None) -> Trace:
        """Decode ``enc`` (``input_ids`` and ``attention_mask``, left-padded) under
        ``policy`` (:class:`Branch`, :class:`Rollback` or ``None``) and return the trace
        of every row's answer (see :meth:`trace`)."""
        self._prefill(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))
        if policy is not None:
            policy.start(self)
        limit = self.max_new_tokens + (policy.extra_steps if policy is not None else 0)
        for step in range(limit):
            self.scores = self.monitor(self.tokens, self.logits)
            if policy is not None:
                policy.step(self, step)
            self._append(self._choose(self.scores))
            if bool(self.finished.all()):
                break
            self.logits = self._forward(self.tokens[:, -1:], self.positions[:, -1:])
        return self.trace(tokenizer)

    # ------------------------------------------------------------------ steps

    @torch.no_grad()
    def start(self, enc) -> None:
        """Prefill ``enc`` (as :meth:`run` does first) for decoding in :meth:`advance`."""
        self._prefill(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device))

    @torch.no_grad()
    def advance(self, ends: StepEnds, max_tokens: int, hold: torch.Tensor | None = None) -> None:
        """Decode every unfinished row to the end of its next reasoning step: its text
        since the step began contains the delimiter of ``ends``, or ``max_tokens``
        tokens. A row that ends its step first waits (it appends masked padding, as a
        finished row does) until every row has ended its step or finished; the rows
        ``hold`` (``[B]`` bool) marks wait the whole call.

        The next call resumes the waiting rows exactly after their last token: a row
        whose step ended at the last column feeds it now; one that waited longer has
        that token fed again at its own position (its padding stays masked), so its
        next distribution, TokUR's samples included, is the one after its prefix.
        :meth:`select_rows` between calls continues from copies of rows (resampling).
        """
        hold = torch.zeros_like(self.finished) if hold is None else hold.to(self.device)
        if bool((self.finished | hold).all()):
            return
        if self._pending:
            self.logits = self._forward(self.tokens[:, -1:], self.positions[:, -1:])
            self._pending = False
        resumed = self.paused & ~self.just_paused & ~self.finished & ~hold
        for row in resumed.nonzero().flatten().tolist():
            visible = self.attention[row].bool()
            self._feed_again(row, self._hide_from(row, int(self.positions[row][visible].max())))
        self.paused = hold.clone()
        self.step_start = self.n_answer.clone()
        self.step_tail = ends.start(self.batch_size)
        while True:
            self.scores = self.monitor(self.tokens, self.logits)
            stepping = ~self.finished & ~self.paused & ~self.refeed
            self._append(self._choose(self.scores))
            ended, tail = ends.update(self.tokens[:, -1], self.step_tail)
            self.step_tail = torch.where(stepping.unsqueeze(-1), tail, self.step_tail)
            full = self.n_answer - self.step_start >= max_tokens
            self.just_paused = stepping & ~self.finished & (ended | full)
            self.paused = self.paused | self.just_paused
            if bool((self.finished | self.paused).all()):
                self._pending = True
                return
            self.logits = self._forward(self.tokens[:, -1:], self.positions[:, -1:])

    def _prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        batch = input_ids.shape[0]
        mask = attention_mask.long()
        self.tokens = input_ids
        self.attention = mask
        self.positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
        self.answer = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        zeros = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.finished = zeros.bool()
        self.n_answer = zeros.clone()
        self.next_pos = self.positions[:, -1] + 1
        self.temperature = torch.full((batch,), float(self.base_temperature), device=self.device)
        self.force, self.forced_token = zeros.bool(), zeros.clone()
        self.refeed, self.refeed_token, self.refeed_pos = zeros.bool(), zeros.clone(), zeros.clone()
        self.paused, self.just_paused = zeros.bool(), zeros.bool()
        self.step_start = zeros.clone()
        self.step_tail = torch.zeros(batch, 0, dtype=torch.bool, device=self.device)
        self._pending = False  # the last column is appended but not fed yet (see advance)
        #: Answer tokens decoded so far over all rows, taken-back ones included (a
        #: 0-d device tensor: reading it is the caller's choice).
        self.generated = zeros.new_zeros(())
        self.cache = DynamicCache(config=self.model.config)
        self.monitor.reset()
        self.logits = self._forward(input_ids, self.positions)

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=input_ids,
            attention_mask=self.attention,
            position_ids=positions,
            past_key_values=self.cache,
            use_cache=True,
            **self._keep,
        )
        return out.logits[:, -1, :].to(copy=True, dtype=torch.float32)

    def _choose(self, scores: torch.Tensor) -> torch.Tensor:
        """Greedy where a row's temperature is 0, else a draw at its temperature/top-p;
        then tokens a policy forced."""
        token = scores.argmax(dim=-1)
        if self.base_temperature > 0 or self._may_sample:
            temp = self.temperature.clamp_min(1e-6).unsqueeze(-1)
            probs = torch.softmax(scores / temp, dim=-1)
            if self.top_p < 1:
                sorted_probs, order = probs.sort(dim=-1, descending=True)
                drop = sorted_probs.cumsum(dim=-1) - sorted_probs > self.top_p
                probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
            drawn = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
            token = torch.where(self.temperature > 0, drawn, token)
        return torch.where(self.force, self.forced_token, token)

    def _append(self, chosen: torch.Tensor) -> None:
        """Append one column per row: the chosen token, a token fed again, or padding."""
        live = ~self.finished & ~self.paused
        is_answer = live & ~self.refeed
        token = torch.where(
            self.refeed, self.refeed_token, torch.where(live, chosen, self.pad_token_id)
        )
        pos = torch.where(self.refeed, self.refeed_pos, self.next_pos)
        self.tokens = torch.cat([self.tokens, token.unsqueeze(-1)], dim=-1)
        self.attention = torch.cat([self.attention, (live | self.refeed).long().unsqueeze(-1)], -1)
        self.positions = torch.cat([self.positions, pos.unsqueeze(-1)], dim=-1)
        self.answer = torch.cat([self.answer, is_answer.unsqueeze(-1)], dim=-1)
        self.next_pos = pos + 1
        self.n_answer = self.n_answer + is_answer.long()
        self.generated = self.generated + is_answer.sum()
        ended = is_answer & torch.isin(token, self.eos)
        self.finished = self.finished | ended | (self.n_answer >= self.max_new_tokens)
        self.force = torch.zeros_like(self.force)
        self.refeed = torch.zeros_like(self.refeed)

    # ------------------------------------------------------------------ policy tools

    def select_rows(self, index: Sequence[int]) -> None:
        """Continue with rows ``index`` (repeats fork a row), cache and record included."""
        idx = torch.tensor(list(index), dtype=torch.long, device=self.device)
        self.cache.reorder_cache(idx)
        for name in _ROW_STATE:
            setattr(self, name, getattr(self, name).index_select(0, idx))
        self.scores = self.scores.index_select(0, idx)
        self.monitor.select_rows(idx)

    def answer_steps(self, row: int) -> list[int]:
        """The steps (record columns) that make up ``row``'s answer now, in order."""
        return self.answer[row].nonzero().flatten().tolist()

    def take_back(self, row: int, steps: Sequence[int]) -> None:
        """Remove ``steps`` (the last answer steps of ``row``) from its answer; the next
        column feeds the token before them again, so decoding resumes there."""
        start = int(self.positions[row, self.prompt_len + steps[0]])
        before = self._hide_from(row, start - 1)
        self.answer[row, list(steps)] = False
        self.n_answer[row] -= len(steps)
        self._feed_again(row, before)
        self.finished[row] = False

    def put_back(self, row: int, steps: Sequence[int], drop: Sequence[int]) -> None:
        """Undo a :meth:`take_back`: answer ``steps`` return, the answer steps ``drop``
        (the regenerated ones) leave; decoding resumes after ``steps``."""
        p = self.prompt_len
        self._hide_from(row, int(self.positions[row, p + steps[0]]))
        self.answer[row, list(drop)] = False
        self.attention[row, [p + s for s in steps[:-1]]] = 1
        self.answer[row, list(steps)] = True
        self._feed_again(row, p + steps[-1])
        self.n_answer[row] += len(steps) - len(drop)
        self.finished[row] = bool(self.n_answer[row] >= self.max_new_tokens)

    def _hide_from(self, row: int, position: int) -> int:
        """Mask every visible column of ``row`` at ``position`` or later (the visible
        columns always hold one token per position, though not in column order once
        tokens were fed again); returns the column that was visible at ``position``."""
        visible = self.attention[row].bool()
        later = visible & (self.positions[row] >= position)
        column = int((visible & (self.positions[row] == position)).nonzero().flatten()[0])
        self.attention[row] = self.attention[row].masked_fill(later, 0)
        return column

    def _feed_again(self, row: int, column: int) -> None:
        self.refeed[row] = True
        self.refeed_token[row] = self.tokens[row, column]
        self.refeed_pos[row] = self.positions[row, column]

    def set_temperature(self, row: int, value: float) -> None:
        self.temperature[row] = value
        self._may_sample = self._may_sample or value > 0

    # ------------------------------------------------------------------ result

    def trace(self, tokenizer=None) -> Trace:
        """Every row's answer: its steps' signals, left-aligned, with their tokens (and
        texts when a ``tokenizer`` is given)."""
        full = self.monitor.trace(self.tokens)
        keep = self.answer
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        lengths = keep.sum(dim=1)
        ids = full.token_ids.gather(1, order)
        valid = torch.arange(ids.shape[1], device=ids.device) < lengths.unsqueeze(-1)
        ids = ids.masked_fill(~valid, self.pad_token_id)
        signals = {name: values.gather(1, order) for name, values in full.signals.items()}
        tokens, texts = decode_rows(tokenizer, ids, lengths)
        return Trace(
            signals=signals,
            token_ids=ids,
            lengths=lengths,
            tokens=tokens,
            texts=texts,
            meta={**full.meta, "controller": True},
        )
