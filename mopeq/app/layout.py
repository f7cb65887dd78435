"""The page's widgets: one small dataclass per section, each built by its own function.

Default values and choices come from ``mopeq.core.defaults`` and the method tables; this module
only adds what is the page's alone (slider ranges, the views of the heatmap). ``Page`` holds the
sections and finds a widget by its name (names are unique across sections): the handlers'
parameter names are widget names, so the wiring reads each event's inputs from its handler.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import gradio as gr

from mopeq.allocation.bitmap import SNAP_RULES
from mopeq.app import state as st
from mopeq.app import tables, text, view
from mopeq.core import defaults, methods

BIT_CHOICES = [2, 3, 4, 8]
BASE_BIT_CHOICES = [2, 3, 4, 8, 16]  # 16: left in bf16
GROUP_SIZES = [32, 64, 128]
SNAPS = [defaults.NO_SNAP, *SNAP_RULES]  # one width per layer for fused-MoE engines
CLUSTER_RANGE = (1, 8)
PROBE_RANGE = (2, 256)
PAIR_RANGE = (10, 200, 10)  # min, max, step of the MME image pairs
VIEWS = [("score", "score"), ("standard error", "stderr"),
         ("routing frequency / coverage", "tokens"), ("assigned bits", "bits")]
PROJECTIONS = ["total", "gate", "up", "down"]
COMPARE_WITH = "frequency"  # the right-hand method of the comparison, against the paper's score
SCOPES = [("model-wise", "model"), ("layer-wise", "layer")]
MODES = [("RTN (data-free)", "rtn"), ("tuned (SignRound)", "tuned")]
TRADEOFF_AXES = [("MME score", "score"), ("KL to the baseline", "kl")]

# the outputs an event updates, by widget name (the handlers skip or fill the same list)
LOAD_OUT = ("layout_md", "params_df", "profile_md", "score_source", "view_method", "source",
            "tradeoff_plot", "runs_df")
ALLOC_OUT = ("bits_plot", "clusters_df", "memory_md", "deploy_md", "memory_plot", "pareto_plot",
             "heatmap", "memory_preview")
QUANTIZE_OUT = ("run_md", "category_df", "results_plot", "saved_runs", "tradeoff_plot",
                "runs_df")


@dataclass(frozen=True, eq=False)
class ModelRow:
    """The model box, its Load button and the layout it found."""

    source: gr.Textbox
    trust: gr.Checkbox
    load_btn: gr.Button
    layout_md: gr.Markdown
    params_df: gr.Dataframe


@dataclass(frozen=True, eq=False)
class SensitivityPanel:
    """Step 1: which sensitivity to compute, and the layers x experts heatmap."""

    method: gr.Dropdown
    probes: gr.Slider
    closed_form: gr.Checkbox
    profile_btn: gr.Button
    profile_cancel: gr.Button
    profile_md: gr.Markdown
    heatmap: gr.Plot
    view_method: gr.Dropdown
    view_kind: gr.Dropdown
    projection: gr.Dropdown
    log_view: gr.Checkbox


@dataclass(frozen=True, eq=False)
class AllocationPanel:
    """Step 2: the allocation controls and the memory they give (live)."""

    memory_md: gr.Markdown
    deploy_md: gr.Markdown
    score_source: gr.Dropdown
    alloc_method: gr.Dropdown
    snap: gr.Dropdown
    clusters: gr.Slider
    target_bits: gr.Slider
    uniform_bits: gr.Dropdown
    bits: gr.CheckboxGroup
    scope: gr.Radio
    log_scores: gr.Checkbox
    group_size: gr.Dropdown
    base_bits: gr.Dropdown
    seed: gr.Number
    memory_preview: gr.JSON  # hidden: the memory text at every clusters value (page.previews)
    preview_drawn: gr.Textbox  # hidden: what the page drew itself at a clusters move (CHARTS_JS)


@dataclass(frozen=True, eq=False)
class AllocationResults:
    """The allocation's figures and the two-method comparison."""

    memory_plot: gr.Plot
    bits_plot: gr.Plot
    pareto_plot: gr.Plot
    clusters_df: gr.Dataframe
    compare_a: gr.Dropdown
    compare_b: gr.Dropdown
    compare_btn: gr.Button
    compare_plot: gr.Plot


