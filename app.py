"""mopeq Gradio app (Hugging Face Spaces entry point): wiring only, no numerics.

The page walks the MoPEQ flow: load a model, see per-expert sensitivity (layers x experts),
tune the bit allocation while the bits, memory estimate and Pareto view follow every change,
quantize and evaluate on a quick MME subset, and export. On start the embedded model is loaded
and its paper-faithful (``frobenius``, exact) heatmap, default allocation and memory estimate
are drawn without a click.

The main steps are also public, stateless API endpoints keyed by the model source, for
``gradio_client`` scripts and notebooks: ``/load_model``, ``/profile``, ``/allocate`` and
``/quantize_evaluate`` (see ``API_EXAMPLE``). Figures come from ``mopeq.app.figures``; everything
else from ``mopeq.app.state`` and the library. Run locally with ``python app.py``.
"""

import functools
import logging
import time
from types import SimpleNamespace

import gradio as gr

from mopeq.app import page, view
from mopeq.app import state as st
from mopeq.app.api import (
    Api,
    layout_text,
    profile_text,
    run_text,
)
from mopeq.core.methods import RECOMMENDED as RECOMMENDED_METHOD

LOG = logging.getLogger("mopeq.app")
BIT_CHOICES = [2, 3, 4, 8]
VIEWS = [("score", "score"), ("standard error", "stderr"),
         ("routing frequency / coverage", "tokens"), ("assigned bits", "bits")]
PROJECTIONS = ["total", "gate", "up", "down"]
EXAMPLES = [["embedded"], ["allenai/OLMoE-1B-7B-0924"], ["Qwen/Qwen3-VL-30B-A3B-Instruct"]]
API_EXAMPLE = """```python
from gradio_client import Client

client = Client("http://127.0.0.1:7860/")  # or the Space id, e.g. "user/mopeq"
layout = client.predict(source="embedded", api_name="/load_model")
scores = client.predict(source="embedded", method="frobenius", closed_form=True,
                        api_name="/profile")
alloc = client.predict(source="embedded", method="kmeans", clusters=3, bits=[2, 3, 4],
                       api_name="/allocate")
print(alloc["avg_bits"], alloc["memory"]["total_bytes"], alloc["deployable_fused"])
run = client.predict(source="embedded", clusters=3, bits=[2, 3, 4], mode="rtn", pairs=20,
                     api_name="/quantize_evaluate")
print(run["score"], run["baseline_score"], run["per_category"])
```"""
# gradio passes per-call trackers through these defaults (it keys them by event, not instance)
PROGRESS, TRACKED = gr.Progress(), gr.Progress(track_tqdm=True)
TRUST_WARNING = ("trust_remote_code is on: loading will run Python code from the model's "
                 "repository on this machine. Only do this for authors you trust.")


# ------------------------------------------------------------------------ error handling


def readable_errors(fn):
    """Turn library errors into ``gr.Error`` messages on the page (never a stack trace)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except st.Cancelled:
            raise gr.Error("Cancelled.", title="Cancelled", print_exception=False) from None
        except ValueError as exc:  # ModelLoadError, NotMoEError and bad settings are ValueErrors
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - shown to the user, logged for the developer
            LOG.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"Unexpected {type(exc).__name__}: {exc}",
                           print_exception=False) from None

    return wrapper


def _reporter(progress: gr.Progress):
    """Adapt ``gr.Progress`` to the library's ``on_progress(fraction, message)``."""
    return lambda fraction, message: progress(fraction, desc=message)


# ------------------------------------------------------------------------ page events


