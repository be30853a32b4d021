"""User-facing errors.

A `VlkitError` is a mistake in the user's input (a missing path, an empty class
list, a checkpoint of the wrong kind). The CLI prints its message as one line and
exits non-zero; no traceback. Bugs stay ordinary exceptions.
"""


class VlkitError(Exception):
    """An input problem the user can fix; the message names the input and the fix."""
