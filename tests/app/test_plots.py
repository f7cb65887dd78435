"""Figures: shapes, labels, hover text, log colouring, discrete bits, Spearman, validation."""

from __future__ import annotations

import math
import time

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
from scipy import stats

from mopeq.app import figures as plots


@pytest.fixture
def scores() -> np.ndarray:
    return np.random.default_rng(0).lognormal(size=(3, 8))


def _cell(fig: go.Figure, i: int, j: int, trace: int = 0) -> str:
    return fig.data[trace].customdata[i][j]


# ---------------------------------------------------------------- sensitivity_heatmap


def test_heatmap_axes_match_input(scores):
    fig = plots.sensitivity_heatmap(scores, title="frobenius", layer_labels=[1, 2, 3])
    trace = fig.data[0]
    assert list(trace.y) == ["L1", "L2", "L3"]
    assert list(trace.x) == [f"E{j}" for j in range(8)]
    assert np.asarray(trace.z).shape == (3, 8)
    np.testing.assert_allclose(np.asarray(trace.z), scores)
    assert fig.layout.xaxis.title.text == "expert"
    assert fig.layout.yaxis.title.text == "MoE layer"
    assert fig.layout.yaxis.autorange == "reversed"  # first layer on top


def test_heatmap_string_layer_labels_kept(scores):
    fig = plots.sensitivity_heatmap(scores, title="t", layer_labels=["a", "b", "c"])
    assert list(fig.data[0].y) == ["a", "b", "c"]


def test_heatmap_hover_names_cell_value_bits_and_stderr(scores):
    scores[1, 5] = 0.0123456
    bits = np.full((3, 8), 4)
    bits[1, 5] = 3
    stderr = np.full((3, 8), 0.5)
    stderr[1, 5] = 0.00111
    fig = plots.sensitivity_heatmap(scores, title="t", layer_labels=[1, 2, 3], bits=bits,
                                    stderr=stderr, colorbar_title="trace")
    hover = _cell(fig, 1, 5)
    assert "layer L2" in hover and "expert E5" in hover
    assert "trace: 0.0123 ± 0.00111" in hover
    assert "bits: 3" in hover
    assert "expert E4" in _cell(fig, 1, 4) and "bits: 4" in _cell(fig, 1, 4)
    assert "%{customdata}" in fig.data[0].hovertemplate


def test_small_heatmap_labels_cells(scores):
    fig = plots.sensitivity_heatmap(scores, title="t")
    assert fig.data[0].texttemplate == "%{text}"
    assert fig.data[0].text[2][7] == f"{scores[2, 7]:.3g}"


def test_log_mode_colours_by_log_and_hovers_raw(scores):
    values = scores * 1000
    values[0, 0], values[2, 3] = 0.0, -4.0
    fig = plots.sensitivity_heatmap(values, title="hessian", log=True)
    z = np.asarray(fig.data[0].z, dtype=float)
    positive = values > 0
    np.testing.assert_allclose(z[positive], np.log10(values[positive]))
    assert np.isnan(z[0, 0]) and np.isnan(z[2, 3])  # no log of <= 0: blank, not faked
    assert f"score: {values[1, 1]:.3g}" in _cell(fig, 1, 1)  # raw value, not its log
    assert "score: -4" in _cell(fig, 2, 3) and "log scale" in _cell(fig, 2, 3)
    assert "2 cell(s) ≤ 0" in fig.layout.title.text
    ticks = fig.data[0].colorbar
    assert [float(t) for t in ticks.ticktext] == pytest.approx(
        [10 ** v for v in ticks.tickvals], rel=1e-2)  # colour bar labelled in raw units


def test_log_mode_narrow_range_still_has_raw_ticks():
    values = np.linspace(2.0, 8.0, 24).reshape(3, 8)
    ticks = plots.sensitivity_heatmap(values, title="t", log=True).data[0].colorbar
    assert len(ticks.tickvals) >= 2
    assert all(math.log10(2) - 1e-9 <= v <= math.log10(8) + 1e-9 for v in ticks.tickvals)


def test_log_mode_without_positive_values_raises():
    with pytest.raises(ValueError, match="positive"):
        plots.sensitivity_heatmap(-np.ones((2, 2)), title="t", log=True)


def test_large_heatmap_has_no_cell_annotations_and_builds_fast():
    values = np.random.default_rng(1).lognormal(size=(61, 256))
    start = time.perf_counter()
    fig = plots.sensitivity_heatmap(values, title="big", log=True, bits=np.full((61, 256), 4))
    fig.to_json()
    assert time.perf_counter() - start < 2.0
    assert fig.data[0].text is None and fig.data[0].texttemplate is None
    assert len(fig.layout.annotations) == 0
    assert fig.layout.height <= 900
    assert "expert E255" in _cell(fig, 60, 255) and "layer L60" in _cell(fig, 60, 255)


