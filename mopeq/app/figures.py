"""Plotly figures for the app and the README: arrays in, figures out.

Every function is pure: numpy arrays, dicts or lists in, a ``plotly.graph_objects.Figure`` out;
no model, no gradio, no I/O. Inputs are checked here, and a bad one raises ``ValueError`` that
names the argument. Layer x expert maps put layers on rows (top to bottom, labelled by their
decoder-layer index, "L3") and experts on columns ("E0".."E{n-1}").
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from types import MappingProxyType

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

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


def _as_2d(values: object, name: str, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A finite-or-NaN float matrix, non-empty, optionally of a given shape."""
    arr = np.asarray(values, dtype=float)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 2-D layer x expert array, got shape "
                         f"{arr.shape}")
    if shape is not None and arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape} like the scores")
    if np.isinf(arr).any():
        raise ValueError(f"{name} contains infinite values")
    return arr


def _layer_names(layer_labels: Sequence[int | str] | None, n_layers: int) -> list[str]:
    """Row labels: decoder-layer indices as "L{i}", strings kept; unique (plotly merges twins)."""
    labels = range(n_layers) if layer_labels is None else list(layer_labels)
    if len(labels) != n_layers:
        raise ValueError(f"layer_labels has {len(labels)} entries for {n_layers} layers")
    names = [lab if isinstance(lab, str) else f"L{int(lab)}" for lab in labels]
    if len(set(names)) != n_layers:
        raise ValueError(f"layer_labels must be unique, got {names}")
    return names


def _expert_names(n_experts: int) -> list[str]:
    return [f"E{j}" for j in range(n_experts)]


def _cell_hover(layers: list[str], shape: tuple[int, int], *, name: str = "score",
                values: np.ndarray | None = None, stderr: np.ndarray | None = None,
                bits: np.ndarray | None = None, masked: np.ndarray | None = None) -> np.ndarray:
    """Per-cell hover strings: layer, expert, raw value (± stderr), bits, a log-mask note."""
    out = np.empty(shape, dtype=object)
    for i, j in np.ndindex(shape):
        lines = [f"layer {layers[i]}", f"expert E{j}"]
        if values is not None:
            err = "" if stderr is None else f" ± {_fmt(stderr[i, j])}"
            lines.append(f"{name}: {_fmt(values[i, j])}{err}")
        if bits is not None:
            lines.append(f"bits: {_fmt(bits[i, j])}")
        if masked is not None and masked[i, j]:
            lines.append("(≤ 0: not coloured on the log scale)")
        out[i, j] = "<br>".join(lines)
    return out


def _cell_labels(values: np.ndarray, fmt: Callable[[float], str]) -> np.ndarray | None:
    """Per-cell text for small maps; ``None`` past ``ANNOTATE_MAX_CELLS`` cells."""
    if values.size > ANNOTATE_MAX_CELLS:
        return None
    return np.vectorize(fmt, otypes=[object])(values)


def _heatmap(z: np.ndarray, layers: list[str], hover: np.ndarray, *,
             labels: np.ndarray | None, **kw) -> go.Heatmap:
    """One layer x expert heatmap trace, hover from ``hover``, cell text from ``labels``."""
    gap = 0 if labels is None else 1
    return go.Heatmap(z=z, x=_expert_names(z.shape[1]), y=layers, customdata=hover,
                      hovertemplate="%{customdata}<extra></extra>", xgap=gap, ygap=gap,
                      text=labels, texttemplate=None if labels is None else "%{text}", **kw)


def _heatmap_height(n_layers: int) -> int:
    return int(min(900, max(260, 130 + 22 * n_layers)))