class Handlers:
    """The page's events: read widget values (a dict), update the session, return updates."""

    def __init__(self, models: st.ModelCache, w: SimpleNamespace):
        self.models, self.w = models, w
        self.queued = lambda: None  # quantizations in gradio's queue (build_demo sets it)
        self.run_seconds: list[float] = []  # recent quantize durations, for the queue note

    # -- helpers

    def _entry(self, state: st.SessionState) -> st.ModelEntry:
        if state.key is None:
            raise gr.Error("Load a model first.", print_exception=False)
        return self.models.get(*state.key)

    def _settings(self, v: dict) -> st.AllocSettings:
        w = self.w
        return st.AllocSettings.of(v[w.alloc_method], v[w.clusters], v[w.bits], v[w.scope],
                                   v[w.log_scores], v[w.target_bits], v[w.uniform_bits],
                                   v[w.group_size], v[w.base_bits], v[w.snap], v[w.seed])

    def _scores(self, state, entry, method: str, v: dict, on_progress=st._noop):
        """The session's scores for ``method``, computed (with the page's probes) if missing."""
        if method not in state.scores:
            spec = st.ScoreSpec(method, v.get(self.w.probes, 0), v.get(self.w.closed_form, True))
            state.scores[method], _ = st.scores(entry, spec, on_progress)
        return state.scores[method]

    def _method_choices(self, state, view: str | None = None) -> dict:
        """Dropdown updates listing the methods this session has computed.

        ``view``: a method just computed; the heatmap shows it and the allocation uses it.
        """
        w, names = self.w, list(state.scores)
        chosen = {"value": view} if view else {}
        return {w.score_source: gr.update(choices=names, **chosen),
                w.view_method: gr.update(choices=names, **chosen)}

    def _alloc_updates(self, state, entry, v: dict) -> dict:
        w, settings = self.w, self._settings(v)
        score = self._scores(state, entry, settings.score_method(v[w.score_source]), v)
        judge = self._scores(state, entry, view.judge_method(v[w.score_source],
                                                             settings.method), v)
        alloc = state.allocation = st.allocation(entry, score, settings, judge=judge)
        return page.alloc_outputs(w, state, entry, alloc, score, judge, settings)

    def _view_updates(self, state, entry, v: dict) -> dict:
        w = self.w
        args = (v[w.view_method], v[w.view_kind], v[w.projection], v[w.log_view])
        score = self._scores(state, entry, args[0], v)
        bits = None if state.allocation is None else state.allocation.bitmap.bits
        key = (*args, score.scores, bits)
        return {w.heatmap: page.heatmap_output(
            state, key, lambda: self._view_figure(state, entry, *args, v))}

    def _view_figure(self, state, entry, method, kind, projection, log, v):
        from mopeq.app import figures as plots

        score = self._scores(state, entry, method, v)
        bits = None if state.allocation is None else state.allocation.bitmap.bits
        labels = entry.layout.moe_layers
        if kind == "bits" and bits is not None:
            return plots.bits_heatmap(bits, layer_labels=labels, scores=score.scores)
        if kind == "tokens":
            routed = score if score.tokens is not None else self._scores(state, entry,
                                                                         "frequency", v)
            cover = routed.meta.get("coverage")
            return plots.sensitivity_heatmap(
                routed.tokens, title=f"Routing: top-k assignments per expert — {cover:.0%} "
                "of experts get tokens", layer_labels=labels, bits=bits, log=log,
                colorbar_title="tokens")
        if kind == "stderr" and score.stderr is not None:
            return plots.sensitivity_heatmap(score.stderr, title=f"{method}: standard error",
                                             layer_labels=labels, bits=bits, log=log,
                                             colorbar_title="stderr")
        if kind == "stderr":
            gr.Info(f"{method} has no standard error here (exact or counted); showing scores.")
        values = score.scores if projection == "total" else score.per_projection[projection]
        name = method if projection == "total" else f"{method} ({projection})"
        return plots.sensitivity_heatmap(
            values, title=f"Sensitivity: {name}", layer_labels=labels, bits=bits, log=log,
            stderr=score.stderr if projection == "total" else None, colorbar_title=name)

    # -- events

    @readable_errors
    def load(self, v: dict, progress=PROGRESS) -> dict:
        """Load the model and its paper-faithful scores (``allocate`` follows; the first view).

        An empty box or a failed load leaves the active model in place and says so (the
        textbox goes back to the active model's source).
        """
        w, state = self.w, v[self.w.state]
        typed = (v[w.source] or "").strip()
        if not typed:
            return self._not_loaded(state, view.empty_source_text(self._active(state)))
        progress(0.1, desc=f"loading {typed}")
        key = self.models.key(typed, v[w.trust])
        try:
            entry = self.models.get(*key)
        except ValueError as exc:  # ModelLoadError, NotMoEError: the previous model stays
            return self._not_loaded(state, view.load_failed_text(typed, str(exc),
                                                                 self._active(state)))
        state.use_model(key)
        score, cached = st.scores(entry, st.ScoreSpec("frobenius", closed_form=True))
        state.scores["frobenius"] = score  # the paper's score, whatever was shown before
        info = st.layout_summary(entry)
        names = list(state.scores)
        restored = page.restore_runs(state, v[w.saved_runs], entry.loaded.fingerprint)
        return {w.layout_md: view.ACTIVE + layout_text(info),
                w.params_df: st.layout_table(info), w.profile_md: profile_text(score, cached),
                w.score_source: gr.update(choices=names, value="frobenius"),
                w.view_method: gr.update(choices=names, value="frobenius"), w.source: key[0],
                **(self._runs_views(state, entry, v) if restored else
                   {w.tradeoff_plot: gr.skip(), w.runs_df: gr.skip()})}

    def _active(self, state) -> str | None:
        return None if state.key is None else state.key[0]

    def _not_loaded(self, state, message: str) -> dict:
        """Outputs of a load that did not happen: the note, the active model's layout."""
        w = self.w
        gr.Warning(message.split("\n")[0].replace("*", "").replace("`", "'"))
        active = ("" if state.key is None else
                  "\n\n" + layout_text(st.layout_summary(self.models.get(*state.key))))
        outputs = {c: gr.skip() for c in _outputs(w, *LOAD_OUT)}
        return {**outputs, w.layout_md: message + active,
                w.source: self._active(state) or gr.skip()}

    def _runs_views(self, state, entry, v: dict) -> dict:
        bf16_gb = sum(st.bf16_breakdown(entry).values()) / 1e9
        return page.runs_outputs(self.w, state, page.unit(entry), v[self.w.tradeoff_y],
                                 bf16_gb)

    @readable_errors
    def profile(self, v: dict, progress=TRACKED) -> dict:
        """Compute (or fetch) one method's scores and show them (``allocate`` follows)."""
        w, state = self.w, v[self.w.state]
        entry = self._entry(state)
        flag = state.new_job("profile")
        spec = st.ScoreSpec(v[w.method], v[w.probes], v[w.closed_form])
        score, cached = st.scores(entry, spec, st.cancellable(flag, _reporter(progress)))
        state.scores[spec.method] = score
        return {w.profile_md: profile_text(score, cached),
                **self._method_choices(state, view=spec.method)}

    @readable_errors
    def allocate(self, v: dict) -> dict:
        """Live: bits, clusters, memory, badge, Pareto and the heatmap's bits."""
        state = v[self.w.state]
        if state.key is None:  # the first load failed: nothing to allocate for
            return {c: gr.skip() for c in _outputs(self.w, *ALLOC_OUT)}
        entry = self._entry(state)
        return {**self._alloc_updates(state, entry, v), **self._view_updates(state, entry, v)}

    @readable_errors
    def view(self, v: dict) -> dict:
        """Redraw the heatmap for the chosen view."""
        state = v[self.w.state]
        return self._view_updates(state, self._entry(state), v)

    @readable_errors
    def compare(self, v: dict, progress=TRACKED) -> dict:
        """Two methods side by side with their rank correlation (computes what is missing)."""
        from mopeq.app import figures as plots

        w, state = self.w, v[self.w.state]
        entry = self._entry(state)
        flag = state.new_job("profile")
        report = st.cancellable(flag, _reporter(progress))
        a, b = (self._scores(state, entry, v[c], v, report) for c in (w.compare_a, w.compare_b))
        fig = plots.compare_heatmaps(a.scores, b.scores, names=(a.method, b.method),
                                     layer_labels=entry.layout.moe_layers, log=v[w.log_view])
        return {w.compare_plot: fig, **self._method_choices(state)}

    @readable_errors
    def quantize(self, v: dict, progress=TRACKED) -> dict:
        """Quantize with the current map, evaluate, and add the run to the session."""
        from mopeq.app import figures as plots

        w, state = self.w, v[self.w.state]
        entry, settings = self._entry(state), self._settings(v)
        score = self._scores(state, entry, settings.score_method(v[w.score_source]), v)
        alloc = st.allocation(entry, score, settings, with_pareto=False)
        group = st.run_group({"method": settings.method, "scores": score.method})
        label = f"#{len(state.runs) + 1} {group} {alloc.bitmap.avg_bits:.2f}b"
        flag = state.new_job("quantize")
        seed = int(v[w.quant_seed] or 0) if v[w.mode] == "tuned" else 0
        started = time.perf_counter()
        run = st.quantize_evaluate(entry, alloc, settings, v[w.mode], v[w.pairs], label,
                                   st.cancellable(flag, _reporter(progress)), seed=seed,
                                   scores=score)
        self.run_seconds = [*self.run_seconds[-4:], time.perf_counter() - started]
        summary = st.run_summary(run, v[w.pairs])
        state.last_run = run
        state.runs.append(summary)
        bars = {"baseline": {c: r["baseline"] for c, r in summary["comparison"].items()},
                run.label: summary["per_category"]}
        cis = {"baseline": {c: r["baseline_ci95"] for c, r in summary["comparison"].items()},
               run.label: {c: r["quantized_ci95"] for c, r in summary["comparison"].items()}}
        seeded = f" · seed {seed}" if v[w.mode] == "tuned" else ""
        return {w.run_md: run_text(summary) + seeded,
                w.category_df: view.readable(st.category_table(run), "{:.1f}"),
                w.results_plot: plots.results_bars(bars, title="MME per category (95 % CI)",
                                                   intervals=cis),
                w.saved_runs: page.saved_runs(state, entry.loaded.fingerprint),
                **self._runs_views(state, entry, v)}

    def queue_note(self, v: dict) -> str:
        """Before a quantization joins the queue: whether it waits, and why."""
        ahead = self.queued()
        typical = sum(self.run_seconds) / len(self.run_seconds) if self.run_seconds else None
        return view.queue_text(ahead, typical)

    @readable_errors
    def tradeoff(self, v: dict) -> dict:
        """Redraw the runs scatter (the y axis changed)."""
        state = v[self.w.state]
        return self._runs_views(state, self._entry(state), v) if state.key else {}

    @readable_errors
    def export(self, v: dict, progress=PROGRESS) -> dict:
        """Write the downloads into a fresh temporary folder."""
        w, state = self.w, v[self.w.state]
        entry = self._entry(state)
        progress(0.2, desc="writing files")
        score = self._scores(state, entry, v[w.score_source], v)
        bits = None if state.allocation is None else state.allocation.bitmap.bits.tolist()
        files = st.export_files(entry, score, bits, state.last_run, state.export_folder())
        note = ("Recipe, scores, engine snippets and checkpoint, all of run "
                f"**{state.last_run.label}**." if state.last_run else
                "Scores only: quantize first to export the recipe, snippets and checkpoint.")
        return {w.files: files, w.export_md: note}

    @readable_errors
    def report(self, v: dict, progress=TRACKED) -> dict:
        """Rank every sensitivity method against ``measured`` (the sensitivity report)."""
        w, state = self.w, v[self.w.state]
        entry = self._entry(state)
        flag = state.new_job("report")
        report = st.sensitivity_quality(entry, on_progress=st.cancellable(
            flag, _reporter(progress)))
        return {w.report_md: st.report_summary(report),
                w.report_df: view.readable(st.report_table(report), "{:.3g}")}

    @staticmethod
    def cancel(kind: str):
        """A handler that flags the session's running job of ``kind``."""
        def handler(state: st.SessionState) -> None:
            if state.cancel(kind):
                gr.Info(f"Cancelling the {kind} job…")

        return handler

    @staticmethod
    def warn_trust(trust: bool) -> None:
        """Warn when ``trust_remote_code`` is ticked."""
        if trust:
            gr.Warning(TRUST_WARNING)

    def score_controls(self, method: str, closed_form: bool) -> dict:
        """Show probes and the closed form only for the methods that use them."""
        shown = view.score_controls(method, closed_form)
        return {**page.controls(shown, self.w),
                self.w.probes: gr.update(visible=shown["probes"],
                                         value=100 if method == "frobenius" else 64)}

    def method_controls(self, method: str) -> dict:
        """Show the controls the allocation method uses."""
        return page.controls(view.alloc_controls(method), self.w)

    @staticmethod
    def target_range(bits: list, target: float) -> dict:
        """Bound the budget slider by what the bit set can reach."""
        lo, hi = view.target_bounds(bits)
        return gr.update(minimum=lo, maximum=hi, value=min(max(float(target), lo), hi))

    @staticmethod
    def mode_controls(mode: str) -> dict:
        """The seed applies to tuned runs only."""
        return gr.update(visible=mode == "tuned")


