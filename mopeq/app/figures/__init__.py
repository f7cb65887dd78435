"""Plotly figures for the app and the README: arrays in, figures out.

Every function is pure: numpy arrays, dicts or lists in, a ``plotly.graph_objects.Figure`` out;
no model, no gradio, no I/O. Inputs are checked here, and a bad one raises ``ValueError`` that
names the argument. Layer x expert maps (``heatmaps``) put layers on rows (top to bottom,
labelled by their decoder-layer index, "L3") and experts on columns ("E0".."E{n-1}"); the other
charts are in ``charts``, the shared look in ``style``.
"""

from mopeq.app.figures.charts import (
    memory_breakdown,
    memory_update,
    pareto_curve,
    pareto_update,
    results_bars,
    tradeoff_scatter,
    training_curve,
)
from mopeq.app.figures.heatmaps import (
    bits_heatmap,
    bits_restyle,
    compare_heatmaps,
    rank_correlation,
    sensitivity_heatmap,
)
from mopeq.app.figures.style import BIT_COLORS, UNITS, unit_for

__all__ = ["BIT_COLORS", "UNITS", "bits_heatmap", "bits_restyle", "compare_heatmaps",
           "memory_breakdown", "memory_update", "pareto_curve", "pareto_update",
           "rank_correlation", "results_bars", "sensitivity_heatmap", "tradeoff_scatter",
           "training_curve", "unit_for"]