@dataclass(frozen=True, eq=False)
class ReportPanel:
    """The sensitivity report (every method against ``measured``)."""

    report_quick: gr.Checkbox
    report_btn: gr.Button
    report_md: gr.Markdown
    report_df: gr.Dataframe


@dataclass(frozen=True, eq=False)
class QuantizePanel:
    """Step 3: quantize + evaluate, its results and this session's runs."""

    mode: gr.Radio
    pairs: gr.Slider
    quant_seed: gr.Number
    quantize_btn: gr.Button
    quantize_cancel: gr.Button
    run_md: gr.Markdown
    category_df: gr.Dataframe
    results_plot: gr.Plot
    tradeoff_plot: gr.Plot
    tradeoff_y: gr.Radio
    runs_df: gr.Dataframe


@dataclass(frozen=True, eq=False)
class ExportPanel:
    """Step 4: the downloads."""

    export_btn: gr.Button
    export_md: gr.Markdown
    files: gr.File


SECTIONS = ("model", "sensitivity", "allocation", "results", "report", "quantize", "export")


@dataclass(frozen=True, eq=False)
class Page:
    """Every widget of the page, by section, plus the session and the browser's saved runs."""

    state: gr.State
    saved_runs: gr.BrowserState
    model: ModelRow
    sensitivity: SensitivityPanel
    allocation: AllocationPanel
    results: AllocationResults
    report: ReportPanel
    quantize: QuantizePanel
    export: ExportPanel

    def widgets(self) -> dict[str, gr.components.Component]:
        """Every widget by its (unique) name, sections flattened (a fresh dict)."""
        return dict(self._by_name)

    @functools.cached_property
    def _by_name(self) -> dict[str, gr.components.Component]:
        found = {"state": self.state, "saved_runs": self.saved_runs}
        for section in (getattr(self, s) for s in SECTIONS):
            named = {f.name: getattr(section, f.name) for f in fields(section)}
            if set(named) & set(found):
                raise ValueError(f"widget names used twice: {sorted(set(named) & set(found))}")
            found.update(named)
        return found

    def pick(self, *names: str) -> list:
        """The widgets named ``names``, in that order."""
        return [self._by_name[n] for n in names]


# ------------------------------------------------------------------------ sections


def model_row() -> ModelRow:
    """The model box, Load, the layout text and the parameters table (with examples)."""
    with gr.Row():
        source = gr.Textbox(value=st.EMBEDDED, label="Model", scale=5, elem_id="source",
                            info=text.SOURCE_INFO)
        trust = gr.Checkbox(value=False, label="trust_remote_code", scale=2,
                            info=text.TRUST_INFO)
        with gr.Column(scale=1, min_width=80):
            load_btn = gr.Button("Load", variant="primary")
    with gr.Row(equal_height=True):
        layout_md = gr.Markdown(text.LOADING, elem_id="layout-text")
    with gr.Accordion("Parameters by component · other models", open=False):
        params_df = gr.Dataframe(headers=["component", "parameters", "share"],
                                 interactive=False)
        gr.Examples(text.EXAMPLES, inputs=[source], cache_examples=False,
                    label=text.EXAMPLES_LABEL)
    return ModelRow(source, trust, load_btn, layout_md, params_df)


def _method_row() -> tuple:
    with gr.Row(equal_height=True):
        method = gr.Dropdown(list(methods.NAMES), value=defaults.SCORE_METHOD, label="Method",
                             min_width=120, elem_id="method",
                             info=text.method_info(methods.RECOMMENDED))
        probes = gr.Slider(*PROBE_RANGE, value=methods.DEFAULT_PROBES[defaults.SCORE_METHOD],
                           step=1, label="Probes", visible=False, elem_id="probes")
        closed_form = gr.Checkbox(value=True, label="frobenius: exact closed form",
                                  elem_id="closed-form")
        with gr.Column(min_width=120):
            profile_btn = gr.Button("Compute", variant="primary", size="md",
                                    elem_id="profile-btn")
            profile_cancel = gr.Button("Cancel", variant="stop", size="md")
    return method, probes, closed_form, profile_btn, profile_cancel


