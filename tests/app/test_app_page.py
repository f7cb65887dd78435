"""What the page shows: the handlers' logic, driven in-process on the embedded model.

No server, no browser: the handlers get the widget values their parameters name, as gradio
passes them (the page's defaults unless a test changes one), and the tests read the updates
they return. ``tests/app/test_browser.py`` checks the same in Chromium.
"""

from __future__ import annotations

import inspect
import json
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest

from mopeq.app import controls, view
from mopeq.app import state as st
from mopeq.app.api import profile_text, run_text

SKIP = gr.skip()


def _quiet(*_a, **_k):
    pass


@pytest.fixture(scope="module")
def page(embedded_model):
    """Handlers on a fresh session with the page's default values, after the first load."""
    from mopeq.app.handlers import Handlers
    from mopeq.app.layout import build_layout

    with gr.Blocks():
        ui = build_layout()
    widgets = ui.widgets()
    v = {name: getattr(c, "value", None) for name, c in widgets.items()}
    v["state"], v["saved_runs"] = st.SessionState(), {}
    h = Handlers(st.ModelCache(), ui)
    page = SimpleNamespace(h=h, ui=ui, w=SimpleNamespace(**widgets), v=v)
    call(page, h.load, progress=_quiet)
    call(page, h.allocate)
    return page


def call(page, handler, **changed):
    """``handler`` on the page's values, with ``changed`` ones (by widget name) instead."""
    values = {**page.v, **changed}
    names = inspect.signature(handler).parameters
    return handler(**{n: values[n] for n in names if n in values})


def _sent(out: dict, component) -> bool:
    value = out[component]
    return not (isinstance(value, dict) and value == SKIP)


# ------------------------------------------------------------------------ controls


def test_sensitivity_controls_show_only_what_applies():
    assert view.score_controls("fisher", True) == {"probes": False, "closed_form": False}
    assert view.score_controls("frequency", False) == {"probes": False, "closed_form": False}
    assert view.score_controls("hessian", True) == {"probes": True, "closed_form": False}
    assert view.score_controls("frobenius", True) == {"probes": False, "closed_form": True}
    assert view.score_controls("frobenius", False) == {"probes": True, "closed_form": True}


def test_allocation_controls_show_only_what_applies():
    for method in ("budget", "uniform"):
        assert view.alloc_controls(method)["seed"] is False
    for method in ("kmeans", "frequency", "random"):
        assert view.alloc_controls(method)["seed"] is True
    assert view.alloc_controls("frequency")["score_source"] is False  # routing counts only
    assert view.alloc_controls("kmeans")["score_source"] is True


def test_budget_target_is_bounded_and_a_cap_is_said():
    assert view.target_bounds([4, 2, 3]) == (2.0, 4.0)
    assert view.target_bounds([8]) == (8.0, 8.0)
    note = view.budget_note("budget", 8.0, (2, 3, 4))
    assert "above the widest width (4)" in note and "every expert gets 4 bits" in note
    assert view.budget_note("budget", 3.5, (2, 3, 4)) == ""
    assert view.budget_note("kmeans", 8.0, (2, 3, 4)) == ""


def test_predicted_loss_is_never_weighted_by_routing_counts():
    assert view.judge_method("hessian", "kmeans") == "hessian"
    assert view.judge_method("hessian", "frequency") == "frobenius"
    assert view.judge_method("frequency", "kmeans") == "frobenius"


# ------------------------------------------------------------------------ texts


def test_status_lines_name_the_method_and_a_cache_hit():
    fisher = SimpleNamespace(method="fisher", meta={
        "settings": {"normalize_per_layer": False, "loss": "ce"}, "elapsed_s": 51.73})
    text = profile_text(fisher, cached=False)
    assert "routing counts" not in text and "empirical Fisher trace" in text  # its table label
    hit = profile_text(fisher, cached=True)
    assert "from cache" in hit and "51.73" not in hit
    freq = SimpleNamespace(method="frequency", meta={"settings": {}, "elapsed_s": 1.0})
    assert "routing counts" in profile_text(freq, cached=False)


