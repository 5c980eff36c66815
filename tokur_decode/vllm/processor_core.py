"""The core of the vLLM logits processors: per-request state, the per-step group pass,
the finished traces. :class:`~tokur_decode.vllm.processor.UncertaintyProcessor` drives
it through one thin adapter per vLLM runner (:mod:`~tokur_decode.vllm.v1_batch`,
:mod:`~tokur_decode.vllm.mrv2_slots`); an
adapter maps its interface's batch rows to :class:`TrackedRequest` objects
(:attr:`ProcessorCore.rows`), calls :meth:`ProcessorCore.regroup` when they change and
:meth:`ProcessorCore.apply_group` per group and step.

Bookkeeping (vLLM's persistent batch reorders rows under the processor):

* Each opted-in request gets a **slot** when it first enters the batch and keeps it
  until it finishes; rows map to slots, so moves and swaps only remap Python dicts, and
  a request that leaves the batch without finishing (preempted, not scheduled this
  step) keeps its slot and its state until it comes back. Requests are recognised by
  their ``SamplingParams`` object (the worker keeps the same one for a request's life).
* Steps are keyed on the **number of output tokens** (the live ``output_ids`` list), not
  on calls: a chunked prefill calls the processor several times at step 0; each call
  overwrites the step's record and redoes the trigger's update for it.
* The values that need the emitted token (the chosen-token signals, TokUR's implicit
  reward) of step ``t`` are completed at step ``t + 1`` (or when the request finishes or
  leaves the batch) from the live ``output_ids``: each settings group keeps a reference
  to its last step's read of the logits (a copy the signal pass writes while it reads
  them, and the TokUR pass's log-probabilities) and each slot its row and step there,
  so the completion is one gather per row, done before the group's next signal pass
  reuses that memory.

Per step, the opted-in rows are processed in one vectorised pass per settings group
(requests with equal signal parameters, trigger and action; usually one group): the
group's rows (a view when they are contiguous, else one ``index_select``), one read of
them (:func:`~tokur_decode.core.logit_stats.read_logits`: compiled, two sweeps; its kept
copy in the group's :class:`~tokur_decode.core.logit_stats.Workspace`, so no ``[rows,
V]`` allocation: on CPU each fresh one page-faults), one scatter into the slot buffers, one
trigger update, one ``index_copy_`` of the edited rows. The only per-row Python is
reading the lengths of the live ``output_ids`` lists. Nothing reads device values on
the host. A batch where no request opted in returns at once.

A request with ``tokur_alternatives = k`` also gets each step's top-``k`` tokens (from
the signal pass's top-k, which reads at least ``k``) in a separate ``[slots, steps, 2 x 20]``
record, allocated when the first such request arrives.

Finished requests' traces wait, bounded (:attr:`ProcessorCore.max_finished`,
oldest dropped first), until the caller collects them through the worker extension
(:mod:`tokur_decode.vllm.worker`); the extension also tells the processor each
request's id and whether a request that left the batch finished.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..core.events import BLOCKED, OVERRIDDEN, Fire
from ..core.logit_edits import adaptive_temperature, force_eos, force_token, token_logits, veto
from ..core.logit_stats import LogitStats
from ..core.policy import TriggerState
from ..core.recording import MAX_ALTERNATIVES
from ..core.signals import (
    CHOSEN_SIGNALS,
    SIGNALS,
    SignalSpec,
    Workspace,
    bayesian_terms,
    chosen_signals,
    implicit_reward,
    logit_signals,
    wants_samples,
    warm_up,
)
from ..core.trace import Alternatives
from . import internals
from .args import RequestSettings, parse_settings
from .tokur import TOKUR_OUTPUTS, TOKUR_STEP_OUTPUTS, link_of

__all__ = ["KEYS", "Group", "ProcessorCore", "TrackedRequest", "validate_params"]

logger = logging.getLogger(__name__)

#: Columns of the per-slot record: every signal output, then the action's facts.
KEYS: tuple[str, ...] = (
    *(key for keys in SIGNALS.values() for key in keys),
    *TOKUR_OUTPUTS,
    "action_fired",
    "action_value",
    "action_blocked",
)
_COL = {key: i for i, key in enumerate(KEYS)}
#: ``action_blocked``'s codes: acted (0), the EOS forbidden by an earlier stage (1), the
#: EOS replaced by a later stage (2).
OVERRIDDEN_CODE = 2.0
_BLOCKED_REASONS = (None, BLOCKED, OVERRIDDEN)


@dataclass(eq=False)
class TrackedRequest:
    """One opted-in request known to the processor."""

    settings: RequestSettings
    params: object  # the SamplingParams, kept alive so that its id() stays unique
    outputs: list[int]  # vLLM's live output_ids list
    slot: int
    eos: int
    req_id: str | None = None
    threshold: float = 0.0


@dataclass(eq=False)
class Group:
    """The rows of one step that share a signal pass and a trigger state."""

    settings: RequestSettings
    spec: SignalSpec
    rows: torch.Tensor
    slots: torch.Tensor
    outputs: list[list[int]]
    cols: torch.Tensor
    chosen: tuple[str, ...]  # the outputs completed at the next step (need the token)
    start: int | None = None  # first row when the rows are contiguous
    present: torch.Tensor | None = None  # [S] bool
    eos: torch.Tensor | None = None  # [rows]: each row's EOS (a stop action's groups)
    eos_mask: torch.Tensor | None = None  # [rows, V] bool
    names: tuple[str, ...] = ()  # the outputs recorded per step (spec's, TokUR's)
    tokur: torch.Tensor | None = None  # the rows' places in the TokUR samples
    resumed: torch.Tensor | None = None  # [rows] bool: branch continuations
    forced: torch.Tensor | None = None  # [rows] bool: ... whose first token is given
    first_token: torch.Tensor | None = None  # [rows]: that token (0 where none)
    first_logits: torch.Tensor | None = None  # [rows, V]: logits that emit it
    alt_cols: torch.Tensor | None = None  # the alternatives' columns (ids, then probs)

    @property
    def needs_last(self) -> bool:
        """Whether the step needs each row's last emitted token: for the values completed
        a step late, and to tell whether a stop's EOS was emitted."""
        return bool(self.chosen) or self.eos is not None


