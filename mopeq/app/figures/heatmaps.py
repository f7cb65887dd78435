"""Layer x expert heatmaps: sensitivity, assigned bits, two methods side by side.

Layers on rows (top to bottom, "L3"), experts on columns ("E0".."E{n-1}").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mopeq.app.figures.style import (
    ANNOTATE_MAX_CELLS,
    BIT_COLORS,
    OTHER_BIT_COLORS,
    _finish,
    _fmt,
)


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


def _bits_parts(bits: np.ndarray, layer_labels, scores) -> tuple[dict, list[str]]:
    """What a bits map's trace holds (z bands, cell text, hover, colours), and its rows."""
    arr = _as_2d(bits, "bits")
    if np.isnan(arr).any() or (arr <= 0).any() or (arr != np.round(arr)).any():
        raise ValueError("bits must be positive integers")
    arr = arr.astype(int)
    layers = _layer_names(layer_labels, arr.shape[0])
    scores = None if scores is None else _as_2d(scores, "scores", arr.shape)
    widths = sorted(set(arr.ravel().tolist()))
    parts = {"z": np.searchsorted(widths, arr), "labels": _cell_labels(arr, str),
             "hover": _cell_hover(layers, arr.shape, values=scores, bits=arr),
             "colorscale": _discrete_scale(_bit_palette(widths)), "zmax": len(widths) - 0.5,
             "tickvals": list(range(len(widths))), "ticktext": [str(b) for b in widths]}
    return parts, layers


def bits_restyle(bits: np.ndarray, *, layer_labels: Sequence[int | str] | None = None,
                 scores: np.ndarray | None = None) -> dict:
    """``Plotly.restyle`` arguments that turn a drawn ``bits_heatmap`` into this one's map.

    The page sends one per clusters value ahead of time, so the browser redraws the bits map
    the moment the slider moves (``app.wiring.PREVIEW_JS``); JSON-ready, one trace.
    """
    parts, _ = _bits_parts(bits, layer_labels, scores)
    return {"z": [parts["z"].tolist()],
            "text": [None if parts["labels"] is None else parts["labels"].tolist()],
            "customdata": [parts["hover"].tolist()], "colorscale": [parts["colorscale"]],
            "zmax": [parts["zmax"]], "colorbar.tickvals": [parts["tickvals"]],
            "colorbar.ticktext": [parts["ticktext"]]}


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
    parts, layers = _bits_parts(bits, layer_labels, scores)
    bar = {"title": {"text": "bits"}, "tickvals": parts["tickvals"],
           "ticktext": parts["ticktext"]}
    trace = _heatmap(parts["z"], layers, parts["hover"], labels=parts["labels"],
                     colorscale=parts["colorscale"], zmin=-0.5, zmax=parts["zmax"],
                     colorbar=bar)
    fig = go.Figure(trace)
    _reverse_rows(fig)
    return _finish(fig, title=title, height=_heatmap_height(parts["z"].shape[0]))


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
