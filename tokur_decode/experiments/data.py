"""Datasets for the experiments: a JSONL loader and built-in synthetic tasks.

A dataset is a list of :class:`Item` (a question, its gold answer, the grader that
judges a response, and the prompt sent to the model). :func:`load` takes a spec:

* ``tasks:arithmetic``: ``+``, ``-`` and ``*`` with one- to three-digit operands (numeric);
* ``tasks:legs``: leg counting, "A farm has 3 chickens and 2 cows. How many legs..."
  (one or two kinds of animal, 1 to 5 of each; numeric);
* ``tasks:capitals``: the capital cities of 50 countries (normalised string grader);
* a path to a ``.jsonl`` file, one JSON object per line, in any of these shapes:
  ``{"question"|"problem"|"prompt"|"input": ..., "answer"|"solution"|"target"|"output": ...}``,
  with GSM8K's ``"... #### 72"`` answers reduced to the part after ``####`` and MATH-style
  solutions to their last ``\\boxed{...}``. Optional keys: ``"id"`` and ``"grader"``
  (``"numeric"``, ``"string"``, ``"math"``; overrides the dataset's grader for that item).
  A dataset's grader is inferred from its answers unless given: all numbers ->
  ``numeric``; any LaTeX (or a ``problem`` key, MATH's shape) -> ``math``; else ``string``.

Built-in tasks are generated offline from ``seed`` (same seed, same items) and end their
prompts with an instruction ("Answer with just the number."). A JSONL question is sent
**as written**: nothing is appended unless ``prompt_suffix`` is given, or a named
``prompt_template`` (:mod:`tokur_decode.experiments.prompts`, e.g. TokUR's ``tokur-qwen``)
shapes it, possibly with a system prompt. Prompts are user messages; the backend wraps
them in the model's chat template when it has one (:attr:`Item.messages`).

Example:
    >>> items = load("tasks:arithmetic", limit=2)
    >>> items[0].dataset, items[0].grader, len(items)
    ('tasks:arithmetic', 'numeric', 2)
    >>> items[0].prompt.endswith("Answer with just the number.")
    True
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .graders import GRADERS, boxed, parse_number
from .prompts import apply

__all__ = ["TASKS", "Item", "infer_grader", "json_objects", "load", "load_jsonl", "load_many"]

_QUESTION_KEYS = ("question", "problem", "prompt", "input")
_ANSWER_KEYS = ("answer", "solution", "target", "output")
_NUMBER_SUFFIX = "Answer with just the number."


@dataclass(frozen=True)
class Item:
    """One question of a dataset.

    Attributes:
        dataset: the spec it came from (``tasks:capitals``, a file path).
        id: unique within the dataset.
        question: the question as written in the data.
        answer: the gold answer (aliases separated by ``|`` for string answers).
        grader: a key of :data:`tokur_decode.experiments.graders.GRADERS`.
        prompt: the user message sent to the model.
        system: a system prompt sent before it (``None``: none).
    """

    dataset: str
    id: str
    question: str
    answer: str
    grader: str
    prompt: str
    system: str | None = None

    @property
    def messages(self) -> str | list[dict]:
        """What a backend is sent: the user message, or the system and user messages."""
        if self.system is None:
            return self.prompt
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": self.prompt},
        ]

    @property
    def key(self) -> str:
        """``dataset/id``: unique across the datasets of a run."""
        return f"{self.dataset}/{self.id}"

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- built-in tasks


def _arithmetic(rng: random.Random, size: int) -> list[tuple[str, str]]:
    """Sums, differences (never negative) and products by a one-digit number, with
    operands of one to three digits (a mix a small model gets partly right)."""
    out = []
    for _ in range(size):
        op = rng.choice("+-*")
        digits = rng.choice((1, 2, 3))
        a = rng.randint(10 ** (digits - 1), 10**digits - 1)
        b = rng.randint(2, 9) if op == "*" else rng.randint(10 ** (digits - 1), 10**digits - 1)
        if op == "-":
            a, b = max(a, b), min(a, b)
        value = a + b if op == "+" else a - b if op == "-" else a * b
        out.append((f"What is {a} {op} {b}?", str(value)))
    return out


#: Legs per animal for the leg-counting task (animals whose count is unambiguous).
LEGS = {
    "chicken": 2,
    "duck": 2,
    "goose": 2,
    "cow": 4,
    "horse": 4,
    "dog": 4,
    "cat": 4,
    "sheep": 4,
    "goat": 4,
    "pig": 4,
    "spider": 8,
    "ant": 6,
    "beetle": 6,
}
_PLURAL = {"sheep": "sheep", "goose": "geese"}


def _legs(rng: random.Random, size: int) -> list[tuple[str, str]]:
    out = []
    for _ in range(size):
        animals = rng.sample(sorted(LEGS), rng.choice((1, 2)))
        counts = [rng.randint(1, 5) for _ in animals]
        parts = [
            f"{c} {a if c == 1 else _PLURAL.get(a, a + 's')}"
            for a, c in zip(animals, counts, strict=True)
        ]
        listed = " and ".join(parts)
        total = sum(LEGS[a] * c for a, c in zip(animals, counts, strict=True))
        out.append((f"A farm has {listed}. How many legs are there in total?", str(total)))
    return out


#: Built-in factual set: country -> capital (aliases separated by "|").
CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "United Kingdom": "London",
    "Ireland": "Dublin",
    "Netherlands": "Amsterdam",
    "Belgium": "Brussels",
    "Switzerland": "Bern|Berne",
    "Austria": "Vienna",
    "Poland": "Warsaw",
    "Czech Republic": "Prague",
    "Hungary": "Budapest",
    "Greece": "Athens",
    "Sweden": "Stockholm",
    "Norway": "Oslo",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Iceland": "Reykjavik",
    "Russia": "Moscow",
    "Ukraine": "Kyiv|Kiev",
    "Turkey": "Ankara",
    "Egypt": "Cairo",
    "Nigeria": "Abuja",
    "Kenya": "Nairobi",
    "Ethiopia": "Addis Ababa",
    "South Africa": "Pretoria",
    "Morocco": "Rabat",
    "Ghana": "Accra",
    "United States": "Washington|Washington, D.C.",
    "Canada": "Ottawa",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Chile": "Santiago",
    "Peru": "Lima",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "China": "Beijing",
    "Japan": "Tokyo",
    "South Korea": "Seoul",
    "India": "New Delhi",
    "Pakistan": "Islamabad",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "Australia": "Canberra",
    "New Zealand": "Wellington",
}


def _capitals(rng: random.Random, size: int) -> list[tuple[str, str]]:
    countries = sorted(CAPITALS)
    rng.shuffle(countries)
    return [(f"What is the capital of {c}?", CAPITALS[c]) for c in countries[:size]]


#: Built-in tasks: name -> (generator, default size, grader, prompt suffix).
TASKS = {
    "arithmetic": (_arithmetic, 200, "numeric", _NUMBER_SUFFIX),
    "legs": (_legs, 200, "numeric", _NUMBER_SUFFIX),
    "capitals": (_capitals, len(CAPITALS), "string", "Answer with just the name of the city."),
}


def _task(name: str, seed: int, size: int | None) -> list[Item]:
    if name not in TASKS:
        raise ValueError(f"data: unknown task 'tasks:{name}'; choose from {sorted(TASKS)}")
    make, default_size, grader, suffix = TASKS[name]
    if size is None:
        size = default_size
    if name == "capitals" and size > default_size:
        raise ValueError(f"size: tasks:capitals has {default_size} questions, asked for {size}")
    pairs = make(random.Random(f"{name}:{seed}"), size)
    return [
        Item(f"tasks:{name}", str(i), q, a, grader, f"{q} {suffix}")
        for i, (q, a) in enumerate(pairs)
    ]


# --------------------------------------------------------------------------- JSONL


def _field(obj: dict, keys: tuple[str, ...]):
    return next((obj[k] for k in keys if k in obj and obj[k] is not None), None)


def _gold(raw) -> str:
    """The gold answer from a raw answer field (GSM8K ``####``, MATH ``\\boxed``)."""
    text = str(raw).strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    return boxed(text) or text


def infer_grader(answers: list[str], has_problem: bool) -> str:
    """The grader a dataset's gold ``answers`` call for (``has_problem``: MATH's shape)."""
    if all(parse_number(a) is not None and re.fullmatch(r"[-+$\d.,\s%]+", a) for a in answers):
        return "numeric"
    if has_problem or any("\\" in a or "^" in a for a in answers):
        return "math"
    return "string"


def json_objects(path: str | Path):
    """``(where, object)`` for each non-empty line of a JSONL file, ``where`` being
    ``file:line``; ``ValueError`` naming it for a line that is not UTF-8, invalid JSON
    or not an object, or naming the path when it is a folder."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"data: {path} is a folder; give a .jsonl file")
    if not path.is_file():
        raise FileNotFoundError(f"data: no such file {path}")
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{where}: not UTF-8 (byte {exc.start + 1}: {raw[exc.start : exc.end]!r})"
                ) from exc
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: invalid JSON: {exc.msg}") from exc
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            yield where, obj


def load_jsonl(
    path: str | Path,
    *,
    grader: str | None = None,
    prompt_suffix: str | None = None,
    prompt_template: str | None = None,
) -> list[Item]:
    """Items of a JSONL file (see the module docstring for the accepted shapes), each
    question sent as written, or with ``prompt_suffix`` appended, or shaped by the
    named ``prompt_template``.

    Raises:
        ValueError: naming the file and the line of malformed input (invalid JSON, not an
            object, no question or answer field, an unknown grader, a duplicate id).
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    if grader is not None and grader not in GRADERS:
        raise ValueError(f"grader: unknown {grader!r}; choose from {sorted(GRADERS)}")
    if prompt_suffix is not None and prompt_template is not None:
        raise ValueError("prompt_suffix: give a suffix or a template, not both")
    if prompt_template is not None:
        apply(prompt_template, "")  # an unknown name fails before the file is read
    rows = []
    for where, obj in json_objects(path):
        question, answer = _field(obj, _QUESTION_KEYS), _field(obj, _ANSWER_KEYS)
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"{where}: no question (one of {', '.join(_QUESTION_KEYS)})")
        if answer is None or not str(answer).strip():
            raise ValueError(f"{where}: no answer (one of {', '.join(_ANSWER_KEYS)})")
        item_grader = obj.get("grader")
        if item_grader is not None and item_grader not in GRADERS:
            raise ValueError(
                f"{where}: grader: unknown {item_grader!r}; choose from {sorted(GRADERS)}"
            )
        rows.append((where, obj, question, _gold(answer), item_grader))
    if not rows:
        raise ValueError(f"{path}: no items")
    default = grader or infer_grader([r[3] for r in rows], any("problem" in r[1] for r in rows))
    items, seen = [], set()
    for index, (where, obj, question, gold, item_grader) in enumerate(rows):
        item_id = str(obj.get("id", obj.get("idx", index)))
        if item_id in seen:
            raise ValueError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        kind = item_grader or default
        system, prompt = None, question
        if prompt_template is not None:
            system, prompt = apply(prompt_template, question)
        elif prompt_suffix:
            prompt = f"{question} {prompt_suffix}"
        items.append(Item(str(path), item_id, question, gold, kind, prompt, system))
    return items