def test_one_unit_per_view():
    assert view.unit_for(4.4e6) == "MB" and view.unit_for(6.1e10) == "GB"
    summary = {"label": "#1", "mode": "rtn", "score": 900.0, "baseline_score": 950.0,
               "delta": -50.0, "pairs": 10, "kl": 0.01, "flip_rate": 0.1, "gb": 0.00143,
               "ratio_vs_bf16": 3.04, "quantize_s": 2.0}
    text = run_text(summary)
    assert "1.430 MB" in text and "GB" not in text
    import pandas as pd

    frame = pd.DataFrame([{**summary, "avg_bits": 3.0, "deployable_fused": False}])
    table = view.readable_runs(frame, "MB")
    assert "size (MB)" in table and "gb" not in table
    row = table.iloc[0]
    assert row["size (MB)"] == "1.430" and row["kl"] == "0.0100"
    assert row["flip_rate"] == "10.0%" and row["delta"] == "-50.0"
    assert row["ratio_vs_bf16"] == "3.04×"


def test_queue_note_says_why_a_run_waits():
    assert view.queue_text(0, None) == "⏳ Quantizing…"
    text = view.queue_text(1, 20.0)
    assert "1 quantization run is ahead" in text and "one model at a time" in text
    assert "about 20 s" in text
    assert "2 quantization runs are ahead" in view.queue_text(2, None)


def test_drawn_tracks_what_each_output_shows():
    drawn = view.Drawn()
    key = view.fingerprint(np.array([[2, 4]]), "frobenius")
    assert drawn.changed("bits_plot", key) and not drawn.changed("bits_plot", key)
    assert drawn.changed("bits_plot", view.fingerprint(np.array([[4, 4]]), "frobenius"))
    drawn.forget()
    assert drawn.changed("bits_plot", key)


# ------------------------------------------------------------------------ layout and wiring


def test_the_page_starts_on_the_run_defaults(page):
    from mopeq.core import defaults, methods

    v = page.v
    assert v["method"] == v["score_source"] == v["view_method"] == defaults.SCORE_METHOD
    assert v["alloc_method"] == defaults.ALLOC_METHOD and v["clusters"] == defaults.CLUSTERS
    assert tuple(v["bits"]) == defaults.BITS and v["scope"] == defaults.SCOPE
    assert v["target_bits"] == defaults.TARGET_BITS
    assert v["uniform_bits"] == defaults.UNIFORM_BITS
    assert v["group_size"] == defaults.GROUP_SIZE and v["base_bits"] == defaults.BASE_BITS
    assert v["seed"] == v["quant_seed"] == defaults.SEED
    assert v["mode"] == defaults.QUANT_MODE and v["pairs"] == defaults.QUICK_PAIRS
    assert v["probes"] == methods.DEFAULT_PROBES[defaults.SCORE_METHOD]
    assert page.w.method.choices == [(m, m) for m in methods.NAMES]


def test_every_handler_names_only_widgets(page):
    from mopeq.app import wiring

    c = controls.Controls(page.ui)
    handlers = [page.h.load, page.h.profile, page.h.view, page.h.compare, page.h.allocate,
                page.h.quantize, page.h.tradeoff, page.h.export, page.h.report,
                page.h.queue_note, c.score_controls, c.method_controls, controls.target_range,
                controls.mode_controls, controls.warn_trust, controls.cancel("profile")]
    for handler in handlers:
        names = [n for n in inspect.signature(handler).parameters if n != "progress"]
        assert wiring.inputs(page.ui, handler) == page.ui.pick(*names)
    allocate = wiring.inputs(page.ui, page.h.allocate)
    assert page.w.state in allocate and page.w.heatmap not in allocate
    assert page.w.mode not in allocate  # the quantize panel is not an allocation input


