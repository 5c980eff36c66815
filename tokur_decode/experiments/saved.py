"""Scoring saved generations (``tokur-decode score``): signals for text generated elsewhere.

A JSONL file holds one generation per line: ``"prompt"`` (or ``"question"``) and
``"response"`` (text; tokenized without special tokens, so a saved EOS is not scored),
optionally ``"token_ids"`` (the response's exact token ids, EOS included, which are then
scored instead of the text's tokens), ``"id"``, a gold ``"answer"`` (graded with
``"grader"``, the file's ``--grader`` or the one inferred from the answers, as
:mod:`tokur_decode.experiments.data` does) or a ready ``"correct"`` (true / false).
:func:`run_scoring` teacher-forces each response through the model
(:meth:`tokur_decode.hf.HFBackend.score`), so every signal, TokUR
included, is measured per token as it would have been while generating; the records and
the report have the format of ``eval``'s (resumable; ``calibrate`` reads the folder),
with the detection metrics when every response is graded.

Example:
    >>> import json, tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "gens.jsonl"
    >>> _ = path.write_text(json.dumps({"prompt": "2 + 2?", "response": "4", "answer": "4"}))
    >>> (saved,) = load_generations(path)
    >>> saved.item.grader, saved.response, saved.correct
    ('numeric', '4', None)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..core.signals import parse_signals
from ..strategies.backend import Backend
from .data import Item, infer_grader, json_objects
from .detection import record, summarize
from .generations import Generation
from .graders import GRADERS
from .runner import RunResult, graded, process
from .store import RunStore

__all__ = ["Saved", "check_token_ids", "load_generations", "run_scoring"]


@dataclass(frozen=True)
class Saved:
    """One saved generation: its item (prompt, gold answer, grader), the response text
    and, when the file says so, whether it is correct."""

    item: Item
    response: str
    correct: bool | None = None
    token_ids: tuple[int, ...] | None = None
    where: str = ""  # its file and line, for messages


def load_generations(path: str | Path, *, grader: str | None = None) -> list[Saved]:
    """The generations of a JSONL file (see the module docstring).

    Raises:
        ValueError: naming the file and line (invalid JSON, no prompt or response, a
            non-boolean ``correct``, a ``correct`` that the gold ``answer`` contradicts,
            an unknown grader, a duplicate id).
    """
    path = Path(path)
    if grader is not None and grader not in GRADERS:
        raise ValueError(f"grader: unknown {grader!r}; choose from {sorted(GRADERS)}")
    rows = []
    for where, obj in json_objects(path):
        prompt = obj.get("prompt", obj.get("question"))
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f'{where}: no prompt ("prompt" or "question")')
        if not isinstance(obj.get("response"), str):
            raise ValueError(f'{where}: no response ("response": the generated text)')
        correct = obj.get("correct")
        if correct is not None and not isinstance(correct, bool):
            raise ValueError(f"{where}: correct: true or false, got {correct!r}")
        ids = obj.get("token_ids")
        if ids is not None and (
            not isinstance(ids, list)
            or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)
        ):
            raise ValueError(f"{where}: token_ids: a list of token ids")
        if obj.get("grader") is not None and obj["grader"] not in GRADERS:
            raise ValueError(f"{where}: grader: unknown {obj['grader']!r}")
        rows.append((where, obj, prompt, correct))
    if not rows:
        raise ValueError(f"{path}: no generations")
    answers = [str(o["answer"]) for _, o, _, _ in rows if o.get("answer") is not None]
    default = grader or (infer_grader(answers, False) if answers else "string")
    saved, seen = [], set()
    for index, (where, obj, prompt, correct) in enumerate(rows):
        item_id = str(obj.get("id", index))
        if item_id in seen:
            raise ValueError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        answer = "" if obj.get("answer") is None else str(obj["answer"])
        item = Item(str(path), item_id, prompt, answer, obj.get("grader") or default, prompt)
        if correct is not None and answer:
            verdict = graded(item, obj["response"])["correct"]
            if verdict != correct:
                raise ValueError(
                    f"{where}: correct: {str(correct).lower()}, but the {item.grader} grader "
                    f"finds the response {'right' if verdict else 'wrong'} against the answer "
                    f"{answer!r}; give one of them"
                )
        ids = obj.get("token_ids")
        token_ids = None if ids is None else tuple(ids)
        saved.append(Saved(item, obj["response"], correct, token_ids, str(where)))
    return saved


def check_token_ids(tokenizer, saved: Sequence[Saved]) -> None:
    """Each saved ``token_ids`` decodes to its ``response`` (special tokens and the
    surrounding space aside): the ids are what is scored, the text what is graded.

    Raises:
        ValueError: naming the file and line of the first that does not.
    """
    for s in saved:
        if s.token_ids is None:
            continue
        text = tokenizer.decode(list(s.token_ids), skip_special_tokens=True)
        if text.strip() != s.response.strip():
            raise ValueError(
                f"{s.where}: token_ids decode to {text[:60]!r}, not the response "
                f"{s.response[:60]!r}: the ids are scored and the text graded, so they must "
                "agree (or leave token_ids out)"
            )


def run_scoring(
    saved: Sequence[Saved],
    backend: Backend,
    *,
    out: str | Path,
    signals: str | Sequence[str] = "all,tokur",
    batch_size: int = 8,
    n_resamples: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> RunResult:
    """Score every saved response (skipping those ``out`` has) on ``backend``, a
    :class:`tokur_decode.hf.HFBackend` (deferred or not); the records, and the
    detection summary when every response is graded (else ``summary`` is ``{}``)."""
    names = parse_signals(signals)
    config = {"kind": "detect", "scored": True, "signals": list(names), **backend.describe()}
    store = RunStore(out, config)
    by_key = {s.item.key: s for s in saved}
    todo = [s for s in saved if s.item.key not in store.done]
    if any(s.token_ids is not None for s in todo):
        try:  # before any work (it loads the tokenizer, and with it a deferred model)
            check_token_ids(backend.tokenizer, todo)
        except BaseException:
            store.close()
            raise

    def work(batch: list[Item], first: int) -> list[dict]:
        tokenizer = backend.tokenizer
        texts = [by_key[item.key].response for item in batch]
        ids = [
            list(by_key[item.key].token_ids)
            if by_key[item.key].token_ids is not None
            else tokenizer(text, add_special_tokens=False).input_ids
            for item, text in zip(batch, texts, strict=True)
        ]
        trace = backend.score([item.messages for item in batch], ids, signals=names)
        records = []
        for row, item in enumerate(batch):
            rec = record(item, Generation([texts[row]], trace.select([row])))
            given = by_key[item.key].correct
            if given is not None:
                rec["correct"] = given
            elif not item.answer:
                rec["correct"] = None  # nothing to grade against
            records.append(rec)
        return records

    items = [s.item for s in saved]
    records = process(store, items, work, batch_size=batch_size, desc="score", progress=progress)
    graded = all(isinstance(r["correct"], bool) for r in records)
    summary = summarize(records, n_resamples=n_resamples, seed=seed) if graded else {}
    return RunResult(records, summary)
