"""The page's events: each takes exactly the widgets it reads, by their names in ``layout``.

A handler's parameters are widget names (``progress`` aside), so ``wiring`` passes each event
the inputs its handler names and no others. Handlers update the session and return updates keyed
by widget; the long ones (load, profile, compare, quantize, export, report) are here, the
controls that only show or bound other controls in ``controls``.
"""

from __future__ import annotations

import time

import gradio as gr

from mopeq.app import page, tables, view
from mopeq.app import state as st
from mopeq.app.api import layout_text, profile_text, run_text
from mopeq.app.errors import readable_errors
from mopeq.app.layout import ALLOC_OUT, LOAD_OUT, Page
from mopeq.app.text import EXPORTED, NO_MODEL, SCORES_ONLY
from mopeq.core import defaults

# gradio passes per-call trackers through these defaults (it keys them by event, not instance)
PROGRESS, TRACKED = gr.Progress(), gr.Progress(track_tqdm=True)


def reporter(progress: gr.Progress):
    """Adapt ``gr.Progress`` to the library's ``on_progress(fraction, message)``."""
    return lambda fraction, message: progress(fraction, desc=message)


def settings_of(alloc_method, clusters, bits, scope, log_scores, target_bits, uniform_bits,
                group_size, base_bits, snap, seed) -> st.AllocSettings:
    """The allocation settings from the allocation panel's widget values."""
    return st.AllocSettings.of(alloc_method, clusters, bits, scope, log_scores, target_bits,
                               uniform_bits, group_size, base_bits, snap, seed)


