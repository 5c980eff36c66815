r"""Answer graders: is a model's response correct for a gold answer?

A :class:`Grader` has two steps: ``extract`` turns a response into a canonical answer
key (``None`` when there is none; voting compares these keys), and ``match`` says
whether a key is correct for the gold answer. Three graders, chosen per dataset and
overridable per item (:mod:`tokur_decode.experiments.data`):

* ``numeric``: the last number of the response (or the content of its last
  ``\boxed{}``, or what follows ``####``), tolerant to thousands separators, units,
  currency and percent signs, trailing periods, fractions ``a/b``; equal within a
  relative tolerance of 1e-6.
* ``string``: the response's answer line (after ``Answer:`` when present, else its
  first non-empty line), normalised: accents stripped, case-folded, punctuation
  dropped, whitespace collapsed. Correct when an alias of the gold answer (aliases
  separated by ``|``) equals it or appears in it as whole words ("The capital is Paris."
  is correct for "Paris"; "Parisian" is not).
* ``math``: the last ``\boxed{...}`` (braces balanced) or the last ``$...$``, compared
  with the gold answer symbolically with sympy (``\frac{1}{2}`` = ``0.5`` = ``1/2``,
  ``2\sqrt{2}`` = ``\sqrt{8}``); answers sympy cannot read are compared as normalised text.
  Only a whitelisted alphabet reaches sympy's parser (it evaluates its input).

Example:
    >>> grade("3 dogs have 12 legs.", "12", "numeric")
    True
    >>> grade("The capital of Switzerland is Bern.", "Bern|Berne", "string")
    True
    >>> grade(r"so the answer is $\boxed{\frac{1}{2}}$", "0.5", "math")
    True
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

__all__ = ["GRADERS", "Grader", "boxed", "grade", "normalize_text", "parse_number"]

_NUMBER = re.compile(
    r"(?<![\w.])[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?!\.\d))?(?![\d])"
)


def boxed(text: str) -> str | None:
    r"""Content of the last ``\boxed{...}`` (or ``\fbox{...}``), braces balanced.

    Example:
        >>> boxed(r"x = \boxed{\frac{1}{2}} and more")
        '\\frac{1}{2}'
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, j = 1, i
    while j < len(text) and depth:
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        j += 1
    return text[i : j - 1].strip() if depth == 0 else None


def parse_number(text: str) -> float | None:
    """The last number in ``text`` as a float, or ``None``.

    Example:
        >>> parse_number("It costs $1,234.50 (about 1.2k).")
        1.2
        >>> parse_number("3/4 of them")
        0.75
    """
    matches = _NUMBER.findall(text)
    if not matches:
        return None
    raw = matches[-1].replace(",", "").replace("−", "-").replace(" ", "")
    try:
        return float(Fraction(raw)) if "/" in raw else float(raw)
    except (ValueError, ZeroDivisionError):
        return None


def _numeric_extract(text: str) -> str | None:
    inner = boxed(text)
    if inner is None and "####" in text:
        inner = text.rsplit("####", 1)[1]
    value = parse_number(inner if inner is not None else text)
    if value is None:
        return None
    return str(int(value)) if value.is_integer() else f"{value:.10g}"


def _numeric_match(key: str, gold: str) -> bool:
    a, b = parse_number(key), parse_number(_numeric_extract(gold) or "")
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


def normalize_text(text: str) -> str:
    """Accents stripped, case-folded, punctuation dropped, whitespace collapsed.

    Example:
        >>> normalize_text("  Bogotá, D.C.! ")
        'bogota d c'
    """
    decomposed = unicodedata.normalize("NFKD", text)
    plain = "".join(c for c in decomposed if not unicodedata.combining(c)).casefold()
    spaced = "".join(c if c.isalnum() else " " for c in plain)
    return " ".join(spaced.split())


def _string_extract(text: str) -> str | None:
    found = re.findall(r"answer\s*:\s*(.+)", text, flags=re.IGNORECASE)
    line = found[-1] if found else next((ln for ln in text.splitlines() if ln.strip()), "")
    key = normalize_text(line)
    return key or None


def _string_match(key: str, gold: str) -> bool:
    padded = f" {key} "
    return any(
        alias and (alias == key or f" {alias} " in padded)
        for alias in (normalize_text(a) for a in gold.split("|"))
    )


