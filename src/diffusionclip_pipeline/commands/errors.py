"""The commands' user error, `CLIError`, and the one-line form every message takes."""

from __future__ import annotations

__all__ = ["CLIError", "one_line"]


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def one_line(error: BaseException | str, limit: int = 600) -> str:
    """``error``'s text on one line (whitespace runs made single spaces), cut to ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