# ------------------------------------------------------------------------ layout


def _model_row(w: SimpleNamespace) -> None:
    with gr.Row():
        w.source = gr.Textbox(value=st.EMBEDDED, label="Model", scale=5, elem_id="source",
                              info="'embedded' (the tiny MoE VLM shipped here), a local folder "
                                   "or a Hugging Face hub id")
        w.trust = gr.Checkbox(value=False, label="trust_remote_code", scale=2,
                              info="⚠ runs the model repository's Python code")
        with gr.Column(scale=1, min_width=80):
            w.load_btn = gr.Button("Load", variant="primary")
    with gr.Row(equal_height=True):
        w.layout_md = gr.Markdown("Loading the embedded model…", elem_id="layout-text")
    with gr.Accordion("Parameters by component · other models", open=False):
        w.params_df = gr.Dataframe(headers=["component", "parameters", "share"],
                                   interactive=False)
        gr.Examples(EXAMPLES, inputs=[w.source], cache_examples=False,
                    label="Examples (hub models need a network and their RAM)")


def _sensitivity_panel(w: SimpleNamespace, methods) -> None:
    gr.Markdown("## 1 · Sensitivity")
    with gr.Row(equal_height=True):
        w.method = gr.Dropdown(list(methods), value="frobenius", label="Method", min_width=120,
                               elem_id="method",
                               info=f"frobenius: the paper's data-free baseline; "
                                    f"{RECOMMENDED_METHOD}: the best data-aware ranking")
        w.probes = gr.Slider(2, 256, value=100, step=1, label="Probes", visible=False,
                             elem_id="probes")
        w.closed_form = gr.Checkbox(value=True, label="frobenius: exact closed form",
                                    elem_id="closed-form")
        with gr.Column(min_width=120):
            w.profile_btn = gr.Button("Compute", variant="primary", size="md",
                                      elem_id="profile-btn")
            w.profile_cancel = gr.Button("Cancel", variant="stop", size="md")
    w.profile_md = gr.Markdown(elem_id="profile-status")
    w.heatmap = gr.Plot(label="Layers × experts", elem_id="heatmap")
    with gr.Row(equal_height=True):
        w.view_method = gr.Dropdown(["frobenius"], value="frobenius", label="Show scores of",
                                    min_width=120)
        w.view_kind = gr.Dropdown(VIEWS, value="score", label="View", min_width=120,
                                  elem_id="view-kind")
        w.projection = gr.Dropdown(PROJECTIONS, value="total", label="Projection",
                                   min_width=100)
        w.log_view = gr.Checkbox(value=False, label="Log colour scale", min_width=100)


