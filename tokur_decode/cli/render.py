"""The terminal view of a ``generate`` report: a table of the tokens coloured by their
uncertainty, the actions taken and the response-level scores (rich), and the report's
per-token rows."""

from __future__ import annotations

import unicodedata

__all__ = ["print_report", "safe_text", "token_rows"]

#: Widths of the per-token table: a value cell (``0.1234`` or its header) and the token.
_CELL_WIDTH, _TOKEN_WIDTH = 8, 14


def token_rows(row: dict) -> list[dict]:
    """One dict per token of a ``Trace.to_dict()`` row: index, text, id, every signal,
    and the step's alternatives (``[{"token", "token_id", "prob"}]``) when recorded."""
    rows = [
        {"index": i, "token": tok, "token_id": tid, **{k: v[i] for k, v in row["values"].items()}}
        for i, (tok, tid) in enumerate(zip(row["tokens"], row["token_ids"], strict=True))
    ]
    alt = row.get("alternatives")
    if alt is not None:
        for i, out in enumerate(rows):
            out["alternatives"] = [
                {"token": t, "token_id": a, "prob": p}
                for t, a, p in zip(alt["tokens"][i], alt["ids"][i], alt["probs"][i], strict=True)
            ]
    return rows


def print_report(report: dict) -> None:
    from rich.console import Console
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    from ..core.trace import uncertainty_scale

    console = Console()
    answer = safe_text(report["answer"]) if report["answer"] else Text("(empty answer)")
    console.print(Panel(answer, title=safe_text(report["question"]), title_align="left"))
    from ..core.signals import OUTPUTS

    # the outputs with a display name first, in the registry's order; then the rest
    labelled = [k for k, o in OUTPUTS.items() if o.label and k in report["signals"]]
    columns = [(key, OUTPUTS[key].label) for key in labelled]
    columns += [(key, key) for key in report["signals"] if key not in labelled]
    scales = {key: uncertainty_scale(key, [t[key] for t in report["tokens"]]) for key, _ in columns}
    step_actions = {_event_step(e): e for e in report["actions"] if "step" in e}
    parts = _fit(columns, console.width)
    for n, part in enumerate(parts, 1):
        title = "Per-token uncertainty (green: confident, red: uncertain)"
        table = Table(
            title=title + (f", part {n} of {len(parts)}" if len(parts) > 1 else ""),
            title_justify="left",
        )
        table.add_column("#", justify="right", style="dim")
        table.add_column("token", max_width=_TOKEN_WIDTH, overflow="fold")
        for _, head in part:
            table.add_column(head, justify="right", no_wrap=True, min_width=_CELL_WIDTH)
        acting = step_actions and n == len(parts)
        if acting:
            table.add_column("action", overflow="fold", min_width=12)
        alternatives = n == len(parts) and "alternatives" in (report["tokens"] or [{}])[0]
        if alternatives:
            table.add_column("top alternatives", overflow="fold", min_width=20)
        for i, tok in enumerate(report["tokens"]):
            cells = [Text(f"{tok[key]:.4f}", style=_style(scales[key][i])) for key, _ in part]
            if acting:
                cells.append(
                    Text(_describe(step_actions[i]) if i in step_actions else "", style="bold")
                )
            if alternatives:
                cells.append(Text(_alternatives(tok["alternatives"]), style="dim"))
            table.add_row(str(i), Text(repr(tok["token"])[1:-1]), *cells)
        console.print(table)
    for event in report["actions"]:
        if event["action"] == "deepconf-online":
            console.print(
                f"deepconf-online: threshold {event['threshold']:.3f} from {event['warmup']} "
                f"warm-up traces; stopped {len(event['stopped'])} of "
                f"{event['n'] - event['warmup']} later ones; {event['tokens']} tokens in all"
            )
        if "scores" in event:
            console.print(
                f"{event['action']} of {len(event['scores'])}: chose candidate {event['chosen']}, "
                f"{_choice(event)}; scores " + ", ".join(f"{s:.3f}" for s in event["scores"]),
                markup=False,
            )
        if event["action"] == "abstain":  # why the answer is the abstain text, or is not
            keep = ">=" if event["keep"] == "above" else "<="
            verdict = "abstained" if event["abstained"] else "kept"
            console.print(
                f"abstain rule: {verdict}, {event['score']} = {event['value']:.4f} "
                f"(kept when {keep} {event['threshold']:.4f})",
                markup=False,
            )
    caption = None
    if "naive" in report["summary"]:
        caption = (
            "naive = 1 - prod(max_prob) grows with the answer's length (near 1 for long "
            "answers); vanilla = 1 - mean(max_prob) does not"
        )
    summary = Table(title="Response-level scores", title_justify="left", caption=caption)
    summary.add_column("score")
    summary.add_column("value", justify="right")
    for key, value in report["summary"].items():
        summary.add_row(key, f"{value:.4f}" if isinstance(value, float) else safe_text(str(value)))
    console.print(summary)