def _view_row() -> tuple:
    with gr.Row(equal_height=True):
        view_method = gr.Dropdown([defaults.SCORE_METHOD], value=defaults.SCORE_METHOD,
                                  label="Show scores of", min_width=120)
        view_kind = gr.Dropdown(VIEWS, value=VIEWS[0][1], label="View", min_width=120,
                                elem_id="view-kind")
        projection = gr.Dropdown(PROJECTIONS, value=PROJECTIONS[0], label="Projection",
                                 min_width=100)
        log_view = gr.Checkbox(value=False, label="Log colour scale", min_width=100)
    return view_method, view_kind, projection, log_view


def sensitivity_panel() -> SensitivityPanel:
    """Step 1: the method, its probes, Compute / Cancel, the heatmap and what it shows."""
    gr.Markdown(text.SENSITIVITY)
    controls = _method_row()
    profile_md = gr.Markdown(elem_id="profile-status")
    heatmap = gr.Plot(label="Layers × experts", elem_id="heatmap")
    return SensitivityPanel(*controls, profile_md, heatmap, *_view_row())


def allocation_panel() -> AllocationPanel:
    """Step 2: scores, allocation method, widths, scope, memory settings (live)."""
    gr.Markdown(text.ALLOCATION)
    memory_md = gr.Markdown(elem_id="memory-text")
    deploy_md = gr.Markdown(elem_id="deploy-badge")
    with gr.Row():
        score_source = gr.Dropdown([defaults.SCORE_METHOD], value=defaults.SCORE_METHOD,
                                   label="Scores", min_width=120, elem_id="score-source")
        alloc_method = gr.Dropdown(list(st.ALLOC_METHODS), value=defaults.ALLOC_METHOD,
                                   label="Allocation", min_width=120, elem_id="alloc-method")
        snap = gr.Dropdown(SNAPS, value=SNAPS[0], min_width=120, label="Snap per layer",
                           elem_id="snap")
    with gr.Row():
        clusters = gr.Slider(*CLUSTER_RANGE, value=defaults.CLUSTERS, step=1,
                             label="Clusters C", elem_id="clusters")
        target_bits = gr.Slider(*view.target_bounds(defaults.BITS), value=defaults.TARGET_BITS,
                                step=0.05, visible=False, label="Target average bits (budget)",
                                elem_id="target-bits")
        uniform_bits = gr.Dropdown(BIT_CHOICES, value=defaults.UNIFORM_BITS, visible=False,
                                   label="Uniform bits")
        bits = gr.CheckboxGroup(BIT_CHOICES, value=list(defaults.BITS), label="Bit widths",
                                elem_id="bits")
    with gr.Row(equal_height=True):
        scope = gr.Radio(SCOPES, value=defaults.SCOPE, label="Scope")
        log_scores = gr.Checkbox(value=False, label="Cluster log-scores")
    with gr.Row():
        group_size = gr.Dropdown(GROUP_SIZES, value=defaults.GROUP_SIZE, label="Group size",
                                 min_width=80)
        base_bits = gr.Dropdown(BASE_BIT_CHOICES, value=defaults.BASE_BITS,
                                label="Base bits (non-expert)", min_width=80,
                                elem_id="base-bits")
        seed = gr.Number(value=defaults.SEED, precision=0, label="Seed", min_width=80,
                         elem_id="seed")
    memory_preview = gr.JSON(visible=False)
    preview_drawn = gr.Textbox(visible=False)
    return AllocationPanel(memory_md, deploy_md, score_source, alloc_method, snap, clusters,
                           target_bits, uniform_bits, bits, scope, log_scores, group_size,
                           base_bits, seed, memory_preview, preview_drawn)


def allocation_results() -> AllocationResults:
    """The memory, bits and Pareto figures, the clusters table, and the comparison."""
    with gr.Row():
        memory_plot = gr.Plot(label="Memory by component", elem_id="memory-plot")
        bits_plot = gr.Plot(label="Assigned bits", elem_id="bits-plot")
    with gr.Row():
        pareto_plot = gr.Plot(label="Memory vs predicted loss", elem_id="pareto-plot")
        clusters_df = gr.Dataframe(headers=list(tables.CLUSTER_COLUMNS), label="Clusters",
                                   interactive=False, elem_id="clusters-table")
    with gr.Accordion("Compare two methods (rank correlation)", open=False):
        with gr.Row(equal_height=True):
            compare_a = gr.Dropdown(list(methods.NAMES), value=defaults.SCORE_METHOD,
                                    label="Left")
            compare_b = gr.Dropdown(list(methods.NAMES), value=COMPARE_WITH, label="Right")
            compare_btn = gr.Button("Compare")
        compare_plot = gr.Plot(label="Side by side", elem_id="compare-plot")
    return AllocationResults(memory_plot, bits_plot, pareto_plot, clusters_df, compare_a,
                             compare_b, compare_btn, compare_plot)