def test_probe_slider_follows_the_method_table(page):
    from mopeq.core import methods

    c = controls.Controls(page.ui)
    out = c.score_controls("hessian", True)
    assert out[page.w.probes]["value"] == methods.DEFAULT_PROBES["hessian"]
    assert out[page.w.probes]["visible"] is True and out[page.w.closed_form]["visible"] is False
    assert c.score_controls("frobenius", True)[page.w.probes]["visible"] is False


# ------------------------------------------------------------------------ handlers


def test_a_live_event_sends_only_what_changed(page):
    h, w, v = page.h, page.w, page.v
    again = call(page, h.allocate)
    assert all(val == SKIP for val in again.values())  # nothing changed: nothing is redrawn
    v["base_bits"] = 8  # memory changes; the bits of the experts do not
    out = call(page, h.allocate)
    assert _sent(out, w.memory_md) and _sent(out, w.memory_plot)
    assert not _sent(out, w.bits_plot) and not _sent(out, w.heatmap)
    assert not _sent(out, w.clusters_df)
    v["base_bits"] = 4
    call(page, h.allocate)


def test_the_clusters_preview_is_what_the_server_then_writes(page):
    """The browser shows ``memory_preview[C]`` at once; the server's event writes the same."""
    from mopeq.app.wiring import PREVIEW_JS

    a, state = page.ui.allocation, page.v["state"]

    def allocate(**changed):
        state.drawn = view.Drawn()  # a fresh browser: every output is sent
        return call(page, page.h.allocate, **changed)

    preview = allocate()[a.memory_preview]
    lo, hi = int(a.clusters.minimum), int(a.clusters.maximum)
    assert set(preview) == {str(c) for c in range(lo, hi + 1)}
    rows = set()
    for c in (1, 2, 4):
        out = allocate(clusters=c)
        assert out[a.memory_md] == preview[str(c)]["memory"]
        trace = out[page.ui.results.bits_plot].data[0]  # the figure the server then draws
        restyle = preview[str(c)]["bits"]
        assert restyle["z"][0] == trace.z.tolist()
        assert restyle["customdata"][0] == trace.customdata.tolist()
        assert restyle["text"][0] == (None if trace.text is None else list(map(list, trace.text)))
        assert restyle["colorscale"][0] == [list(x) for x in trace.colorscale]
        assert restyle["zmax"][0] == trace.zmax
        assert restyle["colorbar.ticktext"][0] == list(trace.colorbar.ticktext)
        chart, update = out[page.ui.results.memory_plot], preview[str(c)]["memory_chart"]
        assert update["traces"] == len(chart.data)
        assert update["data"]["x"] == [list(t.x) for t in chart.data]
        assert set(update["data"]) == {"x"}  # the row labels do not move with C: bars only
        rows.add(tuple(chart.data[0].y))
        assert update["layout"]["title.text"] == chart.layout.title.text
        front, move = out[page.ui.results.pareto_plot], preview[str(c)]["pareto"]
        star = front.data[move["trace"]]
        assert star.name == "current" and move["data"]["x"] == [list(star.x)]
        assert move["data"]["y"] == [list(star.y)] and move["data"]["text"] == [list(star.text)]
        assert move["data"]["customdata"] == [list(star.customdata)]
        assert star.text[0].startswith("current: ") and "avg bits" in star.customdata[0]
        assert not front.layout.annotations  # nothing in the layout moves with the star
    assert len(rows) == 1, rows
    assert len({preview[str(c)]["memory"] for c in (1, 2, 3)}) == 3  # it moves with C
    json.dumps(preview)  # it travels to the browser as JSON
    again = call(page, page.h.allocate, clusters=5)  # same settings but C: not sent again
    assert again[a.memory_preview] == SKIP
    assert allocate(alloc_method="budget")[a.memory_preview] == {}  # no clusters, no preview
    assert "preview[String(Math.round(c))]" in PREVIEW_JS
    allocate()


