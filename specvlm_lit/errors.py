"""The one base class for mistakes the user can fix (a bad path, value, file or config).

Every command-line entry point catches :class:`UserError` and prints it as one ``error: ...`` line with no
traceback; anything else is a bug and keeps its traceback. A new error kind subclasses it and is caught
everywhere without touching the CLIs.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user gave is wrong; the message says what and how to fix it.

    Subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working.
    """


def one_line(e: BaseException) -> str:
    """The message folded onto one line, for ``error: ...`` output."""
    return " ".join(str(e).split())


def find_user_error(e: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``e``: ``e`` itself, or a cause it wraps (Hydra's ``instantiate`` wraps what a
    ``_target_`` raises in an ``InstantiationException``; Lightning may re-raise from a hook)."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = e.__cause__
    return None
