"""The page's live outputs: build only what changed, in one size unit, and say what applies.

``wiring`` connects events to ``handlers``; this module builds their outputs. A live event
(a slider, a bit set) re-sends only the outputs whose content changed (``gr.skip()`` for the
rest, tracked by the session's ``view.Drawn``): the browser redraws one or two figures instead
of six, which is most of the time between a slider move and the redraw.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import gradio as gr

from mopeq.app import state as st
from mopeq.app import tables, text, view
from mopeq.app.api import deploy_badge, memory_text

if TYPE_CHECKING:
    from mopeq.app.layout import Page


def unit(entry: st.ModelEntry) -> str:
    """The size unit of every view of ``entry``'s model (by its bf16 size)."""
    return view.unit_for(sum(st.bf16_breakdown(entry).values()))


def _send(state: st.SessionState, name: str, key: str, build):
    """``build()`` when ``name`` would show something new, else ``gr.skip()``."""
    return build() if state.drawn.changed(name, key) else gr.skip()


def alloc_outputs(ui: Page, state: st.SessionState, entry: st.ModelEntry,
                  alloc, score, judge, settings: st.AllocSettings,
                  preview_drawn: str = "") -> dict:
    """The allocation panel's outputs (bits map, clusters, memory, badge, breakdown, Pareto).

    After a clusters move the browser has already drawn (some of) the memory text, the bits
    map, the memory chart and the Pareto star from the preview it holds; it says which in
    ``preview_drawn`` (``wiring.CHARTS_JS``), and those are not sent again (gradio would redraw
    each figure twice, ~250 ms of the page's thread).
    """
    from mopeq.app import figures as plots

    labels, u = entry.layout.moe_layers, unit(entry)
    bits = alloc.bitmap.bits
    note = memory_note(alloc, score, settings)
    table = tables.clusters_table(alloc, score)
    badge = deploy_badge(alloc.bitmap)
    breakdown = alloc.memory.breakdown
    fp, a, r, drawn = view.fingerprint, ui.allocation, ui.results, state.drawn
    preview_key = fp(score.scores, score.method, judge.method, u,
                     dataclasses.replace(settings, clusters=0))
    by_preview = _previewed(drawn, preview_key, settings, preview_drawn)

    def send(name: str, key: str, build):
        if name in by_preview:
            drawn.shown(name, key)
            return gr.skip()
        return _send(state, name, key, lambda: drawn.stamp(build()))

    return {
        a.memory_md: send("memory_md", note, lambda: note),
        a.deploy_md: _send(state, "deploy_md", badge, lambda: badge),
        r.bits_plot: send("bits_plot", fp(bits, labels, score.scores), lambda: (
            plots.bits_heatmap(bits, layer_labels=labels, scores=score.scores))),
        r.clusters_df: _send(state, "clusters_df", fp(table.to_json()),
                             lambda: view.readable(table)),
        r.memory_plot: send("memory_plot", fp(sorted(breakdown.items()), u), lambda: (
            plots.memory_breakdown(breakdown, reference=st.bf16_breakdown(entry), unit=u))),
        r.pareto_plot: send("pareto_plot", fp(alloc.pareto, alloc.current, u,
                                              judge.method), lambda: (
            plots.pareto_curve(alloc.pareto, current=alloc.current, unit=u,
                               score_name=judge.method) if alloc.pareto else None)),
        a.memory_preview: _send(state, "memory_preview", preview_key, lambda: _held(
            drawn, previews(entry, score, settings, range(int(a.clusters.minimum),
                                                          int(a.clusters.maximum) + 1), judge))),
    }


def _held(drawn: view.Drawn, preview: dict) -> dict:
    """The preview sent to the page, remembered as the one it holds."""
    drawn.preview = preview
    return preview


PREVIEWED = frozenset({"memory_md", "bits_plot", "memory_plot", "pareto_plot"})


def _previewed(drawn: view.Drawn, preview_key: str, settings: st.AllocSettings,
               preview_drawn: str) -> set[str]:
    """The outputs the page drew itself for ``settings.clusters`` (as it reports them).

    Only when the report is for this clusters value and the preview the page holds was made
    for these settings (all but the clusters): a report left from an earlier move, for other
    settings, or for another value sends everything.
    """
    parts = (preview_drawn or "").split()
    if (not parts or parts[0] != str(settings.clusters)
            or drawn.keys.get("memory_preview") != preview_key or parts[0] not in drawn.preview):
        return set()
    return set(parts[1:]) & PREVIEWED


def memory_note(alloc, score, settings) -> str:
    """The memory text of an allocation: size, ratio, bits, and which scores chose them."""
    return (memory_text(alloc) + f"\n\nBits allocated by **{score.method}** scores"
            + view.budget_note(settings.method, settings.target_bits, settings.bits))


