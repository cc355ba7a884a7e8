"""One exception type for every error a user can fix.

The CLI catches :class:`RgeomError` and prints its message on one line, without a traceback:
the message must name the file, key or row at fault.
"""


class RgeomError(Exception):
    """A problem with the user's input (config, data file, model path, disk)."""