def _allocation_panel(w: SimpleNamespace, methods) -> None:
    gr.Markdown("## 2 · Allocate bits (updates live)")
    w.memory_md = gr.Markdown(elem_id="memory-text")
    w.deploy_md = gr.Markdown(elem_id="deploy-badge")
    with gr.Row():
        w.score_source = gr.Dropdown(["frobenius"], value="frobenius", label="Scores",
                                     min_width=120, elem_id="score-source")
        w.alloc_method = gr.Dropdown(list(methods), value="kmeans", label="Allocation",
                                     min_width=120, elem_id="alloc-method")
        w.snap = gr.Dropdown(["none", "mean", "max", "min"], value="none", min_width=120,
                             label="Snap per layer", elem_id="snap")
    with gr.Row():
        w.clusters = gr.Slider(1, 8, value=3, step=1, label="Clusters C", elem_id="clusters")
        w.target_bits = gr.Slider(2.0, 4.0, value=3.0, step=0.05, visible=False,
                                  label="Target average bits (budget)", elem_id="target-bits")
        w.uniform_bits = gr.Dropdown(BIT_CHOICES, value=4, visible=False, label="Uniform bits")
        w.bits = gr.CheckboxGroup(BIT_CHOICES, value=[2, 3, 4], label="Bit widths",
                                  elem_id="bits")
    with gr.Row(equal_height=True):
        w.scope = gr.Radio([("model-wise", "model"), ("layer-wise", "layer")], value="model",
                           label="Scope")
        w.log_scores = gr.Checkbox(value=False, label="Cluster log-scores")
    with gr.Row():
        w.group_size = gr.Dropdown([32, 64, 128], value=128, label="Group size", min_width=80)
        w.base_bits = gr.Dropdown([2, 3, 4, 8, 16], value=4, label="Base bits (non-expert)",
                                  min_width=80, elem_id="base-bits")
        w.seed = gr.Number(value=0, precision=0, label="Seed", min_width=80, elem_id="seed")


