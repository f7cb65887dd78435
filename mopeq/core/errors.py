"""The one exception for user errors (bad input, a model that can't be used, a corrupt file).

The CLI prints its message and exits 2; the page shows it as a warning and keeps its state.
Anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class MopeqError(ValueError):
    """A problem with what the user asked for, explained in its message."""
