"""mopeq Gradio app (Hugging Face Spaces entry point): builds the page, launches it.

The page walks the MoPEQ flow: load a model, see per-expert sensitivity (layers x experts),
tune the bit allocation while the bits, memory estimate and Pareto view follow every change,
quantize and evaluate on a quick MME subset, and export. On start the embedded model is loaded
and its paper-faithful (``frobenius``, exact) heatmap, default allocation and memory estimate
are drawn without a click.

The main steps are also public, stateless API endpoints keyed by the model source, for
``gradio_client`` scripts and notebooks: ``/load_model``, ``/profile``, ``/allocate`` and
``/quantize_evaluate`` (``mopeq.app.text.API_EXAMPLE``). Everything lives in ``mopeq.app``:
``layout`` (widgets), ``handlers`` and ``controls`` (events), ``wiring``, ``figures``, ``build``.
Run locally with ``python app.py``.
"""

from mopeq.app.build import build_demo

demo = build_demo()

if __name__ == "__main__":
    demo.queue().launch()
