"""The one error type that the command line turns into a one-line message and a non-zero exit."""


class UserError(ValueError):
    """Bad input from the user: a file, row, key or option that cannot be used. The message names it."""
