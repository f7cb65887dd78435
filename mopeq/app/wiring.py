"""Events to handlers, with their queue settings, and the public API endpoints.

Each event's inputs are the widgets its handler's parameters name (``inputs``), so a handler
gets exactly what it reads. Long jobs (load, profile, compare, quantize, export) have their own
concurrency groups; the live events (allocation, views) share a wide one, so they never queue
behind a long job. Whatever a long job changes upstream (scores, model) is followed by
``allocate``, which reads the controls as they are *then*, not as they were when the job began.
"""

from __future__ import annotations

import inspect

import gradio as gr

from mopeq.app import controls
from mopeq.app.api import Api
from mopeq.app.errors import readable_errors
from mopeq.app.handlers import Handlers
from mopeq.app.layout import ALLOC_OUT, LOAD_OUT, QUANTIZE_OUT, Page

LIVE = 8  # concurrent live events (allocation, views): milliseconds each
# live outputs never get a progress overlay; a stale live event is dropped (always_last)
HIDDEN = {"show_progress": "hidden"}
LATEST = {"trigger_mode": "always_last", **HIDDEN}


def inputs(ui: Page, handler) -> list:
    """The widgets ``handler``'s parameters name, in its order (``progress`` is gradio's)."""
    names = [n for n in inspect.signature(handler).parameters if n != "progress"]
    return ui.pick(*names)


def private(name: str, group: str | None = None, limit: int = 1, **kw) -> dict:
    """Settings of a page-only event (not callable by API clients)."""
    return dict(api_name=f"page_{name}", api_visibility="private", concurrency_id=group,
                concurrency_limit=limit, **kw)


def _on(trigger, ui: Page, handler, outputs, **settings):
    """``trigger(handler)`` with the inputs ``handler`` names."""
    return trigger(handler, inputs(ui, handler), outputs, **settings)


def _wire_model(demo: gr.Blocks, ui: Page, h: Handlers) -> None:
    m, alloc_out = ui.model, ui.pick(*ALLOC_OUT)
    for trigger in (demo.load, m.load_btn.click, m.source.submit):
        _on(trigger, ui, h.load, ui.pick(*LOAD_OUT), **private(
            "load", "load", 2, show_progress_on=[m.layout_md])).success(
            h.allocate, inputs(ui, h.allocate), alloc_out,
            **private("allocate", "live", LIVE, **HIDDEN))
    _on(m.trust.change, ui, controls.warn_trust, None, **private("trust"))


def _wire_sensitivity(ui: Page, h: Handlers, c: controls.Controls) -> None:
    s, r = ui.sensitivity, ui.results
    for control in (s.method, s.closed_form):
        _on(control.change, ui, c.score_controls, [s.probes, s.closed_form],
            **private("score_controls", "live", LIVE, **LATEST))
    choices = [ui.allocation.score_source, s.view_method]
    profile = _on(s.profile_btn.click, ui, h.profile, [s.profile_md, *choices], **private(
        "profile", "profile", 2, show_progress_on=[s.heatmap]))
    _on(profile.success, ui, h.allocate, ui.pick(*ALLOC_OUT),
        **private("allocate", "live", LIVE, **HIDDEN))
    compare = _on(r.compare_btn.click, ui, h.compare, [r.compare_plot, *choices],
                  **private("compare", "profile", 2))
    _on(s.profile_cancel.click, ui, controls.cancel("profile"), None,
        cancels=[profile, compare], **private("cancel_profile"))
    for control in (s.view_method, s.view_kind, s.projection, s.log_view):
        _on(control.change, ui, h.view, s.heatmap, **private("view", "live", LIVE, **LATEST))


