"""The one error type that the command line turns into a one-line message and a non-zero exit."""


class UserError(ValueError):
    """Bad input from the user: a file, row, key or option that cannot be used. The message names it."""


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, short: for one-line reports of errors from libraries."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