def previews(entry: st.ModelEntry, score, settings: st.AllocSettings, clusters,
             judge=None) -> dict:
    """At every clusters value, what a move to it redraws.

    ``memory`` (the note), ``bits`` (the bits map's ``Plotly.restyle``), ``memory_chart``
    (``Plotly.update``: the bars' sizes and the title) and ``pareto`` (``Plotly.restyle`` of
    the star; when the allocation has a current point); ``{}`` for methods without clusters.
    The clusters slider shows the entry for its new value in the browser at once (no round
    trip: ``wiring.PREVIEW_JS`` and ``CHARTS_JS``); the server's own event then leaves what
    it drew (``alloc_outputs``). Each entry is the allocation the server would compute for
    that value (``judge``: the scores its predicted loss weighs errors by).
    """
    from mopeq.app import figures as plots

    if not view.alloc_controls(settings.method)["clusters"]:
        return {}
    u, reference = unit(entry), st.bf16_breakdown(entry)
    out = {}
    for c in clusters:
        chosen = dataclasses.replace(settings, clusters=c)
        try:
            alloc = st.allocate(entry, score, chosen, with_pareto=False, judge=judge,
                                with_current=True)  # the frontier does not move with C
        except ValueError:  # e.g. more clusters than experts: the server event says why
            continue
        entry_c = {"memory": memory_note(alloc, score, chosen), "bits": plots.bits_restyle(
            alloc.bitmap.bits, layer_labels=entry.layout.moe_layers, scores=score.scores),
            "memory_chart": plots.memory_update(alloc.memory.breakdown, reference=reference,
                                                unit=u)}
        if alloc.current:
            entry_c["pareto"] = plots.pareto_update(alloc.current, unit=u)
        out[str(c)] = entry_c
    return out


def heatmap_output(state: st.SessionState, key: tuple, build):
    """The heatmap, or ``gr.skip()`` when the same view is on screen."""
    return _send(state, "heatmap", view.fingerprint(*key), build)


def runs_outputs(ui: Page, state: st.SessionState, unit_: str, y: str,
                 bf16_gb: float) -> dict:
    """The runs scatter and table from the session's runs (empty views without runs)."""
    from mopeq.app import figures as plots

    q = ui.quantize
    if not state.runs:
        return {q.tradeoff_plot: None, q.runs_df: None}
    points = tables.tradeoff_points(state.runs, bf16_gb)
    return {q.tradeoff_plot: plots.tradeoff_scatter(points, unit=unit_, y=y),
            q.runs_df: view.readable_runs(tables.runs_table(state.runs), unit_)}


def heatmap_figure(entry: st.ModelEntry, score, bits, kind: str, projection: str, log: bool,
                   routed):
    """The heatmap of one view of ``score`` (``routed()``: the routing counts, when missing)."""
    from mopeq.app import figures as plots

    labels = entry.layout.moe_layers
    if kind == "bits" and bits is not None:
        return plots.bits_heatmap(bits, layer_labels=labels, scores=score.scores)
    if kind == "tokens":
        counted = score if score.tokens is not None else routed()
        cover = counted.meta.get("coverage")
        return plots.sensitivity_heatmap(
            counted.tokens, title=f"Routing: top-k assignments per expert — {cover:.0%} "
            "of experts get tokens", layer_labels=labels, bits=bits, log=log,
            colorbar_title="tokens")
    method = score.method
    if kind == "stderr" and score.stderr is not None:
        return plots.sensitivity_heatmap(score.stderr, title=f"{method}: standard error",
                                         layer_labels=labels, bits=bits, log=log,
                                         colorbar_title="stderr")
    if kind == "stderr":
        gr.Info(text.NO_STDERR.format(method=method))
    values = score.scores if projection == "total" else score.per_projection[projection]
    name = method if projection == "total" else f"{method} ({projection})"
    return plots.sensitivity_heatmap(
        values, title=f"Sensitivity: {name}", layer_labels=labels, bits=bits, log=log,
        stderr=score.stderr if projection == "total" else None, colorbar_title=name)


def restore_runs(state: st.SessionState, saved, fingerprint: str) -> bool:
    """Put runs kept in the browser back into a fresh session (same model only)."""
    if state.runs or not isinstance(saved, dict) or saved.get("model") != fingerprint:
        return False
    runs = [r for r in saved.get("runs", []) if isinstance(r, dict) and "label" in r]
    state.runs.extend(runs)
    return bool(runs)


def saved_runs(state: st.SessionState, fingerprint: str) -> dict:
    """What the browser keeps across reloads: the model's fingerprint and its runs."""
    return {"model": fingerprint, "runs": state.runs}


def controls(names: dict[str, bool], ui: Page) -> dict:
    """``gr.update(visible=...)`` for each named control."""
    widgets = ui.pick(*names)
    return {w: gr.update(visible=shown) for w, shown in zip(widgets, names.values(), strict=True)}


def quantize_queue(demo: gr.Blocks, concurrency_id: str = "quantize") -> int | None:
    """Quantizations running or waiting in gradio's queue (None if it cannot be read).

    Reads gradio's queue (pinned ``gradio<7``); the page shows the number to a user who waits.
    """
    try:
        q = demo._queue.event_queue_per_concurrency_id.get(concurrency_id)
        return 0 if q is None else len(q.queue) + int(q.current_concurrency)
    except AttributeError:
        return None