# ---------------------------------------------------------------- bits_heatmap


def test_bits_heatmap_ticks_are_the_bit_set_and_colours_discrete():
    bits = np.array([[2, 3, 4, 8], [4, 4, 3, 2]])
    fig = plots.bits_heatmap(bits, layer_labels=[5, 6], scores=np.arange(8.0).reshape(2, 4))
    trace = fig.data[0]
    assert list(trace.colorbar.ticktext) == ["2", "3", "4", "8"]
    assert list(trace.colorbar.tickvals) == [0, 1, 2, 3]
    z = np.asarray(trace.z)
    assert z[0, 3] == 3 and z[1, 3] == 0  # 8 bits -> band 3, 2 bits -> band 0
    assert (trace.zmin, trace.zmax) == (-0.5, 3.5)
    for k, width in enumerate([2, 3, 4, 8]):  # each band's centre has the width's own colour
        centre = (k + 0.5) / 4
        colour = [c for pos, c in trace.colorscale if pos <= centre][-1]
        assert colour == plots.BIT_COLORS[width]
    hover = _cell(fig, 1, 2)
    assert "layer L6" in hover and "expert E2" in hover and "bits: 3" in hover
    assert "score: 6" in hover


def test_bits_heatmap_without_scores_omits_score_line():
    fig = plots.bits_heatmap(np.full((2, 3), 16))
    assert "score" not in _cell(fig, 0, 0)
    assert list(fig.data[0].colorbar.ticktext) == ["16"]


@pytest.mark.parametrize("bits", [[[2.5, 4]], [[0, 4]], [[np.nan, 4]]])
def test_bits_heatmap_rejects_non_positive_integers(bits):
    with pytest.raises(ValueError, match="positive integers"):
        plots.bits_heatmap(np.array(bits))


# ---------------------------------------------------------------- compare / rank_correlation


def test_compare_title_carries_spearman(scores):
    other = scores + np.random.default_rng(2).normal(scale=0.5, size=scores.shape)
    rho = stats.spearmanr(scores.ravel(), other.ravel()).statistic
    fig = plots.compare_heatmaps(scores, other, names=("frobenius", "hessian"))
    assert f"ρ = {rho:.3f}" in fig.layout.title.text
    assert [a.text for a in fig.layout.annotations] == ["frobenius", "hessian"]
    left, right = fig.data
    assert left.colorbar.x != right.colorbar.x  # two independent colour scales
    assert "frobenius:" in _cell(fig, 0, 0, 0) and "hessian:" in _cell(fig, 0, 0, 1)


def test_compare_constant_map_says_na(scores):
    fig = plots.compare_heatmaps(np.ones((3, 8)), scores)
    assert "ρ = n/a" in fig.layout.title.text


def test_rank_correlation_matches_scipy_and_ignores_nan(scores):
    assert plots.rank_correlation(scores, scores ** 3) == pytest.approx(1.0)
    assert plots.rank_correlation(scores, -scores) == pytest.approx(-1.0)
    other = scores + np.random.default_rng(3).normal(size=scores.shape)
    other[0, 0] = np.nan
    keep = ~np.isnan(other)
    expected = stats.spearmanr(scores[keep], other[keep]).statistic
    assert plots.rank_correlation(scores, other) == pytest.approx(expected)
    assert plots.rank_correlation(np.ones((2, 2)), scores[:2, :2]) is None


# ---------------------------------------------------------------- memory / pareto / bars


def test_memory_breakdown_in_mb_with_reference():
    quant = {"attention": 1_000_000, "routed_experts": 5_250_000, "lm_head": 2_000_000,
             "norm": 0}
    bf16 = {"attention": 4_000_000, "routed_experts": 21_000_000, "lm_head": 8_000_000}
    fig = plots.memory_breakdown(quant, reference=bf16)
    assert [t.name for t in fig.data] == ["routed experts", "attention", "lm_head"]  # no "norm"
    experts = fig.data[0]
    assert list(experts.x) == pytest.approx([5.25, 21.0])
    assert list(experts.y) == ["this model", "bf16<br>33 MB"]  # "this model": in the title
    assert ":.3f} MB" in experts.hovertemplate
    assert "4.00x smaller than bf16" in fig.layout.title.text
    assert fig.layout.barmode == "stack"


@pytest.mark.parametrize("breakdown", [{}, {"attention": -1}, {"attention": "1 MB"}])
def test_memory_breakdown_rejects_bad_counts(breakdown):
    with pytest.raises(ValueError):
        plots.memory_breakdown(breakdown)