def test_what_the_clusters_preview_drew_is_not_sent_again(page):
    """A clusters move: the page reports what it drew from the preview it holds (the text, the
    bits map, the memory chart, the star), and the server's event leaves exactly those; a
    report for another value or other settings sends everything, and every figure sent is a
    new JSON (gradio redraws a plot only when its value changes)."""
    a, r, state = page.ui.allocation, page.ui.results, page.v["state"]
    drawn_by_preview = (a.memory_md, r.bits_plot, r.memory_plot, r.pareto_plot)
    everything = "memory_md bits_plot memory_plot pareto_plot"
    state.drawn = view.Drawn()
    first = call(page, page.h.allocate, clusters=2)
    assert all(_sent(first, x) for x in drawn_by_preview)
    moved = call(page, page.h.allocate, clusters=4, preview_drawn=f"4 {everything}")
    assert not any(_sent(moved, x) for x in drawn_by_preview)
    assert _sent(moved, r.clusters_df)  # the table is not in the preview: the server sends it
    # the page drew the text and the bits only (its charts lacked the preview's traces)
    part = call(page, page.h.allocate, clusters=3, preview_drawn="3 memory_md bits_plot")
    assert not _sent(part, a.memory_md) and not _sent(part, r.bits_plot)
    assert _sent(part, r.memory_plot) and _sent(part, r.pareto_plot)
    # a report left from an earlier move (another value): everything is sent. (C = 4's map
    # differs from the C = 3 map on the page; on the shipped model C = 5 gives C = 3's map
    # again, and a figure equal to the one drawn is rightly not sent.)
    stale = call(page, page.h.allocate, clusters=4, preview_drawn=f"3 {everything}")
    assert all(_sent(stale, x) for x in drawn_by_preview)
    # another bit set: the page's preview was made for other settings, so all is sent
    other = call(page, page.h.allocate, clusters=5, bits=["2", "4"],
                 preview_drawn=f"5 {everything}")
    assert all(_sent(other, x) for x in drawn_by_preview)
    # back to the first settings: a figure equal to the one gradio may still hold as the bits
    # plot's value (the preview restyled it), yet a different JSON, so the browser redraws it
    back = call(page, page.h.allocate, clusters=2)
    assert back[r.bits_plot].to_json() != first[r.bits_plot].to_json()
    assert back[r.bits_plot].data[0].z.tolist() == first[r.bits_plot].data[0].z.tolist()
    call(page, page.h.allocate)


def test_the_allocation_follows_a_newly_computed_method(page):
    h, w = page.h, page.w
    out = call(page, h.profile, method="frequency", progress=_quiet)
    assert out[w.score_source]["value"] == "frequency"  # what the heatmap now shows
    assert out[w.view_method]["value"] == "frequency"
    alloc = call(page, h.allocate, score_source="frequency", view_method="frequency")
    assert "allocated by **frequency** scores" in alloc[w.memory_md]
    call(page, h.allocate)  # back to frobenius for the other tests


def test_frequency_allocation_judges_by_a_sensitivity(page):
    h, w, v = page.h, page.w, page.v
    out = call(page, h.allocate, alloc_method="frequency", score_source="frobenius")
    state = v["state"]
    pareto = out[w.pareto_plot]
    assert "frobenius" in pareto.layout.title.text
    frobenius = state.scores["frobenius"]
    errs = st.errors(st.ModelCache.key("embedded") and h.models.get("embedded"), (2, 3, 4), 128)
    from mopeq.allocation.budget import predicted_loss

    expected = predicted_loss(state.allocation.bitmap, frobenius, errs, (2, 3, 4))
    assert state.allocation.current["predicted_loss"] == pytest.approx(expected)
    call(page, h.allocate)