# A clusters move, in the browser at once from the server's preview (page.previews), in two
# page-only listeners that gradio runs one after the other, before it sends the server event:
# the bits map restyled and the memory text (PREVIEW_JS), then the memory chart's bars and the
# Pareto star (CHARTS_JS), each only where the drawn chart has the traces the preview was made
# for. CHARTS_JS writes what the page drew into a hidden box that the server's event reads,
# so that it does not send those outputs again (page.alloc_outputs). Data-only restyles cost
# ~20-40 ms each; a chart deferred to a later task (setTimeout, requestAnimationFrame) waited
# ~40 ms more behind gradio's own work for the server event (README, "Allocation and memory").
PREVIEW_JS = """(c, preview, current) => {
  const p = preview && preview[String(Math.round(c))];
  if (!p) return current;
  const P = window.Plotly, bits = document.querySelector('#bits-plot .js-plotly-plot');
  if (P && p.bits && bits && bits.data) P.restyle(bits, p.bits, [0]);
  return p.memory;
}"""
CHARTS_JS = """(c, preview) => {
  const key = String(Math.round(c)), p = preview && preview[key];
  if (!p) return '';
  const plot = (id) => document.querySelector('#' + id + ' .js-plotly-plot');
  const P = window.Plotly, bits = plot('bits-plot'), mem = plot('memory-plot'),
        front = plot('pareto-plot'), m = p.memory_chart, f = p.pareto;
  const drawn = [key, 'memory_md'];  // what the server's event need not send (alloc_outputs)
  if (!P) return drawn.join(' ');
  if (p.bits && bits && bits.data) drawn.push('bits_plot');  // restyled by PREVIEW_JS
  if (m && mem && mem.data && mem.data.length === m.traces) {
    P.update(mem, m.data, m.layout, [...Array(m.traces).keys()]);
    drawn.push('memory_plot'); }
  if (f && front && front.data && front.data.length > f.trace &&
      front.data[f.trace].name === 'current') {
    P.restyle(front, f.data, [f.trace]);
    drawn.push('pareto_plot'); }
  return drawn.join(' ');
}"""


def _wire_allocation(ui: Page, h: Handlers, c: controls.Controls) -> None:
    a = ui.allocation
    a.clusters.change(None, [a.clusters, a.memory_preview, a.memory_md], a.memory_md,
                      js=PREVIEW_JS, show_progress="hidden", trigger_mode="multiple",
                      **private("clusters_preview"))
    a.clusters.change(None, [a.clusters, a.memory_preview], a.preview_drawn, js=CHARTS_JS,
                      show_progress="hidden", trigger_mode="multiple",
                      **private("clusters_charts"))
    for control in (a.score_source, a.alloc_method, a.clusters, a.bits, a.scope, a.log_scores,
                    a.target_bits, a.uniform_bits, a.group_size, a.base_bits, a.snap, a.seed):
        _on(control.change, ui, h.allocate, ui.pick(*ALLOC_OUT),
            **private("allocate", "live", LIVE, **LATEST))
    _on(a.alloc_method.change, ui, c.method_controls, [
        a.clusters, a.scope, a.log_scores, a.target_bits, a.uniform_bits, a.seed,
        a.score_source], **private("method", "live", LIVE, **LATEST))
    _on(a.bits.change, ui, controls.target_range, a.target_bits,
        **private("target_range", "live", LIVE, **LATEST))


def _wire_runs(ui: Page, h: Handlers) -> None:
    q, e, r = ui.quantize, ui.export, ui.report
    _on(q.mode.change, ui, controls.mode_controls, q.quant_seed,
        **private("mode", "live", LIVE, **LATEST))
    _on(q.tradeoff_y.change, ui, h.tradeoff, [q.tradeoff_plot, q.runs_df],
        **private("tradeoff", "live", LIVE, **LATEST))
    # one quantization at a time (a free CPU); the note says so to whoever waits
    quantize = _on(q.quantize_btn.click, ui, h.queue_note, q.run_md, **private(
        "queue_note", "live", LIVE, **HIDDEN))
    quantize = _on(quantize.then, ui, h.quantize, ui.pick(*QUANTIZE_OUT), **private(
        "quantize", "quantize", 1, show_progress_on=[q.results_plot]))
    _on(q.quantize_cancel.click, ui, controls.cancel("quantize"), None, cancels=[quantize],
        **private("cancel_quantize"))
    _on(e.export_btn.click, ui, h.export, [e.files, e.export_md],
        **private("export", "export", 1))
    _on(r.report_btn.click, ui, h.report, [r.report_md, r.report_df],
        **private("report", "quantize", 1, show_progress_on=[r.report_md]))


def wire(demo: gr.Blocks, ui: Page, h: Handlers) -> None:
    """Connect the page's events to the handlers (inside the ``gr.Blocks`` context)."""
    c = controls.Controls(ui)
    _wire_model(demo, ui, h)
    _wire_sensitivity(ui, h, c)
    _wire_allocation(ui, h, c)
    _wire_runs(ui, h)


def register_api(api: Api) -> None:
    """The public endpoints (stable names for ``gradio_client``)."""
    gr.api(readable_errors(api.load_model), api_name="load_model", concurrency_id="load",
           concurrency_limit=2)
    gr.api(readable_errors(api.profile), api_name="profile", concurrency_id="profile",
           concurrency_limit=2)
    gr.api(readable_errors(api.allocate), api_name="allocate", concurrency_id="live",
           concurrency_limit=LIVE)
    gr.api(readable_errors(api.quantize_evaluate), api_name="quantize_evaluate",
           concurrency_id="quantize", concurrency_limit=1)
