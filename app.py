"""mopeq Gradio app (Hugging Face Spaces entry point): wiring only, no numerics.

Placeholder until the app issue lands: it starts, loads nothing at import, and shows the MoE
layout of a model on request.
"""

from __future__ import annotations

import gradio as gr


def inspect_model(source: str) -> dict:
    """Layout summary of a model, for the page."""
    from mopeq.models import load_model
    from mopeq.moe import discover

    try:
        info = discover(load_model(source).model).to_json()
    except ValueError as exc:
        raise gr.Error(str(exc)) from None
    info.pop("experts")
    return info


def build_demo() -> gr.Blocks:
    """Build the page (cheap: no model is loaded here)."""
    with gr.Blocks(title="mopeq") as demo:
        gr.Markdown("# mopeq: per-expert mixed-precision quantization of MoE models")
        source = gr.Textbox(value="embedded", label="Model (embedded, local folder or hub id)")
        button = gr.Button("Inspect")
        out = gr.JSON(label="MoE layout")
        button.click(inspect_model, source, out, api_name="load_model")
    return demo


demo = build_demo()

if __name__ == "__main__":
    demo.launch()