def test_pareto_marks_the_current_point():
    points = [{"gb": 2.0, "predicted_loss": 0.1, "avg_bits": 4.0},
              {"gb": 1.0, "predicted_loss": 0.3, "avg_bits": 2.0},
              {"gb": 1.5, "predicted_loss": 0.2, "avg_bits": 3.0}]
    current = {"gb": 1.5, "predicted_loss": 0.2, "avg_bits": 3.0}
    fig = plots.pareto_curve(points, current=current)
    frontier, star = fig.data
    assert list(frontier.x) == [1.0, 1.5, 2.0]  # sorted along memory
    assert "avg bits: 2.00" in frontier.text[0] and "GB: 1.0000" in frontier.text[0]
    assert star.marker.symbol == "star" and (star.x[0], star.y[0]) == (1.5, 0.2)
    assert star.text == ("current: 3.00 bits",) and "markers+text" in star.mode
    assert "avg bits: 3.00" in star.customdata[0] and "%{customdata}" in star.hovertemplate
    assert not fig.layout.annotations  # the label is the star's own (one restyle moves both)
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text


def test_pareto_without_current_has_one_trace():
    fig = plots.pareto_curve([{"gb": 1.0, "predicted_loss": 0.3}, {"gb": 2.0,
                                                                   "predicted_loss": 0.1}])
    assert len(fig.data) == 1 and len(fig.layout.annotations) == 0


def test_pareto_of_one_bit_width_is_a_readable_single_point():
    point = {"gb": 0.0016, "predicted_loss": 0.02, "avg_bits": 8.0}
    fig = plots.pareto_curve([point], current=point, unit="MB")
    assert "One allocation only" in fig.layout.title.text
    lo, hi = fig.layout.xaxis.range
    assert lo < 1.6 < hi and hi - lo > 0.1  # the axis spans the point, not zero width
    assert any("two or more bit widths" in a.text for a in fig.layout.annotations)


def test_pareto_and_memory_in_one_unit():
    points = [{"gb": 0.0014, "predicted_loss": 0.1}, {"gb": 0.0016, "predicted_loss": 0.05}]
    fig = plots.pareto_curve(points, unit="MB", score_name="hessian")
    assert list(fig.data[0].x) == pytest.approx([1.4, 1.6])
    assert fig.layout.xaxis.title.text == "weights (MB)" and "hessian" in fig.layout.title.text
    mem = plots.memory_breakdown({"routed_experts": 3 * 10**9}, unit="GB")
    assert mem.data[0].x == (3.0,) and "GB" in mem.layout.xaxis.title.text
    assert plots.unit_for(4.4e6) == "MB" and plots.unit_for(6e10) == "GB"
    with pytest.raises(ValueError, match="unit"):
        plots.memory_breakdown({"routed_experts": 1}, unit="KiB")


def test_results_bars_group_runs_by_category():
    runs = {"bf16": {"existence": 190.0, "count": 150.0},
            "mixed 2/3/4": {"existence": 170.0}}
    fig = plots.results_bars(runs, title="MME")
    assert [t.name for t in fig.data] == ["bf16", "mixed 2/3/4"]
    assert list(fig.data[1].x) == ["existence", "count"]
    assert list(fig.data[1].y) == [170.0, None]
    assert tuple(fig.layout.yaxis.range) == (0, 200) and fig.layout.barmode == "group"
    with pytest.raises(ValueError, match=r"\[0, 200\]"):
        plots.results_bars({"bf16": {"existence": 250.0}})


def test_tradeoff_scatter_draws_baseline_apart():
    runs = [{"method": "bf16", "avg_bits": 16.0, "gb": 1.0, "score": 600.0, "baseline": True},
            {"method": "kmeans", "avg_bits": 3.04, "gb": 0.3, "score": 550.0},
            {"method": "uniform", "avg_bits": 3.0, "gb": 0.29, "score": 500.0}]
    fig = plots.tradeoff_scatter(runs)
    by_name = {t.name: t for t in fig.data}
    assert set(by_name) == {"baseline", "kmeans", "uniform"}
    assert by_name["baseline"].marker.symbol == "diamond"
    assert by_name["kmeans"].marker.symbol == ("circle",)  # no mode given: RTN's circle
    assert by_name["kmeans"].text[0] == "kmeans · 3.04 b"
    assert fig.layout.xaxis.title.text == "weights (GB)"


