"""How the page and the API show a failure: a user error as a message, a bug as a bug.

A ``MopeqError`` (or another ``ValueError`` a stage raises for bad input: ``ModelLoadError``,
``NotMoEError``) becomes a ``gr.Error`` with its message and no stack trace; the session's state
is left as it was. Anything else is logged with its traceback and shown as unexpected.
"""

from __future__ import annotations

import functools
import logging

import gradio as gr

from mopeq.app import state as st
from mopeq.app import text

LOG = logging.getLogger("mopeq.app")


def readable_errors(fn):
    """Turn library errors into ``gr.Error`` messages on the page (never a stack trace)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except st.Cancelled:
            raise gr.Error(text.CANCELLED, title="Cancelled", print_exception=False) from None
        except ValueError as exc:  # MopeqError and the stages' other user errors
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - shown to the user, logged for the developer
            LOG.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"Unexpected {type(exc).__name__}: {exc}",
                           print_exception=False) from None

    return wrapper
