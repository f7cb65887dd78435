"""The demo: the page's widgets, its public API, and the wiring between them.

``build_demo()`` is cheap (nothing is loaded until a page or a client asks); the root ``app.py``
calls it and launches the result.
"""

from __future__ import annotations

import gradio as gr

from mopeq.app import page
from mopeq.app import state as st
from mopeq.app.api import Api
from mopeq.app.handlers import Handlers
from mopeq.app.layout import build_layout
from mopeq.app.text import TITLE
from mopeq.app.wiring import register_api, wire

SERVED_FILES_TTL = (3600, 7200)  # check every hour, remove served files older than 2 h


def build_demo(models: st.ModelCache | None = None) -> gr.Blocks:
    """Build the page and its API.

    Args:
        models: the shared model cache (default: a new ``ModelCache`` of two models).
    """
    models = models or st.ModelCache()
    with gr.Blocks(title=TITLE, delete_cache=SERVED_FILES_TTL) as demo:
        ui = build_layout()
        register_api(Api(models))  # first: the public names are never taken
        handlers = Handlers(models, ui)
        handlers.queued = lambda: page.quantize_queue(demo)
        wire(demo, ui, handlers)
    return demo
