"""The verbalized-confidence prompt, the output format as a regular expression, and the
parser (backend-agnostic: plain strings and token offsets).

The format (Yang et al. 2024, "On Verbalized Confidence Scores for LLMs")::

    Answer: <the answer, one line>
    Confidence: <an integer 0..100>

Example:
    >>> parsed = parse_response("Answer: Paris\\nConfidence: 95")
    >>> parsed.answer, parsed.confidence, parsed.error
    ('Paris', 0.95, None)
    >>> parse_response("Paris, I think.").error
    "no 'Answer: ...' line followed by 'Confidence: <number>'"
    >>> is_abstention("`NO ANSWER`"), is_abstention("No answer."), is_abstention("Paris")
    (True, True, False)
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DEFAULT_TEMPLATE",
    "ConfidenceTree",
    "Located",
    "Parsed",
    "build_prompt",
    "char_span_to_tokens",
    "confidence_tree",
    "locate",
    "format_regex",
    "is_abstention",
    "max_format_tokens",
    "parse_response",
    "token_offsets",
    "validate_template",
]

#: The default prompt; ``{question}`` is replaced by the question. The instructions
#: follow Yang et al. (2024): an answer, then a confidence score in percent, and
#: ``NO ANSWER`` when the model cannot answer. The one worked example (on another
#: topic) keeps small models on short answers: without it SmolLM2-135M answers 3 of the
#: 10 built-in capital questions right under greedy decoding, with it 7.
DEFAULT_TEMPLATE = (
    "Provide your best answer to the question and a confidence score in percent (0 to 100) "
    "that the answer is correct. Reply in exactly this format:\n"
    "Answer: <short answer>\n"
    "Confidence: <number>\n"
    "If you cannot provide an answer, answer with `NO ANSWER`.\n\n"
    "Example:\n"
    "Question: Who wrote Hamlet?\n"
    "Answer: William Shakespeare\n"
    "Confidence: 95\n\n"
    "Question: {question}"
)

_ANSWER_PREFIX = "Answer: "
_CONFIDENCE_PREFIX = "\nConfidence: "

# Lenient on purpose (used for unconstrained output too): case-insensitive labels,
# surrounding text, blank lines between the two lines, a decimal point and a percent sign.
# Every string the constraint allows matches it.
_PATTERN = re.compile(
    r"Answer:[^\S\n]*(?P<answer>[^\n]*?)[^\S\n]*\n\s*"
    r"Confidence:[^\S\n]*(?P<confidence>\d+(?:\.\d+)?)[^\S\n]*%?",
    re.IGNORECASE,
)
_ABSTENTION = re.compile(r"[\s`'\"*_]*no answer[\s`'\".!*_]*", re.IGNORECASE)


def validate_template(template: str) -> str:
    """Return ``template`` if it is a ``str.format`` template whose only placeholder is
    ``{question}`` (literal braces are written ``{{`` and ``}}``).

    Raises:
        ValueError: naming ``template``.

    Example:
        >>> validate_template("Q: {question}")
        'Q: {question}'
        >>> validate_template("Q: {query}")
        Traceback (most recent call last):
        ...
        ValueError: template: needs a {question} placeholder; found ['query']
    """
    if not isinstance(template, str):
        raise ValueError(f"template must be a str, got {type(template).__name__}")
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"template: not a valid format string ({exc})") from None
    if "question" not in fields:
        raise ValueError(f"template: needs a {{question}} placeholder; found {fields}")
    other = sorted(set(fields) - {"question"})
    if other:
        raise ValueError(
            f"template: only {{question}} is filled in; found {other} "
            "(write literal braces as {{ and }})"
        )
    return template


def build_prompt(question: str, template: str = DEFAULT_TEMPLATE) -> str:
    """The prompt for ``question`` (``template`` validated by :func:`validate_template`).

    Example:
        >>> build_prompt("2+2?", "Q: {question}")
        'Q: 2+2?'
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"question must be a non-empty str, got {question!r}")
    return validate_template(template).format(question=question)


#: The longest answer line the constraint allows: Outlines builds an automaton over the
#: vocabulary whose size and build time grow with the bound (100000 characters: 19 GB
#: and killed by the kernel on a 24 GiB machine).
MAX_ANSWER_CHARS = 1000