def test_budget_above_the_bit_set_says_so(page):
    h, w = page.h, page.w
    out = call(page, h.allocate, alloc_method="budget", target_bits=8.0)
    assert "above the widest width (4)" in out[w.memory_md]
    assert controls.target_range([2, 3, 4], 8.0)["maximum"] == 4.0
    assert controls.target_range([2, 3, 4, 8], 3.0)["maximum"] == 8.0
    single = call(page, h.allocate, alloc_method="kmeans", bits=[8])
    assert "One allocation only" in single[w.pareto_plot].layout.title.text
    call(page, h.allocate)


def test_a_failed_or_empty_load_keeps_the_active_model_and_says_so(page, tmp_path):
    h, w, v = page.h, page.w, page.v
    out = call(page, h.load, source=str(tmp_path / "missing"), progress=_quiet)
    assert "Could not load" in out[w.layout_md] and "**embedded**" in out[w.layout_md]
    assert "no such model folder" in out[w.layout_md]
    assert out[w.source] == "embedded"  # the box names the model the page works on
    assert out[w.params_df] == SKIP and out[w.score_source] == SKIP
    assert v["state"].key == ("embedded", False)
    empty = call(page, h.load, source="  ", progress=_quiet)
    assert "No model given" in empty[w.layout_md] and empty[w.source] == "embedded"
    loaded = call(page, h.load, progress=_quiet)
    assert loaded[w.layout_md].startswith("Active model: **embedded**")


def test_runs_are_kept_for_the_browser_and_restored(page):
    state = st.SessionState()
    runs = [{"label": "#1 kmeans", "method": "kmeans", "scores": "frobenius", "mode": "rtn",
             "pairs": 10, "avg_bits": 3.0, "gb": 0.0014, "score": 900.0,
             "baseline_score": 950.0, "kl": 0.01, "ratio_vs_bf16": 3.0,
             "deployable_fused": False}]
    state.runs.extend(runs)
    from mopeq.app import page as app_page

    saved = json.loads(json.dumps(app_page.saved_runs(state, "abc")))  # what the browser keeps
    fresh = st.SessionState()
    assert not app_page.restore_runs(fresh, saved, "other-model")
    assert app_page.restore_runs(fresh, saved, "abc") and fresh.runs == runs
    assert not app_page.restore_runs(fresh, saved, "abc")  # never twice


def test_tuned_runs_pass_their_seed_to_auto_round():
    from mopeq.embedded import tiny
    from mopeq.model.moe import discover
    from mopeq.quantize.autoround import QuantConfig, _autoround, layer_config, quant_root

    model, processor = tiny.new_model(tiny.TinyRecipe(hidden_size=64, expert_ffn=64))
    layout = discover(model)
    root, prefix = quant_root(model)
    bits = np.full((layout.num_moe_layers, layout.num_experts), 4)
    config = QuantConfig(mode="tuned", group_size=32, seed=7)
    cfg = layer_config(layout, bits, config, prefix)
    ar = _autoround(root, processor.tokenizer, cfg, config, ["a calibration text"] * 4)
    assert ar.seed == 7


def test_bad_input_is_a_message_and_the_page_keeps_its_state(page):
    h, v = page.h, page.v
    before = v["state"].allocation
    with pytest.raises(gr.Error, match="no bit width"):
        call(page, h.allocate, bits=[])
    assert v["state"].allocation is before and before is not None


def test_user_errors_read_as_messages_and_bugs_as_unexpected():
    from mopeq.app.errors import readable_errors
    from mopeq.core.errors import MopeqError

    def fails(exc):
        raise exc

    guarded = readable_errors(fails)
    with pytest.raises(gr.Error) as info:
        guarded(MopeqError("bad group size"))
    assert info.value.message == "bad group size"  # the message alone, no traceback
    with pytest.raises(gr.Error, match="Unexpected KeyError"):
        guarded(KeyError("x"))
    with pytest.raises(gr.Error, match="Cancelled"):
        guarded(st.Cancelled())