def _allocation_results(w: SimpleNamespace) -> None:
    with gr.Row():
        w.memory_plot = gr.Plot(label="Memory by component", elem_id="memory-plot")
        w.bits_plot = gr.Plot(label="Assigned bits", elem_id="bits-plot")
    with gr.Row():
        w.pareto_plot = gr.Plot(label="Memory vs predicted loss", elem_id="pareto-plot")
        w.clusters_df = gr.Dataframe(headers=list(st.CLUSTER_COLUMNS), label="Clusters",
                                     interactive=False, elem_id="clusters-table")
    with gr.Accordion("Compare two methods (rank correlation)", open=False):
        with gr.Row(equal_height=True):
            w.compare_a = gr.Dropdown(list(st.SCORE_METHODS), value="frobenius", label="Left")
            w.compare_b = gr.Dropdown(list(st.SCORE_METHODS), value="frequency", label="Right")
            w.compare_btn = gr.Button("Compare")
        w.compare_plot = gr.Plot(label="Side by side", elem_id="compare-plot")


def _quantize_panel(w: SimpleNamespace) -> None:
    gr.Markdown("## 3 · Quantize and evaluate")
    with gr.Row(equal_height=True):
        w.mode = gr.Radio([("RTN (data-free)", "rtn"), ("tuned (SignRound)", "tuned")],
                          value="rtn", label="Mode", elem_id="mode")
        w.pairs = gr.Slider(10, 200, value=50, step=10, label="MME image pairs",
                            elem_id="pairs")
        w.quant_seed = gr.Number(value=0, precision=0, label="Seed (tuned)", min_width=80,
                                 visible=False, elem_id="quant-seed")
        with gr.Column(min_width=160):
            w.quantize_btn = gr.Button("Quantize + evaluate", variant="primary",
                                       elem_id="quantize-btn")
            w.quantize_cancel = gr.Button("Cancel", variant="stop")
    w.run_md = gr.Markdown(elem_id="run-text")
    with gr.Row():
        w.category_df = gr.Dataframe(headers=["category", "baseline", "quantized", "delta"],
                                     label="Per category", interactive=False,
                                     elem_id="category-table")
        w.results_plot = gr.Plot(label="Baseline vs quantized", elem_id="results-plot")
    with gr.Row():
        with gr.Column():
            w.tradeoff_plot = gr.Plot(label="Your runs: memory vs score",
                                      elem_id="tradeoff-plot")
            w.tradeoff_y = gr.Radio([("MME score", "score"), ("KL to the baseline", "kl")],
                                    value="score", label="y axis", elem_id="tradeoff-y")
        w.runs_df = gr.Dataframe(headers=list(st.RUN_COLUMNS), interactive=False,
                                 label="Your runs (kept in this browser)", elem_id="runs-table")


