"""The one exception type the CLI turns into a one-line message (exit status 2)."""


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and what to do."""