class _TriggerSlots:
    """A :class:`TriggerState` over every slot, with each slot's state before its last
    update (so that a step fed again replaces its first feeding)."""

    def __init__(self, settings: RequestSettings, slots: int, device) -> None:
        self.state = TriggerState(settings.trigger, slots, device, [0.0] * slots)
        self.before = self.state.snapshot()
        self.last_pos = torch.full((slots,), -1, dtype=torch.long, device=device)


def validate_params(sampling_params) -> None:
    """Reject a request with bad ``tokur_`` settings (``ValueError`` naming the key;
    vLLM turns it into a rejected request, HTTP 400 over the server)."""
    settings = parse_settings(sampling_params.extra_args)
    if settings is not None and settings.action == "stop" and sampling_params.ignore_eos:
        raise ValueError("tokur_action: 'stop' forces EOS, which ignore_eos=True disables")


class ProcessorCore:
    """The state and the per-step work of the uncertainty processor, whatever vLLM
    interface drives it.

    An adapter owns the mapping from its batch rows to requests: it creates requests
    with :meth:`new_request` (or finds them again with :meth:`request_of`), sets
    :attr:`rows`, calls :meth:`regroup` after a change and :meth:`apply_group` for each
    of :attr:`groups` at every step. A request that leaves the batch for good is
    :meth:`drop`-ped (its trace kept once :attr:`runner` is bound); one that leaves for a
    while is :meth:`hold`-ed.
    """

    #: Finished traces kept until collected; beyond this the oldest are dropped.
    max_finished = 4096

    def __init__(self, vllm_config, device, pin_memory: bool = False) -> None:
        self.device = torch.device(device)
        self.pin = pin_memory
        self.vocab = vllm_config.model_config.get_vocab_size()
        self.max_len = vllm_config.model_config.max_model_len
        #: The model runner, once the worker extension binds it (traces are kept then).
        self.runner = None
        #: Batch row -> opted-in request, as the adapter last laid it out.
        self.rows: dict[int, TrackedRequest] = {}
        #: This step's groups (rows sharing a signal pass and a trigger state).
        self.groups: list[Group] = []
        self._by_params: dict[int, TrackedRequest] = {}  # id(params) -> request, until finished
        self._free: list[int] = []
        self._slots = 0
        self._cap = 0
        self._record = torch.zeros(0, 0, len(KEYS), device=self.device)
        # Values that need the emitted token: each group's last read of the logits (its
        # kept copy [rows, V]) and TokUR's (lp [rows, M, V], log p_bar [rows, 1, V]) (by group key),
        # each slot's row and step there (-1: nothing pending).
        self._last_read: dict[tuple, LogitStats] = {}
        self._last_bayes: dict[tuple, tuple[torch.Tensor, torch.Tensor] | None] = {}
        self._workspaces: dict[tuple, Workspace] = {}  # per group key: no [rows, V] allocations
        self._lp_row = torch.zeros(0, dtype=torch.long, device=self.device)
        self._lp_pos = torch.zeros(0, dtype=torch.long, device=self.device)
        self._steps = torch.zeros(0, dtype=torch.long, device=self.device)  # recorded per slot
        self._triggers: dict[tuple, _TriggerSlots] = {}
        self._finished: OrderedDict[str, dict] = OrderedDict()
        self._requests = 0  # opted-in requests seen (a counter for operators)
        # Top-k alternatives [slots, steps, ids then probabilities], once someone asks.
        self._alts: torch.Tensor | None = None
        self._columns: dict[tuple[str, ...], torch.Tensor] = {}  # record columns, on device
        self._tokur = link_of(vllm_config)  # shared with a TokUR model (tokur_engine_args)
        self._grow_slots(max(8, vllm_config.scheduler_config.max_num_seqs))
        warm_up(self.vocab, self.device)  # compiled as the engine starts, not at a request

    # ------------------------------------------------------------------ requests

    def request_of(self, params) -> TrackedRequest | None:
        """The unfinished request of this ``SamplingParams`` object, if any."""
        return self._by_params.get(id(params))

    def new_request(self, params, outputs: list[int]) -> TrackedRequest | None:
        """State for a request that opts in (a slot, its trigger threshold), or None."""
        settings = parse_settings(params.extra_args)
        if settings is None:
            return None
        if settings.branch_token is not None and settings.branch_token >= self.vocab:
            logger.warning(
                "tokur_branch_token=%d is not a token id of this model (vocabulary %d): "
                "the continuation's first token is not forced",
                settings.branch_token,
                self.vocab,
            )
            settings = dataclasses.replace(settings, branch_token=-1)
        if self._tokur.config is None and wants_samples(settings.signals):
            logger.warning(
                "tokur_signals asks for 'tokur' on an engine without TokUR's model: its "
                "values are NaN (build the engine with tokur_engine_args)"
            )
        stops = sorted(params.all_stop_token_ids)
        eos = params.eos_token_id if params.eos_token_id is not None else stops[0]
        req = TrackedRequest(settings, params, outputs, self._take_slot(settings), eos)
        if settings.trigger is not None:
            req.threshold = settings.trigger.threshold
            self._trigger(settings).state.threshold[req.slot] = req.threshold
        self._by_params[id(params)] = req
        self._requests += 1
        return req

    def drop(self, req: TrackedRequest) -> None:
        """Forget ``req`` for good (finished, or its place given away); its trace is kept
        for :meth:`collect` once the runner is bound."""
        del self._by_params[id(req.params)]
        self._tokur.forget(id(req.params))
        if self.runner is not None and req.req_id is not None:
            self._finish(req)
        self._free.append(req.slot)

    def hold(self, req: TrackedRequest, n=None, last=None) -> None:
        """``req`` left the batch for a while (preempted, not scheduled): it keeps its
        slot; its pending chosen-token values are completed now, from its live output
        list or from ``n`` / ``last`` (see :meth:`complete_from`), since the kept
        logits move on."""
        if n is None:
            self._complete(req)
        else:
            self.complete_from(req, n, last)
        self._lp_pos[req.slot] = -1

    def resume(self, req: TrackedRequest) -> None:
        """``req`` is a request that came back under its id after it was dropped (MRV2
        re-adds a preempted request): its recorded steps so far are restored."""
        resumed = self._finished.pop(req.req_id, None)
        if resumed is not None:
            record = resumed["record"]
            self._record[req.slot, : record.shape[0]] = record

    def _complete(self, req: TrackedRequest) -> None:
        """Write the request's pending chosen-token values (its last step's) from the
        kept logits and its last output token."""
        if req.outputs:
            n, last = self.tensor([len(req.outputs)]), self.tensor([req.outputs[-1]])
            self.complete_from(req, n, last)

    def complete_from(self, req: TrackedRequest, n: torch.Tensor, last: torch.Tensor) -> None:
        """Write the request's pending values of its last step (those that need its
        token) from ``[1]`` tensors: its number of output tokens and its last one (on
        the device: no host synchronisation)."""
        slot = self.tensor([req.slot])
        if req.settings.action == "stop":
            self._settle_stops(slot, n, last, self.tensor([req.eos]))
        chosen = _deferred_outputs(req.settings.signals)
        if chosen:
            self._write_deferred(req.settings.group_key, chosen, slot, n, last)

    def _finish(self, req: TrackedRequest) -> None:
        self._complete(req)
        n = len(req.outputs)
        k = req.settings.recording.alternatives
        self._finished[req.req_id] = {
            "record": self._record[req.slot, :n].clone(),
            "alternatives": None if not k else self._alts[req.slot, :n].clone(),
            "token_ids": list(req.outputs),
            "settings": req.settings,
            "threshold": req.threshold,
        }
        while len(self._finished) > self.max_finished:
            self._finished.popitem(last=False)

    def _take_slot(self, settings: RequestSettings) -> int:
        if not self._free:
            self._grow_slots(2 * self._slots)
        slot = self._free.pop()
        self._lp_pos[slot] = -1
        self._steps[slot] = 0
        if settings.trigger is not None:
            trig = self._trigger(settings)
            mask = torch.zeros(self._slots, dtype=torch.bool, device=self.device)
            mask[slot] = True
            trig.state.reset_rows(mask)
            trig.before = trig.state.snapshot()
            trig.last_pos[slot] = -1
        return slot

    def _grow_slots(self, slots: int) -> None:
        old = self._slots
        self._free.extend(range(slots - 1, old - 1, -1))
        self._slots = slots
        pad = (0, 0, 0, 0, 0, slots - old)
        self._record = torch.nn.functional.pad(self._record, pad)
        self._lp_row = torch.nn.functional.pad(self._lp_row, (0, slots - old))
        self._lp_pos = torch.nn.functional.pad(self._lp_pos, (0, slots - old), value=-1)
        self._steps = torch.nn.functional.pad(self._steps, (0, slots - old))
        if self._alts is not None:
            self._alts = torch.nn.functional.pad(self._alts, pad)
        index = torch.arange(slots, device=self.device).clamp(max=max(old - 1, 0))
        new = torch.arange(slots, device=self.device) >= old
        for trig in self._triggers.values():
            trig.state.select_rows(index)
            trig.state.reset_rows(new)
            trig.before = trig.state.snapshot()
            trig.last_pos = trig.last_pos.index_select(0, index).masked_fill(new, -1)

    def _trigger(self, settings: RequestSettings) -> _TriggerSlots:
        key = settings.group_key
        if key not in self._triggers:
            self._triggers[key] = _TriggerSlots(settings, self._slots, self.device)
        return self._triggers[key]

    def regroup(self) -> None:
        """Rebuild :attr:`groups` from :attr:`rows` (after the rows changed)."""
        by_key: dict[tuple, list[tuple[int, TrackedRequest]]] = {}
        for row, req in sorted(self.rows.items()):
            by_key.setdefault(req.settings.group_key, []).append((row, req))
        self.groups = [self._group(members) for members in by_key.values()]
        self._publish_tokur(list(by_key.values()))
        self._last_read = {k: v for k, v in self._last_read.items() if k in by_key}
        self._last_bayes = {k: v for k, v in self._last_bayes.items() if k in by_key}
        self._workspaces = {k: self._workspaces.get(k) or Workspace() for k in by_key}

    def _publish_tokur(self, memberships: list[list[tuple[int, TrackedRequest]]]) -> None:
        """Tell the TokUR model which rows want perturbed samples (the adapters regroup
        before the forward: V1 in ``update_state``, MRV2 from the batch it builds) and
        each group where its rows' samples will be; the model runs its perturbed passes
        only while some row wants them."""
        rows, keys, sigmas = [], [], []
        for group, members in zip(self.groups, memberships, strict=True):
            if wants_samples(group.settings.needed_signals()):
                group.tokur = self.tensor(list(range(len(rows), len(rows) + len(members))))
                rows += [row for row, _ in members]
                keys += [id(req.params) for _, req in members]
                sigmas += [req.settings.sigma for _, req in members]
        self._tokur.publish(rows, keys, sigmas, self.device)

    def _group(self, members: list[tuple[int, TrackedRequest]]) -> Group:
        settings = members[0][1].settings
        needed = dict.fromkeys(s for _, r in members for s in r.settings.needed_signals())
        chosen = _deferred_outputs(needed)
        deepconf_k, logtoku_k, evidence = settings.spec_params
        spec = SignalSpec(
            logit_signals(s for s in needed if s not in CHOSEN_SIGNALS),
            deepconf_k=deepconf_k,
            logtoku_k=logtoku_k,
            logtoku_evidence=evidence,
        )
        names = spec.output_names + (TOKUR_STEP_OUTPUTS if wants_samples(needed) else ())
        slots = self.tensor([r.slot for _, r in members])
        rows = [row for row, _ in members]
        group = Group(
            settings=settings,
            spec=spec,
            rows=self.tensor(rows),
            slots=slots,
            outputs=[r.outputs for _, r in members],
            names=names,
            cols=self.columns(names),
            chosen=chosen,
            start=rows[0] if rows[-1] - rows[0] == len(rows) - 1 else None,
        )
        k = settings.recording.alternatives
        if k:
            group.alt_cols = self.tensor(
                [*range(k), *range(MAX_ALTERNATIVES, MAX_ALTERNATIVES + k)]
            )
        if settings.trigger is not None:
            present = torch.zeros(self._slots, dtype=torch.bool, device=self.device)
            group.present = present.index_fill(0, slots, True)
        if settings.action == "stop":
            group.eos = self.tensor([r.eos for _, r in members])
            mask = torch.zeros(len(members), self.vocab, dtype=torch.bool, device=self.device)
            group.eos_mask = mask.scatter(1, group.eos.unsqueeze(-1), True)
        branch = [r.settings.branch_token for _, r in members]
        if any(token is not None for token in branch):
            token = [-2 if t is None else t for t in branch]
            token = self.tensor(token)
            group.resumed, group.forced = token >= -1, token >= 0
            group.first_token = token.clamp_min(0)
            group.first_logits = token_logits(group.first_token, self.vocab)
        return group

    def columns(self, names: tuple[str, ...]) -> torch.Tensor:
        """The record's column indices of ``names`` on the device (made once per tuple:
        the per-step writes reuse them)."""
        if names not in self._columns:
            self._columns[names] = self.tensor([_COL[k] for k in names])
        return self._columns[names]

    def tensor(self, values: list[int]) -> torch.Tensor:
        """``values`` as a long tensor on the device (through pinned memory when allowed)."""
        cpu = torch.tensor(values, dtype=torch.long, pin_memory=self.pin)
        return cpu.to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ traces

    def collect(self, request_ids=None) -> list[dict]:
        """Finished traces of the requests whose caller-side id (``RequestOutput.
        request_id``) is in ``request_ids`` (all when ``None``), forgotten once returned;
        plain Python values, for the RPC. Each carries ``request_id`` (the caller's id)
        and ``index`` (the completion's index when ``n > 1``, else 0).

        Runs in inference mode: the records were made in the engine's forward (inference
        tensors), and finishing a request here writes its last deferred values into them.
        """
        with torch.inference_mode():
            return self._collect(request_ids)

    def _collect(self, request_ids) -> list[dict]:
        wanted = None if request_ids is None else set(request_ids)
        # The caller holds these outputs, so they are finished, but vLLM tells the worker
        # only at its next step (never, after the last one): finish them now.
        done = [
            (row, req)
            for row, req in self.rows.items()
            if req.req_id is not None
            and internals.external_id(req.req_id, wanted)[0] in (wanted or ())
        ]
        for row, req in done:
            del self.rows[row]
            self.drop(req)
        if done:
            self.regroup()
        out = []
        for rid in list(self._finished):
            external, index = internals.external_id(rid, wanted)
            if wanted is None or external in wanted:
                out.append(
                    {**_to_python(self._finished.pop(rid)), "request_id": external, "index": index}
                )
        return out

    def peek(self, starts: dict[str, int]) -> list[dict]:
        """What is recorded so far of the live or finished requests whose caller-side id
        is in ``starts``, from step ``starts[id]`` on, without forgetting anything (a
        server streaming them asks between steps). Each item: ``request_id``, ``index``,
        ``start``, ``signals`` (the asked-for outputs, one value per step from ``start``
        to the tokens generated so far) and ``final``: the steps up to which the
        outputs that need the emitted token (chosen-token, TokUR's reward) are complete
        (the last step's are written at the next one, or when the request ends)."""
        wanted = set(starts)
        out = []
        with torch.inference_mode():
            for req in self._by_params.values():
                if req.req_id is None:
                    continue
                external, index = internals.external_id(req.req_id, wanted)
                if external in wanted:
                    n = int(self._steps[req.slot])  # read between steps: no step waits
                    record = self._record[req.slot, :n]
                    item = _peeked(record, req.settings, starts[external], n - 1)
                    out.append({**item, "request_id": external, "index": index})
            for rid, entry in self._finished.items():
                external, index = internals.external_id(rid, wanted)
                if external in wanted:
                    n = len(entry["token_ids"])
                    item = _peeked(entry["record"], entry["settings"], starts[external], n)
                    out.append({**item, "request_id": external, "index": index})
        return out

    def stats(self) -> dict[str, int]:
        """Opted-in requests seen, tracked now, and finished traces waiting."""
        return {
            "requests": self._requests,
            "tracked": len(self._by_params),
            "unread": len(self._finished),
        }

    # ------------------------------------------------------------------ hot path

    def apply_group(
        self, g: Group, logits: torch.Tensor, pos: torch.Tensor, last: torch.Tensor, top: int
    ) -> None:
        """The step of one group: ``pos`` ``[rows]`` is each
        row's number of output tokens (the step), ``last`` ``[rows]`` its last output
        token (read only for chosen-token signals), ``top`` an upper bound of ``pos``
        known on the host."""
        if top >= self._cap:
            self._grow_steps(top + 1)
        if g.start is None:
            z = logits.index_select(0, g.rows)
        else:
            z = logits.narrow(0, g.start, g.slots.shape[0])
        key = g.settings.group_key
        if g.eos is not None:
            self._settle_stops(g.slots, pos, last, g.eos)
        if g.chosen:  # before the signal pass reuses the kept logits' memory
            self._write_deferred(key, g.chosen, g.slots, pos, last)
        alternatives = g.settings.recording.alternatives
        values, read = g.spec.compute(
            z, top=alternatives, keep=bool(g.chosen), workspace=self._workspaces[key]
        )
        if g.tokur is not None:
            values |= self._tokur_values(g, key)
        if alternatives:
            self._record_alternatives(g, read, pos)

        stacked = torch.stack([values[k] for k in g.names], dim=-1)
        self._record.index_put_((g.slots[:, None], pos[:, None], g.cols[None, :]), stacked)
        self._steps.index_copy_(0, g.slots, pos + 1)  # what a streaming server may read
        if g.chosen:  # this step's, completed at the next one
            self._last_read[key] = read
            self._lp_row.index_copy_(0, g.slots, torch.arange(len(g.outputs), device=self.device))
            self._lp_pos.index_copy_(0, g.slots, pos)

        # A branch continuation's first step is the branch point: measured above, its
        # token may be given, and the trigger (which fired there) watches from the next.
        first = None if g.resumed is None else g.resumed & (pos == 0)
        edited = None
        s = g.settings
        if s.trigger is not None:
            edited = self._act(g, z, pos, values, first)
        if first is not None:
            base = z if edited is None else edited
            edited, _ = force_token(base, first & g.forced, g.first_token, g.first_logits)
        if edited is not None:
            logits.index_copy_(0, g.rows, edited)

    def _act(
        self, g: Group, z: torch.Tensor, pos: torch.Tensor, values: dict, first
    ) -> torch.Tensor:
        """The trigger's update for the group's rows and the action's edit of ``z``
        (rows that did not fire unchanged); records whether and why it fired."""
        s = g.settings
        trig = self._trigger(s)
        state, slots = trig.state, g.slots
        present = g.present
        if first is not None:
            present = present & ~torch.zeros_like(present).index_copy(0, slots, first)
        value_s = torch.zeros(self._slots, device=self.device).index_copy(
            0, slots, values[s.trigger.signal]
        )
        pos_s = trig.last_pos.index_copy(0, slots, pos)
        again = present & (pos_s == trig.last_pos)
        state.restore_rows(again, trig.before)
        before = state.snapshot()
        fired_s = state.update(value_s, pos_s, active=present)
        trig.before = tuple(
            torch.where(present.view(-1, *([1] * (b.dim() - 1))), b, old)
            for b, old in zip(before, trig.before, strict=True)
        )
        trig.last_pos = pos_s
        fired = fired_s.index_select(0, slots)
        blocked = torch.zeros_like(fired)
        if s.action == "stop":
            edited, blocked = force_eos(z, fired, g.eos_mask)
        elif s.mode == "veto":
            edited = veto(z, fired)
        else:
            edited = adaptive_temperature(z, fired, values["entropy"], values["varentropy"], s.rule)
        facts = torch.stack(
            [fired.float(), state.smoothed_value.index_select(0, slots), blocked.float()], -1
        )
        cols = self.columns(("action_fired", "action_value", "action_blocked"))
        self._record.index_put_((slots[:, None], pos[:, None], cols[None, :]), facts)
        return edited

    def _record_alternatives(self, g: Group, read: LogitStats, pos: torch.Tensor) -> None:
        """Each row's top-``k`` tokens and probabilities at its step ``pos``."""
        if self._alts is None:
            self._alts = torch.zeros(
                self._slots, self._cap, 2 * MAX_ALTERNATIVES, device=self.device
            )
        alt = Alternatives.of_stats(read, g.settings.recording.alternatives)
        values = torch.cat([alt.ids.to(alt.probs.dtype), alt.probs], dim=-1).float()
        self._alts.index_put_((g.slots[:, None], pos[:, None], g.alt_cols[None, :]), values)

    def _tokur_values(self, g: Group, key: tuple) -> dict[str, torch.Tensor]:
        """TU / AU / EU of the group's rows from the model's ``[R, M, V]`` samples (NaN
        on an engine without the TokUR model: see ``tokur_engine_args``); keeps the
        log-probabilities for the implicit reward, completed at the next step."""
        samples = self._tokur.samples
        if samples is None:
            self._last_bayes[key] = None
            nan = torch.full((len(g.outputs),), float("nan"), device=self.device)
            return dict.fromkeys(TOKUR_STEP_OUTPUTS, nan)
        out, lp, log_pbar = bayesian_terms(samples.index_select(0, g.tokur))
        self._last_bayes[key] = (lp, log_pbar)
        return {f"tokur_{k}": v for k, v in out.items()}

    def _write_deferred(
        self,
        key: tuple,
        names: tuple[str, ...],
        slots: torch.Tensor,
        pos: torch.Tensor,
        last: torch.Tensor,
    ) -> None:
        """Complete outputs ``names`` (chosen-token signals, ``tokur_reward``) of the
        previous step of the requests in ``slots`` (``pos``: their number of output
        tokens, ``last``: their last one), where the kept log-probabilities hold it."""
        values: dict[str, torch.Tensor] = {}
        chosen = tuple(n for n in names if n != "tokur_reward")
        prev = self._last_read.get(key)
        row = self._lp_row.index_select(0, slots)
        if chosen and prev is not None:
            rows = row.clamp(max=len(prev.shift) - 1)
            values |= chosen_signals(prev, last, chosen, rows=rows)
        if "tokur_reward" in names and key in self._last_bayes:
            bayes = self._last_bayes[key]
            if bayes is None:  # no TokUR model: NaN, as the step's other TokUR values
                values["tokur_reward"] = torch.full(last.shape, float("nan"), device=self.device)
            else:
                lp, log_pbar = bayes
                row = row.clamp(max=len(lp) - 1)
                values["tokur_reward"] = implicit_reward(lp[row], log_pbar[row], last)
        names = tuple(n for n in names if n in values)
        if not names:
            return
        pending = (self._lp_pos.index_select(0, slots) == pos - 1) & (pos > 0)
        cols = self.columns(names)
        where = (slots[:, None], (pos - 1).clamp_min(0)[:, None], cols[None, :])
        new = torch.stack([values[k] for k in names], dim=-1)
        self._record.index_put_(where, torch.where(pending[:, None], new, self._record[where]))

    def _settle_stops(
        self, slots: torch.Tensor, pos: torch.Tensor, last: torch.Tensor, eos: torch.Tensor
    ) -> None:
        """A stop that fired at the previous step and was not blocked is taken only if
        its EOS was emitted: a later stage (vLLM's thinking-budget forcing runs after
        the processors) may have forced another token. Where ``last`` (the token emitted
        at step ``pos - 1``) is not the row's EOS, the stop is recorded as overridden."""
        fired, blocked = _COL["action_fired"], _COL["action_blocked"]
        prev = (pos - 1).clamp_min(0)
        was_fired = self._record[slots, prev, fired] > 0
        was_blocked = self._record[slots, prev, blocked]
        overridden = was_fired & (was_blocked == 0) & (last != eos) & (pos > 0)
        self._record[slots, prev, blocked] = torch.where(overridden, OVERRIDDEN_CODE, was_blocked)

    def _grow_steps(self, needed: int) -> None:
        cap = min(max(needed, 2 * self._cap, 64), max(self.max_len, needed))
        self._record = torch.nn.functional.pad(self._record, (0, 0, 0, cap - self._cap))
        if self._alts is not None:
            self._alts = torch.nn.functional.pad(self._alts, (0, 0, 0, cap - self._cap))
        self._cap = cap