def _report_panel(w: SimpleNamespace) -> None:
    with gr.Accordion("Sensitivity quality: which score predicts quantization damage?",
                      open=False):
        gr.Markdown("Every method against `measured` (each expert alone RTN-quantized, the "
                    "answer KL it causes): Spearman with a 95 % bootstrap interval, "
                    "reliability, wall time, and the answer KL of the budget allocation each "
                    "method drives. Takes minutes (cached methods come back at once).")
        w.report_btn = gr.Button("Run the sensitivity report", elem_id="report-btn")
        w.report_md = gr.Markdown(elem_id="report-text")
        w.report_df = gr.Dataframe(interactive=False, elem_id="report-table")


def _export_panel(w: SimpleNamespace) -> None:
    gr.Markdown("## 4 · Export")
    with gr.Row(equal_height=True):
        w.export_btn = gr.Button("Export recipe, scores, snippets, checkpoint",
                                 elem_id="export-btn")
        w.export_md = gr.Markdown(elem_id="export-text")
    w.files = gr.File(label="Downloads", file_count="multiple", interactive=False,
                      elem_id="downloads")
    with gr.Accordion("Use the API (gradio_client)", open=False):
        gr.Markdown(API_EXAMPLE)


def build_layout(w: SimpleNamespace) -> None:
    """Place every component (inside a ``gr.Blocks`` context)."""
    gr.Markdown("# mopeq · per-expert mixed-precision quantization of MoE models\n"
                "See which experts are sensitive, pick bits per expert while the memory "
                "follows, quantize, and check accuracy on a quick MME subset "
                "([MoPEQ](https://arxiv.org/abs/2509.02512)).")
    w.state = gr.State(st.SessionState(), delete_callback=st.SessionState.close)
    w.saved_runs = gr.BrowserState({}, storage_key="mopeq-runs")  # runs survive a reload
    _model_row(w)
    with gr.Row():
        with gr.Column(scale=3):
            _sensitivity_panel(w, st.SCORE_METHODS)
        with gr.Column(scale=2):
            _allocation_panel(w, st.ALLOC_METHODS)
    _allocation_results(w)
    _report_panel(w)
    _quantize_panel(w)
    _export_panel(w)


