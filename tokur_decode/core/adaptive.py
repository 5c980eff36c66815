"""When to stop sampling: the vote is settled (adaptive sampling, docs/reference.md).

Self-consistency draws ``N`` answers and votes. Two rules stop earlier, once more answers
would not change the vote (answers drawn in windows of ``window``):

* ``"esc"``: Early-Stopping Self-Consistency (Li et al., ICLR 2024): stop after a
  window whose answers all agree (zero entropy in the window).
* ``"beta"``: Adaptive-Consistency (Aggarwal et al., EMNLP 2023), its Beta criterion:
  with ``v1 >= v2`` the counts of the two most frequent answers so far, stop when
  ``P(p1 > p2) = 1 - I_0.5(v1 + 1, v2 + 1)`` (the regularised incomplete beta, the
  probability that the leader's share beats the runner-up's under a uniform prior)
  reaches ``threshold`` (0.95), checked after every window.

Answers that are ``None`` (nothing extracted) count as votes for no answer: they never
settle a window.

Example:
    >>> settled(["4", "4", "4"], window=3, rule="esc")
    True
    >>> settled(["4", "5", "4"], window=3, rule="esc")
    False
    >>> round(beta_confidence(["4"] * 4), 4)
    0.9688
    >>> settled(["4"] * 4, window=4, rule="beta", threshold=0.95)
    True
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

from scipy.special import betainc

__all__ = ["RULES", "beta_confidence", "drawn_until_settled", "settled"]

#: The stopping rules by name.
RULES = ("esc", "beta")


def beta_confidence(answers: Sequence) -> float:
    """Adaptive-Consistency's ``P(p1 > p2)`` for the answers so far (0 without any)."""
    counts = Counter(a for a in answers if a is not None).most_common(2)
    if not counts:
        return 0.0
    v1 = counts[0][1]
    v2 = counts[1][1] if len(counts) > 1 else 0
    return float(1.0 - betainc(v1 + 1, v2 + 1, 0.5))


def settled(answers: Sequence, *, window: int, rule: str = "esc", threshold: float = 0.95) -> bool:
    """Whether ``answers`` (all drawn so far, a whole number of windows) settle the vote
    under ``rule``."""
    if rule not in RULES:
        raise ValueError(f"rule: {rule!r}; choose from {RULES}")
    if rule == "esc":
        last = list(answers[-window:])
        return len(last) == window and last[0] is not None and len(set(last)) == 1
    return beta_confidence(answers) >= threshold


def drawn_until_settled(
    answers: Sequence, *, window: int, rule: str = "esc", threshold: float = 0.95
) -> int:
    """How many of ``answers`` (in the order they were drawn) the rule draws: windows
    until the vote is settled, at most all of them.

    Example:
        >>> drawn_until_settled(["1", "2", "3", "3", "4", "4", "4", "4"], window=2)
        4
    """
    if window < 1:
        raise ValueError(f"window: must be >= 1, got {window}")
    for end in range(window, len(answers) + 1, window):
        if settled(answers[:end], window=window, rule=rule, threshold=threshold):
            return end
    return len(answers)