class Handlers:
    """The long events and the live allocation, over one app's model cache and page."""

    def __init__(self, models: st.ModelCache, ui: Page):
        self.models, self.ui = models, ui
        self.queued = lambda: None  # quantizations in gradio's queue (build_demo sets it)
        self.run_seconds: list[float] = []  # recent quantize durations, for the queue note

    # -- helpers

    def _entry(self, state: st.SessionState) -> st.ModelEntry:
        if state.key is None:
            raise gr.Error(NO_MODEL, print_exception=False)
        return self.models.get(*state.key)

    @staticmethod
    def _scores(state, entry, method: str, probes, closed_form, on_progress=st._noop):
        """The session's scores for ``method``, computed (with the page's probes) if missing."""
        if method not in state.scores:
            spec = st.ScoreSpec(method, probes or 0, closed_form)
            state.scores[method], _ = st.profile(entry, spec, on_progress)
        return state.scores[method]

    def _method_choices(self, state, shown: str | None = None) -> dict:
        """Dropdown updates listing the methods this session has computed.

        ``shown``: a method just computed; the heatmap shows it and the allocation uses it.
        """
        names, chosen = list(state.scores), {"value": shown} if shown else {}
        return {self.ui.allocation.score_source: gr.update(choices=names, **chosen),
                self.ui.sensitivity.view_method: gr.update(choices=names, **chosen)}

    def _skipped(self, names) -> dict:
        return {c: gr.skip() for c in self.ui.pick(*names)}

    @staticmethod
    def _active(state) -> str | None:
        return None if state.key is None else state.key[0]

    def _runs_views(self, state, entry, tradeoff_y: str) -> dict:
        bf16_gb = sum(st.bf16_breakdown(entry).values()) / 1e9
        return page.runs_outputs(self.ui, state, page.unit(entry), tradeoff_y, bf16_gb)

    def _heatmap(self, state, entry, view_method, view_kind, projection, log_view, probes,
                 closed_form) -> dict:
        score = self._scores(state, entry, view_method, probes, closed_form)
        # only the "bits" view draws the allocation: a score view is not redrawn when it moves
        bits = (state.allocation.bitmap.bits
                if view_kind == "bits" and state.allocation is not None else None)
        key = (view_method, view_kind, projection, log_view, score.scores, bits)

        def routed():
            return self._scores(state, entry, "frequency", probes, closed_form)

        return {self.ui.sensitivity.heatmap: page.heatmap_output(state, key, lambda: (
            page.heatmap_figure(entry, score, bits, view_kind, projection, log_view, routed)))}

    # -- model

    @readable_errors
    def load(self, state, source, trust, saved_runs, tradeoff_y, progress=PROGRESS) -> dict:
        """Load the model and its paper-faithful scores (``allocate`` follows; the first view).

        An empty box or a failed load leaves the active model in place and says so (the
        textbox goes back to the active model's source).
        """
        typed = (source or "").strip()
        if not typed:
            return self._not_loaded(state, view.empty_source_text(self._active(state)))
        progress(0.1, desc=f"loading {typed}")
        key = self.models.key(typed, trust)
        try:
            entry = self.models.get(*key)
        except ValueError as exc:  # MopeqError, ModelLoadError, NotMoEError: the model stays
            return self._not_loaded(state, view.load_failed_text(typed, str(exc),
                                                                 self._active(state)))
        state.use_model(key)
        first = defaults.SCORE_METHOD  # the paper's score, whatever was shown before
        score, cached = st.profile(entry, st.ScoreSpec(first, closed_form=True))
        state.scores[first] = score
        info, q = st.layout_summary(entry), self.ui.quantize
        restored = page.restore_runs(state, saved_runs, entry.loaded.fingerprint)
        return {self.ui.model.layout_md: view.ACTIVE + layout_text(info),
                self.ui.model.params_df: tables.layout_table(info),
                self.ui.sensitivity.profile_md: profile_text(score, cached),
                **self._method_choices(state, shown=first), self.ui.model.source: key[0],
                **(self._runs_views(state, entry, tradeoff_y) if restored else
                   {q.tradeoff_plot: gr.skip(), q.runs_df: gr.skip()})}

    def _not_loaded(self, state, message: str) -> dict:
        """Outputs of a load that did not happen: the note, the active model's layout."""
        gr.Warning(message.split("\n")[0].replace("*", "").replace("`", "'"))
        active = ("" if state.key is None else
                  "\n\n" + layout_text(st.layout_summary(self.models.get(*state.key))))
        return {**self._skipped(LOAD_OUT), self.ui.model.layout_md: message + active,
                self.ui.model.source: self._active(state) or gr.skip()}

    # -- sensitivity

    @readable_errors
    def profile(self, state, method, probes, closed_form, progress=TRACKED) -> dict:
        """Compute (or fetch) one method's scores and show them (``allocate`` follows)."""
        entry = self._entry(state)
        flag = state.new_job("profile")
        spec = st.ScoreSpec(method, probes, closed_form)
        score, cached = st.profile(entry, spec, st.cancellable(flag, reporter(progress)))
        state.scores[spec.method] = score
        return {self.ui.sensitivity.profile_md: profile_text(score, cached),
                **self._method_choices(state, shown=spec.method)}

    @readable_errors
    def view(self, state, view_method, view_kind, projection, log_view, probes,
             closed_form) -> dict:
        """Redraw the heatmap for the chosen view."""
        return self._heatmap(state, self._entry(state), view_method, view_kind, projection,
                             log_view, probes, closed_form)

    @readable_errors
    def compare(self, state, compare_a, compare_b, probes, closed_form, log_view,
                progress=TRACKED) -> dict:
        """Two methods side by side with their rank correlation (computes what is missing)."""
        from mopeq.app import figures as plots

        entry = self._entry(state)
        report = st.cancellable(state.new_job("profile"), reporter(progress))
        a, b = (self._scores(state, entry, m, probes, closed_form, report)
                for m in (compare_a, compare_b))
        fig = plots.compare_heatmaps(a.scores, b.scores, names=(a.method, b.method),
                                     layer_labels=entry.layout.moe_layers, log=log_view)
        return {self.ui.results.compare_plot: fig, **self._method_choices(state)}

    # -- allocation (live)

    @readable_errors
    def allocate(self, state, score_source, alloc_method, clusters, bits, scope, log_scores,
                 target_bits, uniform_bits, group_size, base_bits, snap, seed, probes,
                 closed_form, view_method, view_kind, projection, log_view,
                 preview_drawn: str = "") -> dict:
        """Live: bits, clusters, memory, badge, Pareto and the heatmap's bits.

        ``preview_drawn``: what the page drew itself at its last clusters move (``"C name
        ..."``, ``wiring.CHARTS_JS``); those outputs are not sent again.
        """
        if state.key is None:  # the first load failed: nothing to allocate for
            return self._skipped(ALLOC_OUT)
        entry = self._entry(state)
        settings = settings_of(alloc_method, clusters, bits, scope, log_scores, target_bits,
                               uniform_bits, group_size, base_bits, snap, seed)
        score = self._scores(state, entry, settings.score_method(score_source), probes,
                             closed_form)
        judge = self._scores(state, entry, view.judge_method(score_source, settings.method),
                             probes, closed_form)
        alloc = state.allocation = st.allocate(entry, score, settings, judge=judge)
        return {**page.alloc_outputs(self.ui, state, entry, alloc, score, judge, settings,
                                     preview_drawn),
                **self._heatmap(state, entry, view_method, view_kind, projection, log_view,
                                probes, closed_form)}

    # -- quantize, runs, export, report

    @readable_errors
    def quantize(self, state, score_source, alloc_method, clusters, bits, scope, log_scores,
                 target_bits, uniform_bits, group_size, base_bits, snap, seed, probes,
                 closed_form, mode, pairs, quant_seed, tradeoff_y, progress=TRACKED) -> dict:
        """Quantize with the current map, evaluate, and add the run to the session."""
        entry = self._entry(state)
        settings = settings_of(alloc_method, clusters, bits, scope, log_scores, target_bits,
                               uniform_bits, group_size, base_bits, snap, seed)
        score = self._scores(state, entry, settings.score_method(score_source), probes,
                             closed_form)
        alloc = st.allocate(entry, score, settings, with_pareto=False)
        group = tables.run_group({"method": settings.method, "scores": score.method})
        label = f"#{len(state.runs) + 1} {group} {alloc.bitmap.avg_bits:.2f}b"
        flag = state.new_job("quantize")
        run_seed = int(quant_seed or 0) if mode == "tuned" else 0
        started = time.perf_counter()
        run = st.quantize_evaluate(entry, alloc, settings, mode, pairs, label,
                                   st.cancellable(flag, reporter(progress)), seed=run_seed,
                                   scores=score)
        self.run_seconds = [*self.run_seconds[-4:], time.perf_counter() - started]
        summary = tables.run_summary(run, pairs)
        state.last_run = run
        state.runs.append(summary)
        seeded = f" · seed {run_seed}" if mode == "tuned" else ""
        q = self.ui.quantize
        return {q.run_md: run_text(summary) + seeded,
                q.category_df: view.readable(tables.category_table(run), "{:.1f}"),
                q.results_plot: _results_figure(summary, run.label),
                self.ui.saved_runs: page.saved_runs(state, entry.loaded.fingerprint),
                **self._runs_views(state, entry, tradeoff_y)}

    def queue_note(self) -> str:
        """Before a quantization joins the queue: whether it waits, and why."""
        ahead = self.queued()
        typical = sum(self.run_seconds) / len(self.run_seconds) if self.run_seconds else None
        return view.queue_text(ahead, typical)

    @readable_errors
    def tradeoff(self, state, tradeoff_y) -> dict:
        """Redraw the runs scatter (the y axis changed)."""
        return self._runs_views(state, self._entry(state), tradeoff_y) if state.key else {}

    @readable_errors
    def export(self, state, score_source, probes, closed_form, progress=PROGRESS) -> dict:
        """Write the downloads into a fresh temporary folder."""
        entry = self._entry(state)
        progress(0.2, desc="writing files")
        score = self._scores(state, entry, score_source, probes, closed_form)
        bits = None if state.allocation is None else state.allocation.bitmap.bits.tolist()
        files = st.export(entry, score, bits, state.last_run, state.export_folder())
        note = EXPORTED.format(label=state.last_run.label) if state.last_run else SCORES_ONLY
        return {self.ui.export.files: files, self.ui.export.export_md: note}

    @readable_errors
    def report(self, state, report_quick, progress=TRACKED) -> dict:
        """Rank the sensitivity methods against ``measured`` (quick: ``report.QUICK``)."""
        from mopeq.sensitivity.report import QUICK, ReportConfig

        entry = self._entry(state)
        flag = state.new_job("report")
        report = st.report(entry, QUICK if report_quick else ReportConfig(),
                           on_progress=st.cancellable(flag, reporter(progress)))
        return {self.ui.report.report_md: tables.report_summary(report),
                self.ui.report.report_df: view.readable(tables.report_table(report), "{:.3g}")}


def _results_figure(summary: dict, label: str):
    """Baseline vs quantized per category, with 95 % intervals."""
    from mopeq.app import figures as plots

    comparison = summary["comparison"]
    bars = {"baseline": {c: r["baseline"] for c, r in comparison.items()},
            label: summary["per_category"]}
    cis = {"baseline": {c: r["baseline_ci95"] for c, r in comparison.items()},
           label: {c: r["quantized_ci95"] for c, r in comparison.items()}}
    return plots.results_bars(bars, title="MME per category (95 % CI)", intervals=cis)
