"""The part both runners share: work through the items not done yet, in batches, with a
progress bar, appending each batch's records to the run folder as it completes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .data import Item
from .graders import GRADERS
from .store import RunStore

__all__ = ["RunResult", "graded", "process"]


@dataclass
class RunResult:
    """What a runner returns: the result line of every item (in the items' order, done
    earlier or now) and the metrics computed from them."""

    records: list[dict]
    summary: dict


def process(
    store: RunStore,
    items: Sequence[Item],
    work: Callable[[list[Item], int], list[dict]],
    *,
    batch_size: int,
    desc: str,
    progress: bool = True,
) -> list[dict]:
    """Run ``work(batch, index_of_first)`` on the items ``store`` has not done, store
    its records, and return the records of all ``items`` in order; ``store`` is closed
    after (its lock released), whether the work ends or fails.

    A done item whose question, answer or grader differ from ``items``' is refused: the
    data changed under the run.
    """
    from tqdm.auto import tqdm

    with store:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        keys = [item.key for item in items]
        if len(set(keys)) != len(keys):
            raise ValueError("data: two items share a key (dataset/id)")
        for item in items:
            done = store.done.get(item.key)
            if done is not None and any(
                done.get(f) != getattr(item, f) for f in ("question", "answer", "grader", "prompt")
            ):
                raise ValueError(
                    f"data: item {item.key} differs from the one recorded in {store.path}; "
                    "use another --out"
                )
        todo = [(i, item) for i, item in enumerate(items) if item.key not in store.done]
        with tqdm(
            total=len(items),
            initial=len(items) - len(todo),
            desc=desc,
            unit="item",
            disable=not progress,
        ) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                records = work([item for _, item in chunk], chunk[0][0])
                store.append(records)
                bar.update(len(chunk))
        return [store.done[key] for key in keys]


def graded(item: Item, text: str) -> dict:
    """The answer key the item's grader extracts from ``text`` and whether it is right."""
    grader = GRADERS[item.grader]
    prediction = grader.extract(text)
    return {
        "response": text,
        "prediction": prediction,
        "correct": prediction is not None and grader.match(prediction, item.answer),
    }