# ------------------------------------------------------------------------ wiring


def _outputs(w: SimpleNamespace, *names: str) -> list:
    return [getattr(w, n) for n in names]


ALLOC_OUT = ("bits_plot", "clusters_df", "memory_md", "deploy_md", "memory_plot", "pareto_plot",
             "heatmap")
LOAD_OUT = ("layout_md", "params_df", "profile_md", "score_source", "view_method", "source",
            "tradeoff_plot", "runs_df")
QUANTIZE_OUT = ("run_md", "category_df", "results_plot", "saved_runs", "tradeoff_plot",
                "runs_df")


def _inputs(w: SimpleNamespace) -> set:
    skip = {"load_btn", "profile_btn", "profile_cancel", "compare_btn", "quantize_btn",
            "quantize_cancel", "export_btn", "layout_md", "params_df", "profile_md", "heatmap",
            "bits_plot", "pareto_plot", "clusters_df", "memory_md", "deploy_md", "memory_plot",
            "compare_plot", "run_md", "category_df", "results_plot", "tradeoff_plot", "runs_df",
            "files", "export_md", "report_btn", "report_md", "report_df"}  # outputs and buttons;
    # every control and state is an input
    return {c for n, c in vars(w).items() if n not in skip}


def _private(name: str, group: str | None = None, limit: int = 1, **kw) -> dict:
    """Settings of a page-only event (not callable by API clients)."""
    return dict(api_name=f"page_{name}", api_visibility="private", concurrency_id=group,
                concurrency_limit=limit, **kw)