# --------------------------------------------------------------------------- specs


def load(
    spec: str,
    *,
    seed: int = 0,
    limit: int | None = None,
    grader: str | None = None,
    prompt_suffix: str | None = None,
    prompt_template: str | None = None,
) -> list[Item]:
    """The items of one dataset spec (``tasks:NAME`` or a JSONL path), the first
    ``limit`` of them when given.

    ``seed`` generates the built-in tasks; ``grader`` overrides a JSONL file's inferred
    grader (items with their own ``"grader"`` keep it); ``prompt_suffix`` /
    ``prompt_template`` shape a JSONL file's prompts (built-in tasks keep theirs).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    if spec.startswith("tasks:"):
        items = _task(spec.removeprefix("tasks:"), seed, limit)
    else:
        items = load_jsonl(
            spec, grader=grader, prompt_suffix=prompt_suffix, prompt_template=prompt_template
        )
    return items[:limit] if limit is not None else items


def load_many(specs: str, **kwargs) -> list[Item]:
    """Items of comma-separated specs, in order (``"tasks:capitals,tasks:arithmetic"``).

    Example:
        >>> [len(load_many("tasks:capitals,tasks:legs", limit=3))]
        [6]
    """
    names = [s.strip() for s in specs.split(",") if s.strip()]
    if not names:
        raise ValueError("data: at least one dataset is required")
    if len(set(names)) != len(names):
        raise ValueError(f"data: a dataset is listed twice in {specs!r}")
    return [item for name in names for item in load(name, **kwargs)]