def format_regex(max_answer_chars: int = 100) -> str:
    """The constraint: ``Answer: <1..max_answer_chars characters>\\nConfidence: <0..100>``.

    The answer starts with a character other than a space and contains no newline and no
    colon. The colon is excluded for speed, not taste: when the answer may contain the
    whole ``Answer: `` literal, building Outlines' index for a length-bounded answer grows
    exponentially with the bound (64 characters took 206 s for SmolLM2's vocabulary; with
    the colon excluded, 100 characters take under a second).

    Example:
        >>> format_regex(8)
        'Answer: [^\\\\n: ][^\\\\n:]{0,7}\\\\nConfidence: (100|[1-9]?[0-9])'
    """
    if isinstance(max_answer_chars, bool) or not isinstance(max_answer_chars, int):
        raise ValueError(f"max_answer_chars must be an int, got {max_answer_chars!r}")
    if not 1 <= max_answer_chars <= MAX_ANSWER_CHARS:
        raise ValueError(
            f"max_answer_chars: from 1 to {MAX_ANSWER_CHARS} (the constraint's automaton "
            f"grows with it), got {max_answer_chars}"
        )
    return (
        rf"Answer: [^\n: ][^\n:]{{0,{max_answer_chars - 1}}}"
        r"\nConfidence: (100|[1-9]?[0-9])"
    )


def max_format_tokens(max_answer_chars: int = 100) -> int:
    """Most tokens a response under :func:`format_regex` can take, EOS included (every
    token carries at least one character): the generation budget that makes the parse
    of constrained output impossible to fail.

    Example:
        >>> max_format_tokens(100)
        125
    """
    format_regex(max_answer_chars)  # validates
    return len(_ANSWER_PREFIX) + max_answer_chars + len(_CONFIDENCE_PREFIX) + 3 + 1


@dataclass(frozen=True)
class Parsed:
    """What :func:`parse_response` found.

    Attributes:
        answer: the answer line without surrounding whitespace (``None`` on failure).
        confidence: the verbalized confidence divided by 100, in ``[0, 1]``.
        answer_chars, confidence_chars: ``(start, end)`` character ranges in the text.
        error: why the parse failed, ``None`` when it succeeded.
    """

    answer: str | None = None
    confidence: float | None = None
    answer_chars: tuple[int, int] | None = None
    confidence_chars: tuple[int, int] | None = None
    error: str | None = None


def parse_response(text: str) -> Parsed:
    """Find ``Answer: ...`` followed by ``Confidence: N`` in ``text``; never raises.

    Lenient about case, surrounding text, blank lines, a decimal point and a trailing
    ``%``; a failure (no such lines, an empty answer, a confidence above 100) is
    reported in :attr:`Parsed.error`.
    """
    match = _PATTERN.search(text)
    if match is None:
        return Parsed(error="no 'Answer: ...' line followed by 'Confidence: <number>'")
    answer, value = match["answer"], float(match["confidence"])
    if not answer:
        return Parsed(error="empty answer")
    if value > 100:
        return Parsed(error=f"confidence {match['confidence']} is outside 0..100")
    return Parsed(
        answer=answer,
        confidence=value / 100.0,
        answer_chars=match.span("answer"),
        confidence_chars=match.span("confidence"),
    )


def is_abstention(answer: str | None) -> bool:
    """``NO ANSWER`` (any case, optionally quoted or with a final period)."""
    return answer is not None and _ABSTENTION.fullmatch(answer) is not None


def token_offsets(tokenizer, token_ids: Sequence[int]) -> list[tuple[int, int]]:
    """``(start, end)`` of every token's text in ``tokenizer.decode(token_ids)``
    (special tokens skipped), from the lengths of the decoded prefixes."""
    offsets, previous = [], 0
    for i in range(len(token_ids)):
        end = max(previous, len(tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True)))
        offsets.append((previous, end))
        previous = end
    return offsets


def char_span_to_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> range:
    """Indices of the tokens whose text overlaps characters ``[start, end)``.

    Example:
        >>> char_span_to_tokens([(0, 7), (7, 13), (13, 14)], 8, 13)
        range(1, 2)
    """
    hits = [i for i, (s, e) in enumerate(offsets) if s < end and e > start]
    return range(hits[0], hits[-1] + 1) if hits else range(0)


