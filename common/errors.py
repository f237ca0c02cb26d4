"""How a caught exception is named inside a one-line error message."""

from __future__ import annotations


def brief(err: BaseException, limit: int = 200) -> str:
    """`<type>: <first line of the message, at most `limit` characters>`."""
    lines = str(err).splitlines()
    return f"{type(err).__name__}: {lines[0][:limit] if lines else ''}"