def report_panel() -> ReportPanel:
    """The sensitivity report, folded away (quick: about a minute; full: many)."""
    with gr.Accordion(text.REPORT_TITLE, open=False):
        gr.Markdown(text.REPORT_INTRO)
        report_quick = gr.Checkbox(value=True, label="Quick report", elem_id="report-quick",
                                   info=text.REPORT_QUICK)
        report_btn = gr.Button("Run the sensitivity report", elem_id="report-btn")
        report_md = gr.Markdown(elem_id="report-text")
        report_df = gr.Dataframe(interactive=False, elem_id="report-table")
    return ReportPanel(report_quick, report_btn, report_md, report_df)


def _quantize_controls() -> tuple:
    with gr.Row(equal_height=True):
        mode = gr.Radio(MODES, value=defaults.QUANT_MODE, label="Mode", elem_id="mode")
        pairs = gr.Slider(*PAIR_RANGE[:2], value=defaults.QUICK_PAIRS, step=PAIR_RANGE[2],
                          label="MME image pairs", elem_id="pairs")
        quant_seed = gr.Number(value=defaults.SEED, precision=0, label="Seed (tuned)",
                               min_width=80, visible=False, elem_id="quant-seed")
        with gr.Column(min_width=160):
            quantize_btn = gr.Button("Quantize + evaluate", variant="primary",
                                     elem_id="quantize-btn")
            quantize_cancel = gr.Button("Cancel", variant="stop")
    return mode, pairs, quant_seed, quantize_btn, quantize_cancel


def quantize_panel() -> QuantizePanel:
    """Step 3: mode, pairs, Quantize / Cancel, the results and this session's runs."""
    gr.Markdown(text.QUANTIZE)
    controls = _quantize_controls()
    run_md = gr.Markdown(elem_id="run-text")
    with gr.Row():
        category_df = gr.Dataframe(headers=["category", "baseline", "quantized", "delta"],
                                   label="Per category", interactive=False,
                                   elem_id="category-table")
        results_plot = gr.Plot(label="Baseline vs quantized", elem_id="results-plot")
    with gr.Row():
        with gr.Column():
            tradeoff_plot = gr.Plot(label="Your runs: memory vs score", elem_id="tradeoff-plot")
            tradeoff_y = gr.Radio(TRADEOFF_AXES, value=TRADEOFF_AXES[0][1], label="y axis",
                                  elem_id="tradeoff-y")
        runs_df = gr.Dataframe(headers=list(tables.RUN_COLUMNS), interactive=False,
                               label="Your runs (kept in this browser)", elem_id="runs-table")
    return QuantizePanel(*controls, run_md, category_df, results_plot, tradeoff_plot,
                         tradeoff_y, runs_df)


def export_panel() -> ExportPanel:
    """Step 4: Export, its note and the downloads; the API example."""
    gr.Markdown(text.EXPORT)
    with gr.Row(equal_height=True):
        export_btn = gr.Button("Export recipe, scores, snippets, checkpoint",
                               elem_id="export-btn")
        export_md = gr.Markdown(elem_id="export-text")
    files = gr.File(label="Downloads", file_count="multiple", interactive=False,
                    elem_id="downloads")
    with gr.Accordion("Use the API (gradio_client)", open=False):
        gr.Markdown(text.API_EXAMPLE)
    return ExportPanel(export_btn, export_md, files)


def build_layout() -> Page:
    """Place every widget (inside a ``gr.Blocks`` context) and return them."""
    gr.Markdown(text.INTRO)
    state = gr.State(st.SessionState(), delete_callback=st.SessionState.close)
    saved_runs = gr.BrowserState({}, storage_key="mopeq-runs")  # runs survive a reload
    model = model_row()
    with gr.Row():
        with gr.Column(scale=3):
            sensitivity = sensitivity_panel()
        with gr.Column(scale=2):
            allocation = allocation_panel()
    results = allocation_results()
    report = report_panel()
    quantize = quantize_panel()
    return Page(state, saved_runs, model, sensitivity, allocation, results, report, quantize,
                export_panel())