def wire(demo: gr.Blocks, h: Handlers, w: SimpleNamespace) -> None:
    """Connect the page's events to the handlers.

    Long jobs (load, profile, compare, quantize, export) have their own concurrency groups; the
    live events (allocation, views) share a wide one, so they never queue behind a long job.
    Whatever a long job changes upstream (scores, model) is followed by ``allocate``, which reads
    the controls as they are *then*, not as they were when the job was started.
    """
    inputs, alloc_out = _inputs(w), _outputs(w, *ALLOC_OUT)
    # live outputs never get a progress overlay; a stale live event is dropped (always_last)
    live, hidden = dict(trigger_mode="always_last", show_progress="hidden"), dict(
        show_progress="hidden")
    load_out = _outputs(w, *LOAD_OUT)
    for trigger in (demo.load, w.load_btn.click, w.source.submit):
        trigger(h.load, inputs, load_out, **_private("load", "load", 2, show_progress_on=[
            w.layout_md])).success(h.allocate, inputs, alloc_out, **_private(
                "allocate", "live", 8, **hidden))
    w.trust.change(h.warn_trust, w.trust, None, **_private("trust"))
    for control in (w.method, w.closed_form):
        control.change(h.score_controls, [w.method, w.closed_form], [w.probes, w.closed_form],
                       **_private("score_controls", "live", 8, **live))
    profile = w.profile_btn.click(h.profile, inputs, _outputs(
        w, "profile_md", "score_source", "view_method"), **_private(
        "profile", "profile", 2, show_progress_on=[w.heatmap]))
    profile.success(h.allocate, inputs, alloc_out, **_private("allocate", "live", 8, **hidden))
    compare = w.compare_btn.click(h.compare, inputs, _outputs(
        w, "compare_plot", "score_source", "view_method"), **_private("compare", "profile", 2))
    w.profile_cancel.click(h.cancel("profile"), w.state, None, cancels=[profile, compare],
                           **_private("cancel_profile"))
    for control in (w.score_source, w.alloc_method, w.clusters, w.bits, w.scope, w.log_scores,
                    w.target_bits, w.uniform_bits, w.group_size, w.base_bits, w.snap, w.seed):
        control.change(h.allocate, inputs, alloc_out, **_private("allocate", "live", 8, **live))
    w.alloc_method.change(h.method_controls, w.alloc_method, _outputs(
        w, "clusters", "scope", "log_scores", "target_bits", "uniform_bits", "seed",
        "score_source"), **_private("method", "live", 8, **live))
    w.bits.change(h.target_range, [w.bits, w.target_bits], w.target_bits,
                  **_private("target_range", "live", 8, **live))
    w.mode.change(h.mode_controls, w.mode, w.quant_seed, **_private("mode", "live", 8, **live))
    w.tradeoff_y.change(h.tradeoff, inputs, _outputs(w, "tradeoff_plot", "runs_df"),
                        **_private("tradeoff", "live", 8, **live))
    for control in (w.view_method, w.view_kind, w.projection, w.log_view):
        control.change(h.view, inputs, w.heatmap, **_private("view", "live", 8, **live))
    # one quantization at a time (a free CPU); the note says so to whoever waits
    quantize = w.quantize_btn.click(h.queue_note, inputs, w.run_md, **_private(
        "queue_note", "live", 8, **hidden)).then(h.quantize, inputs, _outputs(
            w, *QUANTIZE_OUT), **_private("quantize", "quantize", 1,
                                          show_progress_on=[w.results_plot]))
    w.quantize_cancel.click(h.cancel("quantize"), w.state, None, cancels=[quantize],
                            **_private("cancel_quantize"))
    w.export_btn.click(h.export, inputs, _outputs(w, "files", "export_md"),
                       **_private("export", "export", 1))
    w.report_btn.click(h.report, inputs, _outputs(w, "report_md", "report_df"),
                       **_private("report", "quantize", 1, show_progress_on=[w.report_md]))


def register_api(api: Api) -> None:
    """The public endpoints (stable names for ``gradio_client``)."""
    gr.api(readable_errors(api.load_model), api_name="load_model", concurrency_id="load",
           concurrency_limit=2)
    gr.api(readable_errors(api.profile), api_name="profile", concurrency_id="profile",
           concurrency_limit=2)
    gr.api(readable_errors(api.allocate), api_name="allocate", concurrency_id="live",
           concurrency_limit=8)
    gr.api(readable_errors(api.quantize_evaluate), api_name="quantize_evaluate",
           concurrency_id="quantize", concurrency_limit=1)


def build_demo(models: st.ModelCache | None = None) -> gr.Blocks:
    """Build the page and its API (cheap: nothing is loaded until a page or a client asks).

    Args:
        models: the shared model cache (default: a new ``ModelCache`` of two models).
    """
    models = models or st.ModelCache()
    w = SimpleNamespace()
    with gr.Blocks(title="mopeq: per-expert quantization of MoE models",
                   delete_cache=(3600, 7200)) as demo:  # served files older than 2 h go
        build_layout(w)
        register_api(Api(models))  # first: the public names are never taken
        handlers = Handlers(models, w)
        handlers.queued = lambda: page.quantize_queue(demo)
        wire(demo, handlers, w)
    return demo


demo = build_demo()

if __name__ == "__main__":
    demo.queue().launch()
