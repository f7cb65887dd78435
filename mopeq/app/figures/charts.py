"""Charts: memory by component, the Pareto curve, MME results, the runs scatter, training."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mopeq.app.figures.style import (
    AXIS_TITLES,
    COMPONENT_NAMES,
    COMPONENT_ORDER,
    MME_MAX,
    MODE_SYMBOLS,
    UNITS,
    _finish,
    _unit,
)


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


def _memory_parts(breakdown: Mapping[str, int], reference: Mapping[str, int] | None,
                  unit: str, title: str | None) -> tuple[list[tuple[str, list, list]], str, int]:
    """The memory chart's bars (name, row labels, sizes), its title and its row count."""
    scale = _unit(unit)
    _check_bytes(breakdown, "breakdown")
    rows = {"this model": breakdown}
    if reference is not None:
        _check_bytes(reference, "reference")
        rows["bf16"] = reference
    totals = {r: sum(d.values()) / scale for r, d in rows.items()}
    # the row labels stay as they are while the allocation moves (the title has this model's
    # total), so a live update restyles the bars' sizes only
    labels = ["this model", *(f"{r}<br>{t:.3g} {unit}" for r, t in totals.items()
                              if r != "this model")]
    bars = []
    for comp in _component_order(list(dict.fromkeys([k for d in rows.values() for k in d]))):
        mb = [d.get(comp, 0) / scale for d in rows.values()]
        if any(mb):
            bars.append((COMPONENT_NAMES.get(comp, comp.replace("_", " ")), labels, mb))
    if title is None:
        title = f"Weights: {totals['this model']:.3f} {unit}"
        if "bf16" in totals and totals["this model"] > 0:
            title += f" ({totals['bf16'] / totals['this model']:.2f}x smaller than bf16)"
    return bars, title, len(rows)


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
    bars, title, n_rows = _memory_parts(breakdown, reference, unit, title)
    fig = go.Figure()
    for name, labels, mb in bars:
        fig.add_bar(y=labels, x=mb, name=name, orientation="h",
                    hovertemplate=f"%{{fullData.name}}: %{{x:.3f}} {unit}")
    fig.update_xaxes(title_text=f"{unit} (1e{int(math.log10(_unit(unit)))} bytes)")
    fig.update_yaxes(autorange="reversed", automargin=True)
    return _finish(fig, title=title, height=300 + 40 * n_rows, barmode="stack")


def memory_update(breakdown: Mapping[str, int], *, reference: Mapping[str, int] | None = None,
                  unit: str = "MB") -> dict:
    """``Plotly.update`` arguments that turn a drawn ``memory_breakdown`` into this one.

    ``traces``: how many bars the chart must have for the update to apply (JSON-ready).
    """
    bars, title, _ = _memory_parts(breakdown, reference, unit, None)
    return {"data": {"x": [mb for _, _, mb in bars]}, "layout": {"title.text": title},
            "traces": len(bars)}


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
        current: the chosen allocation (same keys), drawn as a star labelled with it.
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
        cx, cy, hover, label = _current_parts(current, key, y, unit)
        # the label is the trace's own text (not a layout annotation), so that a live move
        # of the star is one restyle of this trace
        fig.add_scatter(x=[cx], y=[cy], name="current", mode="markers+text",
                        marker={"symbol": "star", "size": 18, "color": "#d62728",
                                "line": {"width": 1, "color": "black"}},
                        text=[label], textposition="top center", customdata=[hover],
                        textfont={"size": 12}, cliponaxis=False,
                        hovertemplate="%{customdata}<extra>current</extra>")
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


def _current_parts(current: Mapping, key: str, y: str,
                   unit: str) -> tuple[float, float, str, str]:
    """The star's position, its hover and its label (``current: <avg bits> bits``)."""
    cur = _sized(current, unit)
    label = "current" + (f": {cur['avg_bits']:.2f} bits" if "avg_bits" in cur else "")
    return cur[key], cur[y], _points_hover(cur, unit), label


def pareto_update(current: dict, *, x: str = "gb", y: str = "predicted_loss",
                  unit: str = "GB") -> dict:
    """``Plotly.restyle`` arguments that move a drawn ``pareto_curve``'s current point.

    The frontier does not move with the clusters; the star (trace 1) and its label do.
    """
    _require_keys([current], (x, y), "current")
    cx, cy, hover, label = _current_parts(current, "size" if x == "gb" else x, y, unit)
    return {"data": {"x": [[cx]], "y": [[cy]], "text": [[label]], "customdata": [[hover]]},
            "trace": 1}


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