# --------------------------------------------------------------------------- math

_LATEX = (
    (r"\\left|\\right|\\!|\\,|\\;|\\:|\\displaystyle|\$", ""),
    (r"\\text\{[^{}]*\}|\\mathrm\{[^{}]*\}|\^\{?\\circ\}?|\\%|%", ""),
    (r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))"),
    (r"\\sqrt\[([^{}\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))"),
    (r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)"),
    (r"\\sqrt(\d)", r"sqrt(\1)"),
    (r"\\cdot|\\times", "*"),
    (r"\\div", "/"),
    (r"\\pi", "pi"),
    (r"\\infty", "oo"),
)
_SAFE = re.compile(r"[0-9a-zA-Z+\-*/^().,\s]*")
_WORDS = frozenset({"sqrt", "pi", "oo"})


def _to_sympy(text: str):
    """A sympy expression for a small LaTeX/plain answer, or ``None``."""
    import sympy
    from sympy.parsing.sympy_parser import (
        convert_xor,
        implicit_multiplication_application,
        parse_expr,
        standard_transformations,
    )

    expr = text.strip().rstrip(".")
    for _ in range(3):  # nested \frac / \sqrt unwrap from the inside out
        for pattern, repl in _LATEX:
            expr = re.sub(pattern, repl, expr)
    expr = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", expr)  # thousands separators
    expr = expr.replace("{", "(").replace("}", ")")
    words = set(re.findall(r"[A-Za-z]{2,}", expr))
    if not expr.strip() or not _SAFE.fullmatch(expr) or words - _WORDS:
        return None
    transformations = standard_transformations + (implicit_multiplication_application, convert_xor)
    try:
        return sympy.sympify(parse_expr(expr, transformations=transformations, evaluate=True))
    except Exception:  # sympy raises many types on malformed input
        return None


def _math_extract(text: str) -> str | None:
    inner = boxed(text)
    if inner is None:
        dollars = re.findall(r"\$([^$]+)\$", text)
        inner = dollars[-1] if dollars else (text.strip().splitlines() or [""])[-1]
    return inner.strip() if inner and inner.strip() else None


def _math_match(key: str, gold: str) -> bool:
    gold_key = _math_extract(gold) or gold
    a, b = _to_sympy(key), _to_sympy(gold_key)
    if a is not None and b is not None:
        return _sympy_equal(a, b)
    return _squash(key) == _squash(gold_key)


def _squash(text: str) -> str:
    text = re.sub(r"\\text\{([^{}]*)\}", r"\1", text)
    return re.sub(r"\s+|\\left|\\right|\$", "", text)


def _sympy_equal(a, b) -> bool:
    """Symbolic equality; tuples (``(1, 2)``) element by element."""
    import sympy

    if isinstance(a, sympy.Tuple) or isinstance(b, sympy.Tuple):
        return (
            isinstance(a, sympy.Tuple)
            and isinstance(b, sympy.Tuple)
            and len(a) == len(b)
            and all(_sympy_equal(x, y) for x, y in zip(a, b, strict=True))
        )
    try:
        if sympy.simplify(a - b) == 0:
            return True
        diff = complex(sympy.N(a - b))
        return abs(diff) <= 1e-6 * max(1.0, abs(complex(sympy.N(b))))
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Grader:
    """``extract(response) -> key | None`` and ``match(key, gold) -> bool``.

    Example:
        >>> g = GRADERS["numeric"]
        >>> g.extract("1,000 apples"), g.match("1000", "1000.0")
        ('1000', True)
    """

    name: str
    extract: Callable[[str], str | None]
    match: Callable[[str, str], bool]

    def __call__(self, response: str, gold: str) -> bool:
        key = self.extract(response)
        return key is not None and self.match(key, gold)


#: Graders by name.
GRADERS: dict[str, Grader] = {
    "numeric": Grader("numeric", _numeric_extract, _numeric_match),
    "string": Grader("string", _string_extract, _string_match),
    "math": Grader("math", _math_extract, _math_match),
}


def grade(response: str, gold: str, grader: str = "numeric") -> bool:
    """Whether ``response`` is correct for ``gold`` by the grader called ``grader``."""
    if grader not in GRADERS:
        raise ValueError(f"grader: unknown {grader!r}; choose from {sorted(GRADERS)}")
    return GRADERS[grader](response, gold)
