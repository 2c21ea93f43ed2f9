"""The one exception type moa raises for bad input; the CLI prints it as a single line."""


class MoaError(Exception):
    """A user-facing error: the message names the thing that is wrong and what to do about it."""