def _deferred_outputs(signals) -> tuple[str, ...]:
    """The outputs of ``signals`` that need the step's emitted token."""
    chosen = tuple(s for s in signals if s in CHOSEN_SIGNALS)
    return chosen + (("tokur_reward",) if wants_samples(signals) else ())


def _peeked(record: torch.Tensor, settings: RequestSettings, start: int, final: int) -> dict:
    """Steps ``start`` on of a request's record as plain values (see
    :meth:`ProcessorCore.peek`)."""
    signals = _signal_lists(record[start:], settings)
    return {"start": start, "signals": signals, "final": max(final, start)}


def _signal_lists(record: torch.Tensor, settings: RequestSettings) -> dict[str, list[float]]:
    """The outputs the request asked for, one list of per-step values each."""
    part = record.float().cpu()
    return {k: part[:, _COL[k]].tolist() for k in settings.output_names}


def _to_python(entry: dict) -> dict:
    """A finished record as plain Python values (signals the request asked for, events)."""
    settings: RequestSettings = entry["settings"]
    record = entry["record"].float().cpu()
    signals = _signal_lists(record, settings)
    events = []
    if settings.trigger is not None:
        t = settings.trigger
        fired = record[:, _COL["action_fired"]]
        for step in fired.nonzero().flatten().tolist():
            fire = Fire.of(
                t,
                settings.action,
                step=step,
                value=record[step, _COL["action_value"]],
                threshold=entry["threshold"],
                blocked=_BLOCKED_REASONS[int(record[step, _COL["action_blocked"]])],
            )
            events.append(fire.to_dict())
    out = {"token_ids": entry["token_ids"], "signals": signals, "events": events}
    if settings.recording.alternatives:
        k, alts = settings.recording.alternatives, entry["alternatives"].cpu()
        out["alternatives"] = {
            "ids": alts[:, :k].long().tolist(),
            "probs": alts[:, MAX_ALTERNATIVES : MAX_ALTERNATIVES + k].tolist(),
        }
    return out
