"""How :func:`~tokur_decode.verbalized.ask` asks: one typed, validated set of options
that both engines' implementations read.

Example:
    >>> Asking(max_answer_chars=20).max_new_tokens  # resolved: the format's bound
    45
    >>> Asking(mask_order="last")
    Traceback (most recent call last):
    ...
    ValueError: mask_order: choose from ['monitor-first', 'mask-first'], got 'last'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..core.checks import check_temperature, check_top_p
from .format import DEFAULT_TEMPLATE, max_format_tokens, validate_template
from .result import MASK_ORDERS, signal_names

__all__ = ["Asking"]


@dataclass(frozen=True)
class Asking:
    """The options of :func:`~tokur_decode.verbalized.ask` (see there), checked here
    once; ``max_new_tokens`` ``None`` becomes the format's bound
    (:func:`~tokur_decode.verbalized.max_format_tokens`) and ``signals`` the recorded
    set (:func:`~tokur_decode.verbalized.signal_names`).

    Raises:
        ValueError: naming the option.
    """

    template: str = DEFAULT_TEMPLATE
    constrained: bool = True
    mask_order: str = "monitor-first"
    signals: tuple[str, ...] | list[str] | str | None = None
    max_answer_chars: int = 100
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = 0
    chat: bool | None = None
    expected: bool = True
    signal_params: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        validate_template(self.template)
        if self.mask_order not in MASK_ORDERS:
            raise ValueError(
                f"mask_order: choose from {list(MASK_ORDERS)}, got {self.mask_order!r}"
            )
        bound = max_format_tokens(self.max_answer_chars)  # checks max_answer_chars
        least = bound if self.constrained else 1
        if self.max_new_tokens is None:
            object.__setattr__(self, "max_new_tokens", bound)
        elif (
            isinstance(self.max_new_tokens, bool)
            or not isinstance(self.max_new_tokens, int)
            or self.max_new_tokens < least
        ):
            why = f" (the constrained format can take {bound} tokens)" if self.constrained else ""
            raise ValueError(
                f"max_new_tokens: must be an integer >= {least}{why}, got {self.max_new_tokens!r}"
            )
        check_temperature(self.temperature)
        check_top_p(self.top_p)
        object.__setattr__(self, "signals", signal_names(self.signals))