def test_tradeoff_scatter_marks_modes_keeps_labels_and_plots_kl():
    runs = [{"method": "baseline", "avg_bits": 16.0, "gb": 0.0044, "score": 600.0,
             "baseline": True},
            {"method": "kmeans", "avg_bits": 3.0, "gb": 0.0014, "score": 550.0, "kl": 0.02,
             "mode": "rtn"},
            {"method": "kmeans", "avg_bits": 3.0, "gb": 0.0014, "score": 560.0, "kl": 0.01,
             "mode": "tuned"}]
    fig = plots.tradeoff_scatter(runs, unit="MB")
    kmeans = next(t for t in fig.data if t.name == "kmeans")
    assert kmeans.marker.symbol == ("circle", "square") and kmeans.cliponaxis is False
    assert list(kmeans.x) == pytest.approx([1.4, 1.4]) and "MB" in fig.layout.xaxis.title.text
    lo, hi = fig.layout.yaxis.range
    assert lo < 550 and hi > 600  # room above the top label
    kl = plots.tradeoff_scatter(runs, unit="MB", y="kl")
    assert list(next(t for t in kl.data if t.name == "kmeans").y) == [0.02, 0.01]
    assert "KL" in kl.layout.yaxis.title.text
    with pytest.raises(ValueError, match="y must be"):
        plots.tradeoff_scatter(runs, y="loss")


def test_training_curve_sorts_steps_and_plots_categories():
    curve = [{"step": 500, "score": 612.5, "per_category": {"existence": 150.0, "count": 120.0}},
             {"step": 100, "score": 300.0, "per_category": {"existence": 100.0, "count": 60.0}}]
    fig = plots.training_curve(curve)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["existence"].x) == [100, 500]
    assert list(by_name["count"].y) == [60.0, 120.0]
    assert list(by_name["total"].y) == [300.0, 612.5]
    assert by_name["total"].yaxis == "y2"


# ---------------------------------------------------------------- validation and conventions


@pytest.mark.parametrize("call", [
    lambda: plots.sensitivity_heatmap(np.ones(8), title="1-D"),
    lambda: plots.sensitivity_heatmap(np.ones((0, 8)), title="empty"),
    lambda: plots.sensitivity_heatmap(np.ones((2, 8)), title="t", bits=np.ones((2, 7))),
    lambda: plots.sensitivity_heatmap(np.ones((2, 8)), title="t", stderr=np.ones((3, 8))),
    lambda: plots.sensitivity_heatmap(np.ones((2, 8)), title="t", layer_labels=[0]),
    lambda: plots.sensitivity_heatmap(np.ones((2, 8)), title="t", layer_labels=[1, "L1"]),
    lambda: plots.sensitivity_heatmap(np.array([[1.0, np.inf]]), title="inf"),
    lambda: plots.compare_heatmaps(np.ones((2, 8)), np.ones((2, 4))),
    lambda: plots.rank_correlation(np.ones((2, 8)), np.ones((8, 2))),
    lambda: plots.pareto_curve([]),
    lambda: plots.pareto_curve([{"gb": 1.0}]),
    lambda: plots.pareto_curve([{"gb": 1.0, "predicted_loss": 0.1}], current={"gb": 1.0}),
    lambda: plots.results_bars({}),
    lambda: plots.tradeoff_scatter([]),
    lambda: plots.tradeoff_scatter([{"method": "kmeans", "gb": 1.0}]),
    lambda: plots.training_curve([]),
    lambda: plots.training_curve([{"step": 1}]),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


@pytest.mark.parametrize("build", [
    lambda: plots.sensitivity_heatmap(np.ones((3, 8)), title="t"),
    lambda: plots.bits_heatmap(np.full((3, 8), 4)),
    lambda: plots.compare_heatmaps(np.ones((3, 8)), np.ones((3, 8))),
    lambda: plots.memory_breakdown({"attention": 10, "embeddings_lm_head": 5}),
    lambda: plots.pareto_curve([{"gb": 1.0, "predicted_loss": 0.1}]),
    lambda: plots.pareto_curve([{"gb": 1.0, "predicted_loss": 0.1},
                                {"gb": 2.0, "predicted_loss": 0.0}], unit="MB"),
    lambda: plots.results_bars({"bf16": {"existence": 100.0}}),
    lambda: plots.tradeoff_scatter([{"method": "m", "avg_bits": 3, "gb": 1, "score": 5}]),
    lambda: plots.training_curve([{"step": 1, "score": 2.0}]),
])
def test_figures_share_conventions_and_serialise(build):
    fig = build()
    white = pio.templates["plotly_white"].layout
    assert fig.layout.template.layout.plot_bgcolor == white.plot_bgcolor
    assert fig.layout.template.layout.colorway == white.colorway
    assert len(fig.layout.template.to_plotly_json()["layout"]) < 12  # small: cheap to set
    assert fig.layout.height and fig.layout.height <= 900
    assert fig.layout.margin.t <= 80 and fig.layout.margin.l <= 80
    assert fig.to_json()  # plotly accepts every value we set
