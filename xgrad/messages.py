"""How the suite quotes an error or a value in one line: a refusal, a warning, a table's cell."""

from __future__ import annotations


def first_line(error: BaseException | str) -> str:
    """An error's (or a message's) first line; an error without a message is named by its type."""
    lines = str(error).strip().splitlines()
    if lines:
        return lines[0]
    return type(error).__name__ if isinstance(error, BaseException) else ""


def with_type(error: BaseException) -> str:
    """``TypeName: first line``: for an error raised inside a library, whose type says what went wrong."""
    line = first_line(error)
    return line if line == type(error).__name__ else f"{type(error).__name__}: {line}"


def shortened(value: object, width: int = 120) -> str:
    """``value``'s text on one line (runs of whitespace as one space), at most ``width`` characters."""
    text = " ".join(str(value).split())
    return text if len(text) <= width else text[: width - 3] + "..."
