"""The one exception type users see.

Stages raise `UserError` for bad input (unknown site, missing file, mismatched config...).
Its message names the thing, what was expected and how to fix it; the CLI prints it as a
paragraph without a traceback and exits non-zero. Anything else is a bug and keeps its
traceback.
"""


class UserError(Exception):
    """Bad input or environment that the user can fix; the message says how."""