def _log_ticks(lo: float, hi: float) -> dict:
    """Colour-bar ticks at raw values for a log10 axis from ``lo`` to ``hi``: 1s, then 1-2-5s."""
    for mults in ((1,), (1, 2, 5), range(1, 10)):
        vals = [k + math.log10(m) for k in range(math.floor(lo), math.ceil(hi) + 1)
                for m in mults]
        vals = [v for v in vals if lo - 1e-9 <= v <= hi + 1e-9]
        if len(vals) >= 3:
            break
    vals = vals if len(vals) >= 2 else [lo, hi]
    vals = vals[:: math.ceil(len(vals) / 10)]  # at most 10 ticks
    return {"tickvals": vals, "ticktext": [f"{10.0 ** v:.3g}" for v in vals]}


def _log_colour(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """log10 of the positive cells (others NaN: drawn blank), the mask of cells <= 0, ticks."""
    positive = values > 0
    if not positive.any():
        raise ValueError("log=True needs at least one positive value")
    z = np.full(values.shape, np.nan)
    z[positive] = np.log10(values[positive])
    masked = ~positive & ~np.isnan(values)
    return z, masked, _log_ticks(float(np.nanmin(z)), float(np.nanmax(z)))


def _score_panel(values: np.ndarray, layers: list[str], *, name: str, log: bool,
                 bits: np.ndarray | None = None, stderr: np.ndarray | None = None,
                 colorbar: dict | None = None) -> tuple[go.Heatmap, int]:
    """A score heatmap trace (linear or log colour, raw hover) and its count of masked cells."""
    z, masked, ticks = _log_colour(values) if log else (values, None, {})
    bar = {"title": {"text": f"{name} (log)" if log else name}, **ticks, **(colorbar or {})}
    hover = _cell_hover(layers, values.shape, name=name, values=values, stderr=stderr,
                        bits=bits, masked=masked)
    trace = _heatmap(z, layers, hover, labels=_cell_labels(values, _fmt), colorscale="Viridis",
                     colorbar=bar)
    return trace, 0 if masked is None else int(masked.sum())


def _reverse_rows(fig: go.Figure) -> None:
    """First layer on top, like a table; explicit axis titles."""
    fig.update_yaxes(autorange="reversed", title_text="MoE layer", type="category",
                     automargin=True)
    fig.update_xaxes(title_text="expert", type="category")


def sensitivity_heatmap(values: np.ndarray, *, title: str,
                        layer_labels: Sequence[int | str] | None = None,
                        bits: np.ndarray | None = None, stderr: np.ndarray | None = None,
                        log: bool = False, colorbar_title: str = "score") -> go.Figure:
    """Layer x expert heatmap of a per-expert score (sensitivity, trace, routing frequency).

    Args:
        values: ``[n_layers, n_experts]`` scores; NaN marks a missing score.
        title: figure title.
        layer_labels: decoder-layer index (or label) of each row; default ``0..n_layers-1``.
        bits: optional ``[n_layers, n_experts]`` assigned bits, shown in the hover.
        stderr: optional standard errors of the scores, shown in the hover as ``± stderr``.
        log: colour by log10 of the values. Cells ``<= 0`` have no logarithm: they are left
            blank, the hover says so, and the title counts them. The hover shows raw values.
        colorbar_title: name of the score, used on the colour bar and in the hover.

    Raises:
        ValueError: empty or non-2-D values, mismatched shapes or labels, infinities, or
            ``log=True`` without any positive value.
    """
    values = _as_2d(values, "values")
    layers = _layer_names(layer_labels, values.shape[0])
    bits = None if bits is None else _as_2d(bits, "bits", values.shape)
    stderr = None if stderr is None else _as_2d(stderr, "stderr", values.shape)
    trace, n_masked = _score_panel(values, layers, name=colorbar_title, log=log, bits=bits,
                                   stderr=stderr)
    if n_masked:
        title = f"{title} — {n_masked} cell(s) ≤ 0 left blank on the log scale"
    fig = go.Figure(trace)
    _reverse_rows(fig)
    return _finish(fig, title=title, height=_heatmap_height(values.shape[0]))


def _bit_palette(widths: list[int]) -> list[str]:
    """A colour per bit width: fixed for the usual widths, a fallback cycle for others."""
    others = iter(OTHER_BIT_COLORS * (1 + len(widths) // len(OTHER_BIT_COLORS)))
    return [BIT_COLORS[b] if b in BIT_COLORS else next(others) for b in widths]


def _discrete_scale(colours: list[str]) -> list[list]:
    """A piecewise-constant colourscale: band k covers z in [k - 0.5, k + 0.5]."""
    n = len(colours)
    scale = []
    for k, colour in enumerate(colours):
        scale += [[k / n, colour], [(k + 1) / n, colour]]
    return scale


def bits_heatmap(bits: np.ndarray, *, layer_labels: Sequence[int | str] | None = None,
                 scores: np.ndarray | None = None, title: str = "Assigned bits") -> go.Figure:
    """Layer x expert map of assigned bit widths, one fixed colour per width.

    Args:
        bits: ``[n_layers, n_experts]`` positive integer bit widths.
        layer_labels: decoder-layer index (or label) of each row.
        scores: optional scores of the same shape, shown in the hover.
        title: figure title.

    Raises:
        ValueError: empty, non-2-D, non-integer or non-positive bits; mismatched shapes.
    """
    arr = _as_2d(bits, "bits")
    if np.isnan(arr).any() or (arr <= 0).any() or (arr != np.round(arr)).any():
        raise ValueError("bits must be positive integers")
    arr = arr.astype(int)
    layers = _layer_names(layer_labels, arr.shape[0])
    scores = None if scores is None else _as_2d(scores, "scores", arr.shape)
    widths = sorted(set(arr.ravel().tolist()))
    z = np.searchsorted(widths, arr)
    hover = _cell_hover(layers, arr.shape, values=scores, bits=arr)
    bar = {"title": {"text": "bits"}, "tickvals": list(range(len(widths))),
           "ticktext": [str(b) for b in widths]}
    trace = _heatmap(z, layers, hover, labels=_cell_labels(arr, str),
                     colorscale=_discrete_scale(_bit_palette(widths)), zmin=-0.5,
                     zmax=len(widths) - 0.5, colorbar=bar)
    fig = go.Figure(trace)
    _reverse_rows(fig)
    return _finish(fig, title=title, height=_heatmap_height(arr.shape[0]))


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman rank correlation over all experts where both scores are present (not NaN).

    Returns:
        rho, or ``None`` where it is undefined: fewer than 2 experts, or a constant map.

    Raises:
        ValueError: mismatched shapes or empty arrays.
    """
    a = _as_2d(a, "a")
    b = _as_2d(b, "b", a.shape)
    keep = ~np.isnan(a) & ~np.isnan(b)
    x, y = a[keep], b[keep]
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    from scipy import stats  # ~0.5 s to import: only when a comparison is drawn

    rho = float(stats.spearmanr(x, y).statistic)
    return None if math.isnan(rho) else rho


def compare_heatmaps(a: np.ndarray, b: np.ndarray, *,
                     names: tuple[str, str] = ("frobenius", "hessian"),
                     layer_labels: Sequence[int | str] | None = None,
                     log: bool = False) -> go.Figure:
    """Two score maps side by side, each on its own colour scale, with their rank agreement.

    Args:
        a: ``[n_layers, n_experts]`` scores of the first method.
        b: scores of the second method, same shape.
        names: the two methods' names (panel titles and hover).
        layer_labels: decoder-layer index (or label) of each row.
        log: colour each panel by log10 (see ``sensitivity_heatmap``).

    Raises:
        ValueError: mismatched shapes, empty arrays, bad labels.
    """
    a = _as_2d(a, "a")
    b = _as_2d(b, "b", a.shape)
    layers = _layer_names(layer_labels, a.shape[0])
    rho = rank_correlation(a, b)
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.14,
                        subplot_titles=list(names))
    untitled = {"title": {"text": ""}}  # the panel titles name the scores; keep the gap clear
    left, n_left = _score_panel(a, layers, name=names[0], log=log, colorbar={"x": 0.43,
                                                                            **untitled})
    right, n_right = _score_panel(b, layers, name=names[1], log=log, colorbar=untitled)
    fig.add_trace(left, row=1, col=1)
    fig.add_trace(right, row=1, col=2)
    _reverse_rows(fig)
    fig.update_yaxes(title_text=None, col=2)
    title = f"{names[0]} vs {names[1]}: Spearman ρ = {'n/a' if rho is None else f'{rho:.3f}'}"
    if n_left + n_right:
        title += f" — {n_left + n_right} cell(s) ≤ 0 left blank on the log scale"
    return _finish(fig, title=title, height=_heatmap_height(a.shape[0]))


def _component_order(keys: list[str]) -> list[str]:
    """Known components in their usual order, then the rest as given."""
    rank = {c: i for i, c in enumerate(COMPONENT_ORDER)}
    canon = {k: k.lower().replace(" ", "_") for k in keys}
    return sorted(keys, key=lambda k: rank.get(canon[k], len(rank)))


def _require_keys(rows: Sequence[Mapping], keys: Sequence[str], name: str) -> None:
    """Raise ``ValueError`` unless ``rows`` is non-empty and every row holds ``keys``."""
    if not rows:
        raise ValueError(f"{name} is empty: nothing to plot")
    for row in rows:
        missing = [k for k in keys if k not in row]
        if missing:
            raise ValueError(f"each entry of {name} needs {list(keys)}; {row} lacks {missing}")


def _check_bytes(breakdown: Mapping[str, int], name: str) -> None:
    if not breakdown:
        raise ValueError(f"{name} is empty")
    bad = {k: v for k, v in breakdown.items()
           if isinstance(v, bool) or not isinstance(v, Real) or not v >= 0}
    if bad:
        raise ValueError(f"{name} must hold byte counts >= 0, got {bad}")


def memory_breakdown(breakdown: Mapping[str, int], *, title: str | None = None,
                     reference: Mapping[str, int] | None = None,
                     unit: str = "MB") -> go.Figure:
    """Horizontal stacked bar of weight bytes by component, beside the bf16 size when given.

    Args:
        breakdown: bytes per component (e.g. ``routed_experts``, ``attention``, ``lm_head``).
        title: figure title; default states the total and the ratio to the reference.
        reference: bytes per component of the bf16 model (same keys; a missing key is 0).
        unit: "MB" or "GB" (``unit_for`` picks the one of the view).

    Raises:
        ValueError: an empty breakdown, a negative / non-numeric count, or an unknown unit.
    """
    scale = _unit(unit)
    _check_bytes(breakdown, "breakdown")
    rows = {"this model": breakdown}
    if reference is not None:
        _check_bytes(reference, "reference")
        rows["bf16"] = reference
    totals = {r: sum(d.values()) / scale for r, d in rows.items()}
    labels = {r: f"{r}<br>{t:.3g} {unit}" for r, t in totals.items()}
    fig = go.Figure()
    for comp in _component_order(list(dict.fromkeys([k for d in rows.values() for k in d]))):
        mb = [d.get(comp, 0) / scale for d in rows.values()]
        if not any(mb):
            continue
        name = COMPONENT_NAMES.get(comp, comp.replace("_", " "))
        fig.add_bar(y=[labels[r] for r in rows], x=mb, name=name,
                    orientation="h", hovertemplate=f"%{{fullData.name}}: %{{x:.3f}} {unit}")
    if title is None:
        title = f"Weights: {totals['this model']:.3f} {unit}"
        if "bf16" in totals and totals["this model"] > 0:
            title += f" ({totals['bf16'] / totals['this model']:.2f}x smaller than bf16)"
    fig.update_xaxes(title_text=f"{unit} (1e{int(math.log10(scale))} bytes)")
    fig.update_yaxes(autorange="reversed", automargin=True)
    return _finish(fig, title=title, height=300 + 40 * len(rows), barmode="stack")


def _points_hover(p: Mapping[str, float], unit: str = "GB") -> str:
    keys = [("avg_bits", "avg bits", ".2f"), ("size", unit, ".4f"),
            ("predicted_loss", "predicted loss", ".4g")]
    return "<br>".join(f"{label}: {p[k]:{f}}" for k, label, f in keys if k in p)


def _sized(p: Mapping, unit: str) -> dict:
    """A point with ``size`` = its ``gb`` in ``unit``."""
    return {**p, "size": p["gb"] * UNITS["GB"] / _unit(unit)} if "gb" in p else dict(p)


def pareto_curve(points: list[dict], *, current: dict | None = None, x: str = "gb",
                 y: str = "predicted_loss", unit: str = "GB",
                 score_name: str | None = None) -> go.Figure:
    """The allocation frontier (memory vs predicted loss) and the current choice on it.

    A frontier of one memory value (a bit set of one width: nothing to trade) is drawn as
    that single allocation, with a note, on a readable axis range.

    Args:
        points: frontier points, e.g. ``{"avg_bits": 3.2, "gb": 1.1, "predicted_loss": 0.05}``.
        current: the chosen allocation (same keys), drawn as a star with an annotation.
        x: key plotted on the x axis (``gb`` is drawn in ``unit``).
        y: key plotted on the y axis.
        unit: "MB" or "GB", for ``x="gb"``.
        score_name: the scores the predicted loss weighs errors by (named in the title).

    Raises:
        ValueError: no points, or a point (or ``current``) without the ``x``/``y`` keys.
    """
    _require_keys(points, (x, y), "points")
    if current is not None:
        _require_keys([current], (x, y), "current")
    key = "size" if x == "gb" else x
    pts = sorted((_sized(p, unit) for p in points), key=lambda p: p[key])
    fig = go.Figure(go.Scatter(x=[p[key] for p in pts], y=[p[y] for p in pts], name="frontier",
                               mode="lines+markers", text=[_points_hover(p, unit) for p in pts],
                               hovertemplate="%{text}<extra>frontier</extra>"))
    if current is not None:
        cur = _sized(current, unit)
        fig.add_scatter(x=[cur[key]], y=[cur[y]], name="current", mode="markers",
                        marker={"symbol": "star", "size": 18, "color": "#d62728",
                                "line": {"width": 1, "color": "black"}},
                        text=[_points_hover(cur, unit)],
                        hovertemplate="%{text}<extra>current</extra>")
        fig.add_annotation(x=cur[key], y=cur[y], text="current<br>" + _points_hover(cur, unit),
                           showarrow=True, arrowhead=2, ax=0, ay=-60, align="left",
                           bgcolor="rgba(255,255,255,0.85)", bordercolor="#888")
    xtitle = f"weights ({unit})" if x == "gb" else AXIS_TITLES.get(x, x)
    ytitle = AXIS_TITLES.get(y, y)
    fig.update_xaxes(title_text=xtitle)
    fig.update_yaxes(title_text=ytitle)
    title = f"Frontier: {ytitle} vs {xtitle}"
    if score_name:
        title += f" (loss weighted by {score_name} scores)"
    if len({round(p[key], 12) for p in pts}) == 1:  # one width: a single allocation
        _single_point_view(fig, pts[0][key], pts[0][y])
        title = f"One allocation only: a single bit width leaves no {ytitle} to trade"
    return _finish(fig, title=title, height=380)


def _single_point_view(fig: go.Figure, x0: float, y0: float) -> None:
    """Axis ranges around a lone point (plotly would zoom into nothing) and a note."""
    dx, dy = abs(x0) * 0.2 or 1.0, abs(y0) * 0.2 or 1.0
    fig.update_xaxes(range=[x0 - dx, x0 + dx])
    fig.update_yaxes(range=[y0 - dy, y0 + dy])
    fig.add_annotation(x=0.5, y=0.05, xref="paper", yref="paper", showarrow=False,
                       text="tick two or more bit widths to see a frontier")


def results_bars(per_category: Mapping[str, Mapping[str, float]], *,
                 title: str | None = None,
                 intervals: Mapping[str, Mapping[str, Sequence[float]]] | None = None
                 ) -> go.Figure:
    """Grouped bars of MME scores per category, one bar per run.

    Args:
        per_category: ``{run name: {category: score in [0, 200]}}``; a run may lack a category.
        title: figure title.
        intervals: optional ``{run name: {category: [low, high]}}`` 95 % intervals, drawn as
            error bars (a missing one draws none).

    Raises:
        ValueError: no runs, no categories, or a score outside ``[0, 200]``.
    """
    if not per_category or not any(per_category.values()):
        raise ValueError("per_category is empty: no runs or no categories")
    cats = list(dict.fromkeys(c for scores in per_category.values() for c in scores))
    fig = go.Figure()
    for run, scores in per_category.items():
        bad = {c: s for c, s in scores.items() if not 0 <= s <= MME_MAX}
        if bad:
            raise ValueError(f"run {run!r}: MME scores must lie in [0, 200], got {bad}")
        ci = (intervals or {}).get(run) or {}
        fig.add_bar(x=cats, y=[scores.get(c) for c in cats], name=run,
                    error_y=_error_bars([scores.get(c) for c in cats], [ci.get(c) for c in cats]),
                    hovertemplate="%{x}: %{y:.1f}")
    fig.update_xaxes(title_text="MME category")
    fig.update_yaxes(title_text="score (acc + acc+, max 200)", range=[0, MME_MAX])
    return _finish(fig, title=title, height=380, barmode="group",
                   legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1,
                           "xanchor": "right"})


def _error_bars(values: Sequence[float | None],
                cis: Sequence[Sequence[float] | None]) -> dict | None:
    """Plotly asymmetric error bars from [low, high] intervals; None when there are none."""
    if not any(ci is not None for ci in cis):
        return None
    up = [None if ci is None or v is None else ci[1] - v for v, ci in zip(values, cis,
                                                                           strict=True)]
    down = [None if ci is None or v is None else v - ci[0] for v, ci in zip(values, cis,
                                                                             strict=True)]
    return {"type": "data", "symmetric": False, "array": up, "arrayminus": down,
            "thickness": 1.2, "width": 3}


def _run_label(run: Mapping) -> str:
    return str(run.get("label") or f"{run['method']} · {run['avg_bits']:.2f} b")


def tradeoff_scatter(runs: list[dict], *, unit: str = "GB", y: str = "score") -> go.Figure:
    """Memory vs total MME score (or KL), one labelled point per run; baselines drawn apart.

    Colours group runs by method; the marker says the mode (``MODE_SYMBOLS``: circle RTN,
    square tuned). Labels may reach past the plot area (not clipped).

    Args:
        runs: ``{"method": str, "avg_bits": float, "gb": float, "score": float}`` each, with
            optional ``"label"`` (overrides "method · bits"), ``"mode"``, ``"kl"``,
            ``"baseline": True`` and ``"score_ci95"`` / ``"kl_ci95"`` ([low, high], drawn as
            error bars).
        unit: "MB" or "GB" for the memory axis.
        y: "score" (MME total) or "kl" (KL to the baseline; baselines sit at 0).

    Raises:
        ValueError: no runs, a run without ``method``, ``avg_bits``, ``gb`` or ``score``, a
            run without ``y``, or an unknown unit or ``y``.
    """
    _require_keys(runs, ("method", "avg_bits", "gb", "score"), "runs")
    if y not in ("score", "kl"):
        raise ValueError(f"y must be 'score' or 'kl', got {y!r}")
    scale = _unit(unit)
    value = (lambda r: r["score"]) if y == "score" else (
        lambda r: 0.0 if r.get("baseline") else r["kl"])
    _require_keys([r for r in runs if not r.get("baseline")] or runs,
                  ("kl",) if y == "kl" else (), "runs")
    groups: dict[str, list[Mapping]] = {}
    for run in runs:
        groups.setdefault("baseline" if run.get("baseline") else run["method"], []).append(run)
    fig = go.Figure()
    for name, group in groups.items():
        marker = ({"symbol": "diamond", "size": 14, "color": "#555555"} if name == "baseline"
                  else {"size": 11, "symbol": [MODE_SYMBOLS.get(r.get("mode"), "circle")
                                               for r in group]})
        fig.add_scatter(x=[r["gb"] * UNITS["GB"] / scale for r in group],
                        y=[value(r) for r in group], name=name, mode="markers+text",
                        error_y=_error_bars([value(r) for r in group],
                                            [r.get(f"{y}_ci95") for r in group]),
                        text=[_run_label(r) for r in group], textposition="top center",
                        marker=marker, cliponaxis=False,
                        customdata=[[r["avg_bits"], r.get("mode") or ""] for r in group],
                        hovertemplate=f"%{{text}}<br>%{{x:.3f}} {unit}<br>avg bits "
                        "%{customdata[0]:.2f} · %{customdata[1]}<br>"
                        f"{'score %{y:.1f}' if y == 'score' else 'KL %{y:.4f}'}"
                        "<extra></extra>")
    fig.update_xaxes(title_text=f"weights ({unit})")
    fig.update_yaxes(title_text="MME total score" if y == "score" else AXIS_TITLES["kl"])
    _pad_ranges(fig, [r["gb"] * UNITS["GB"] / scale for r in runs], [value(r) for r in runs])
    title = "Memory vs accuracy" if y == "score" else "Memory vs KL to the baseline"
    return _finish(fig, title=title + " (circle: RTN, square: tuned)", height=400)


def _pad_ranges(fig: go.Figure, xs: list[float], ys: list[float]) -> None:
    """Axis ranges with room around the points so their labels stay inside the figure."""
    for axis, vals, lo_pad, hi_pad in (("x", xs, 0.15, 0.15), ("y", ys, 0.1, 0.25)):
        lo, hi = min(vals), max(vals)
        span = (hi - lo) or abs(hi) or 1.0
        rng = [lo - lo_pad * span, hi + hi_pad * span]
        (fig.update_xaxes if axis == "x" else fig.update_yaxes)(range=rng)


def training_curve(curve: list[dict]) -> go.Figure:
    """Score per MME category (left axis) and total score (right axis) vs training step.

    Args:
        curve: rows ``{"step": int, "score": float, "per_category": {category: score}}``;
            ``per_category`` may be absent.

    Raises:
        ValueError: an empty curve or a row without ``step`` and ``score``.
    """
    _require_keys(curve, ("step", "score"), "curve")
    rows = sorted(curve, key=lambda r: r["step"])
    steps = [r["step"] for r in rows]
    cats = list(dict.fromkeys(c for r in rows for c in r.get("per_category", {})))
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for cat in cats:
        fig.add_scatter(x=steps, y=[r.get("per_category", {}).get(cat) for r in rows], name=cat,
                        mode="lines+markers", hovertemplate=f"{cat}: %{{y:.1f}}<extra></extra>",
                        secondary_y=False)
    fig.add_scatter(x=steps, y=[r["score"] for r in rows], name="total", mode="lines+markers",
                    line={"color": "black", "width": 3, "dash": "dash"},
                    hovertemplate="total: %{y:.1f}<extra></extra>", secondary_y=True)
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(title_text="category score (max 200)", range=[0, MME_MAX],
                     secondary_y=False)
    fig.update_yaxes(title_text="total score", secondary_y=True)
    return _finish(fig, title="Training: MME score vs step", height=400, hovermode="x unified")
