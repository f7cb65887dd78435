"""The figures' shared look and checks: template, margins, colours, units, number format."""

from __future__ import annotations

import functools
import math
from types import MappingProxyType

import plotly.graph_objects as go

TEMPLATE = "plotly_white"  # the look copied by ``_light_template``
MARGIN = MappingProxyType({"l": 60, "r": 20, "t": 60, "b": 50})
ANNOTATE_MAX_CELLS = 400  # past this, per-cell labels are unreadable and slow the browser
MME_MAX = 200.0  # an MME subtask scores 100*acc + 100*acc+
BIT_COLORS = MappingProxyType({
    1: "#67001f", 2: "#d73027", 3: "#fc8d59", 4: "#1a9850", 5: "#66bd63",
    6: "#35978f", 8: "#4575b4", 16: "#969696",
})
OTHER_BIT_COLORS = ("#762a83", "#8c510a", "#c51b7d", "#01665e", "#542788")
COMPONENT_ORDER = ("routed_experts", "shared_experts", "attention", "dense_mlp", "router",
                   "embeddings", "embeddings_lm_head", "lm_head", "vision", "norm", "other")
COMPONENT_NAMES = MappingProxyType({"embeddings_lm_head": "embeddings + lm_head",
                                    "lm_head": "lm_head", "dense_mlp": "dense MLP"})
AXIS_TITLES = MappingProxyType({"gb": "weights (GB)", "predicted_loss": "predicted loss",
                                "avg_bits": "average bits per expert weight",
                                "kl": "KL to the baseline (nats per answer)"})
UNITS = MappingProxyType({"MB": 1e6, "GB": 1e9})  # decimal, like memory.py
MODE_SYMBOLS = MappingProxyType({"rtn": "circle", "tuned": "square"})
_GRID = "#EBF0F8"


def unit_for(n_bytes: float) -> str:
    """The one size unit of a view: MB below 1 GB (the embedded model), else GB."""
    return "MB" if n_bytes < UNITS["GB"] else "GB"


def _unit(unit: str) -> float:
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {list(UNITS)}, got {unit!r}")
    return UNITS[unit]


@functools.lru_cache(maxsize=1)
def _light_template() -> go.layout.Template:
    """The few settings of ``plotly_white`` the figures use.

    Assigning the full ``plotly_white`` template costs ~25 ms per figure (plotly validates and
    copies all of it); this small one costs ~2 ms, which the live allocation view needs.
    """
    import plotly.io as pio

    axis = {"gridcolor": _GRID, "linecolor": _GRID, "zerolinecolor": _GRID, "zerolinewidth": 2,
            "ticks": "", "automargin": True}
    return go.layout.Template(layout={
        "paper_bgcolor": "white", "plot_bgcolor": "white", "font": {"color": "#2a3f5f"},
        "colorway": pio.templates[TEMPLATE].layout.colorway, "xaxis": axis, "yaxis": axis,
        "hovermode": "closest", "hoverlabel": {"align": "left"}})


def _finish(fig: go.Figure, *, title: str | None, height: int, **layout) -> go.Figure:
    """Apply the common template, margins, title and height."""
    fig.update_layout(template=_light_template(), margin=dict(MARGIN), height=height,
                      title={"text": title, "x": 0.01, "xanchor": "left"}, **layout)
    return fig


def _fmt(x: float) -> str:
    """Three significant digits; "n/a" for NaN."""
    return "n/a" if not math.isfinite(x) else f"{x:.3g}"
