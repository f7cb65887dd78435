"""The page's small events: show the controls that apply, bound a slider, warn, cancel.

Each takes the widgets it reads by name (as the ``handlers``) and returns ``gr.update``s.
"""

from __future__ import annotations

import gradio as gr

from mopeq.app import page, view
from mopeq.app import state as st
from mopeq.app.layout import Page
from mopeq.app.text import TRUST_WARNING
from mopeq.core import methods

UNPROBED = methods.DEFAULT_PROBES["hessian"]  # the slider's value for the other methods


class Controls:
    """Visibility and bounds of one page's controls."""

    def __init__(self, ui: Page):
        self.ui = ui

    def score_controls(self, method: str, closed_form: bool) -> dict:
        """Show probes and the closed form only for the methods that use them."""
        shown = view.score_controls(method, closed_form)
        probes = methods.DEFAULT_PROBES.get(method, UNPROBED)
        return {**page.controls(shown, self.ui),
                self.ui.sensitivity.probes: gr.update(visible=shown["probes"], value=probes)}

    def method_controls(self, alloc_method: str) -> dict:
        """Show the controls the allocation method uses."""
        return page.controls(view.alloc_controls(alloc_method), self.ui)


def target_range(bits: list, target_bits: float) -> dict:
    """Bound the budget slider by what the bit set can reach."""
    lo, hi = view.target_bounds(bits)
    return gr.update(minimum=lo, maximum=hi, value=min(max(float(target_bits), lo), hi))


def mode_controls(mode: str) -> dict:
    """The seed applies to tuned runs only."""
    return gr.update(visible=mode == "tuned")


def warn_trust(trust: bool) -> None:
    """Warn when ``trust_remote_code`` is ticked."""
    if trust:
        gr.Warning(TRUST_WARNING)


def cancel(kind: str):
    """A handler that flags the session's running job of ``kind``."""
    def handler(state: st.SessionState) -> None:
        if state.cancel(kind):
            gr.Info(f"Cancelling the {kind} job…")

    return handler