@dataclass(frozen=True)
class Located:
    """A response decoded, parsed and mapped onto its tokens (:func:`locate`).

    Attributes:
        text: the response (special tokens removed).
        parsed: its :class:`Parsed`.
        answer_span, confidence_span: token indices of the answer text and of the number
            (empty ranges when the parse failed).
        number_aligned: the number starts at a token boundary (needed to score its
            continuations for the expected confidence).
    """

    text: str
    parsed: Parsed
    answer_span: range
    confidence_span: range
    number_aligned: bool


def locate(tokenizer, token_ids: Sequence[int]) -> Located:
    """Decode ``token_ids`` (a trailing EOS is dropped), parse the text and find the token
    spans of the answer and of the confidence number."""
    ids = list(token_ids)
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    parsed = parse_response(text)
    if parsed.error is not None:
        return Located(text, parsed, range(0), range(0), False)
    offsets = token_offsets(tokenizer, ids)
    answer = char_span_to_tokens(offsets, *parsed.answer_chars)
    number = char_span_to_tokens(offsets, *parsed.confidence_chars)
    aligned = offsets[number.start][0] == parsed.confidence_chars[0]
    return Located(text, parsed, answer, number, aligned)


@dataclass(frozen=True)
class ConfidenceTree:
    """The 101 confidence completions ``"0" .. "100"`` then EOS as token sequences, and
    what the format allows after each of their prefixes: the first digit 0-9; after 1-9
    another digit or the end; after 10 a 0 or the end; the end is forced after 0, after
    two other digits and after 100. Numbers are taken in their canonical tokenization
    (for tokenizers that split digits, such as SmolLM2's, the only one).

    A backend scores the allowed tokens at every :attr:`branching` prefix (the token
    before the number, then the prefix); :meth:`completion_logprobs` turns those scores
    into the constrained decoder's law over the 101 numbers.

    Attributes:
        completions: ``completions[n]`` are the tokens of ``str(n)`` then EOS.
        allowed: prefix (a tuple of tokens) -> the sorted tokens allowed after it.
        branching: the prefixes after which more than one token is allowed.
    """

    completions: tuple[tuple[int, ...], ...]
    allowed: Mapping[tuple[int, ...], tuple[int, ...]]
    branching: tuple[tuple[int, ...], ...]

    def completion_logprobs(self, scores: Mapping[tuple[int, ...], np.ndarray]) -> np.ndarray:
        """``[B, 101]`` float64 log-probabilities of stating ``n = 0..100``.

        ``scores[prefix]`` is ``[B, len(allowed[prefix])]``: log-probabilities (or logits:
        any per-row offset cancels) of the allowed tokens after ``prefix``, in the order
        of :attr:`allowed`, for every prefix of :attr:`branching`; each position's
        distribution is renormalised over what the format allows there.
        """
        terms: dict[tuple, np.ndarray] = {}
        for prefix in self.branching:
            z = np.asarray(scores[prefix], dtype=np.float64)
            z = z - np.logaddexp.reduce(z, axis=1, keepdims=True)
            terms.update({(prefix, t): z[:, j] for j, t in enumerate(self.allowed[prefix])})
        rows = next(iter(terms.values())).shape[0]
        zero = np.zeros(rows)
        return np.stack(
            [
                sum((terms.get((c[:k], c[k]), zero) for k in range(len(c))), zero)
                for c in self.completions
            ],
            axis=1,
        )


def confidence_tree(tokenizer) -> ConfidenceTree:
    """The :class:`ConfidenceTree` of ``tokenizer``.

    Example:
        >>> from tokur_decode.models import load_default
        >>> _, tok = load_default()                                         # doctest: +SKIP
        >>> tree = confidence_tree(tok)                                     # doctest: +SKIP
        >>> len(tree.branching), [tok.decode(p) for p in tree.branching][:3]  # doctest: +SKIP
        (11, ['', '1', '2'])
    """
    eos = tokenizer.eos_token_id
    completions = tuple(
        tuple(tokenizer.encode(str(n), add_special_tokens=False)) + (eos,) for n in range(101)
    )
    allowed: dict[tuple[int, ...], set[int]] = {}
    for c in completions:
        for k in range(len(c)):
            allowed.setdefault(c[:k], set()).add(c[k])
    ordered = {prefix: tuple(sorted(tokens)) for prefix, tokens in allowed.items()}
    branching = tuple(prefix for prefix, tokens in ordered.items() if len(tokens) > 1)
    return ConfidenceTree(completions, ordered, branching)