def safe_text(text: str):
    r"""``text`` as a rich ``Text`` that cannot drive the terminal: no markup, and every
    control character (escape sequences, carriage returns, C1 codes) shown escaped;
    newlines and tabs kept.

    Example:
        >>> safe_text("Paris\x1b]0;pwned\x07 [bold]x[/bold]").plain
        'Paris\\x1b]0;pwned\\x07 [bold]x[/bold]'
    """
    from rich.text import Text

    return Text("".join(_visible(ch) for ch in text))


def _visible(ch: str) -> str:
    if ch in "\n\t" or unicodedata.category(ch) not in ("Cc", "Cf"):
        return ch
    return ch.encode("unicode_escape").decode("ascii")


def _alternatives(alternatives: list[dict]) -> str:
    """``'Paris' .98  'Lyon' .01`` (probabilities to two digits)."""
    return "  ".join(f"{a['token']!r} {a['prob']:.2f}" for a in alternatives)


def _fit(columns: list, width: int) -> list[list]:
    """``columns`` split into tables that fit ``width`` terminal columns, each with the
    index and token columns, so that every value can be read."""
    room = max(width - _TOKEN_WIDTH - 12, _CELL_WIDTH + 3)
    parts, current, used = [], [], 0
    for key, head in columns:
        cell = max(_CELL_WIDTH, len(head)) + 3
        if current and used + cell > room:
            parts.append(current)
            current, used = [], 0
        current.append((key, head))
        used += cell
    return [*parts, current] if current else parts or [[]]


def _choice(event: dict) -> str:
    """How a selection chose, in words (``argmax`` keeps the lowest score when lower is
    better)."""
    what = f"{event['reducer']} of {event['score']}"
    if event["method"] == "argmax":
        best = "highest" if event["higher_is_better"] else "lowest"
        chosen = f"the {best} {what}"
    else:
        chosen = f"{event['method']} vote by {what}"
    return chosen + (f", top {event['eta']:.0%} kept" if event["eta"] < 1 else "")


def _event_step(event: dict) -> int:
    """The answer token an event is shown at: a rollback at the first regenerated token."""
    return event["step"] - event.get("rewound", 0)


def _describe(event: dict) -> str:
    """One cell: which action, which signal crossed which threshold."""
    if event.get("threshold") is None:  # a branch at the first token
        return f"{event['action']}: {len(event['forked_ids'])} first tokens"
    sign = ">" if event["direction"] == "above" else "<"
    text = (
        f"{event['action']}: {event['signal']} {event['value']:.3f} {sign} {event['threshold']:g}"
    )
    if event["action"] == "branch":
        text += f", {len(event['forked_ids'])} alternatives"
    if event["action"] == "rollback":
        text += f", took back {event['rewound']}, kept {event.get('kept', 'new')}"
    return text + (" (blocked)" if "blocked" in event else "")


def _style(u: float) -> str:
    """Rich colour from green (0, confident) over yellow to red (1, uncertain)."""
    if u < 0.33:
        return "green"
    if u < 0.66:
        return "yellow"
    return "bold red"
