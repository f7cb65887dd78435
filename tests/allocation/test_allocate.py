import itertools
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from mopeq.allocation.allocate import AllocConfig, allocate
from mopeq.allocation.bitmap import BitMap, snap_per_layer
from mopeq.allocation.budget import pareto, predicted_loss
from mopeq.allocation.kmeans import kmeans_1d, spread
from mopeq.allocation.knapsack import solve_mckp
from mopeq.allocation.qerror import quant_errors, rtn
from mopeq.core.memory import MemoryConfig, estimate
from mopeq.model.moe import discover
from tests.helpers import list_moe_from_fused, synthetic_layout, tiny_lm

MEM = MemoryConfig(group_size=32)


@pytest.fixture(scope="module")
def layout():
    return synthetic_layout(layers=3, experts=8)


@pytest.fixture(scope="module")
def problem(layout):
    """Scores and geometric quantization errors (err(b) ~ 4^-b with per-expert noise)."""
    rng = np.random.default_rng(1)
    scores = rng.lognormal(size=(3, 8))
    base = rng.uniform(0.5, 2.0, size=(3, 8, 1))
    errors = base * 4.0 ** -np.array([2, 3, 4]) * rng.uniform(0.8, 1.2, size=(3, 8, 3))
    return scores, errors


def inertia(x, labels):
    return sum(((x[labels == k] - x[labels == k].mean()) ** 2).sum() for k in np.unique(labels))


# ------------------------------------------------------------------------- config validation


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": ()}, "bits is empty"),
    ({"bits": (2, 17)}, "1..16"),
    ({"clusters": 0}, "clusters"),
    ({"scope": "block"}, "scope"),
    ({"method": "magic"}, "method"),
    ({"n_init": 0}, "n_init"),
    ({"method": "budget"}, "exactly one of target_bits or target_gb"),
    ({"method": "budget", "target_bits": 3.0, "target_gb": 1.0}, "exactly one"),
    ({"target_bits": -1.0}, "target_bits"),
    ({"solver": "milp"}, "solver"),
])
def test_bad_configs_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AllocConfig(**kwargs)


def test_bits_are_stored_sorted_and_unique():
    assert AllocConfig(bits=[4, 2, 3, 2]).bits == (2, 3, 4)


def test_more_clusters_than_experts_is_an_error(layout, problem):
    scores, _ = problem
    with pytest.raises(ValueError, match="exceeds the 8 experts"):
        allocate(scores, layout, AllocConfig(clusters=9, scope="layer"))
    with pytest.raises(ValueError, match="exceeds the 24 experts"):
        allocate(scores, layout, AllocConfig(clusters=25))
    assert allocate(scores, layout, AllocConfig(clusters=9)).bits.shape == (3, 8)


def test_scores_must_fit_the_layout(layout):
    with pytest.raises(ValueError, match="shape"):
        allocate(np.ones((2, 8)), layout)
    bad = np.ones((3, 8))
    bad[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        allocate(bad, layout)
    with pytest.raises(ValueError, match="scores > 0"):
        allocate(np.zeros((3, 8)), layout, AllocConfig(log_scores=True))


# ---------------------------------------------------------------------------------- k-means


def test_most_sensitive_cluster_gets_most_bits(layout):
    rng = np.random.default_rng(0)
    groups = np.array([0.1, 1.0, 10.0])
    which = rng.permutation(np.arange(24) % 3).reshape(3, 8)
    scores = groups[which] * rng.uniform(0.95, 1.05, size=(3, 8))
    bm = allocate(scores, layout)
    np.testing.assert_array_equal(bm.bits, np.array([2, 3, 4])[which])
    np.testing.assert_array_equal(bm.labels, which)
    assert (np.diff(bm.centroids) > 0).all()
    assert not bm.deployable_fused and bm.method == "kmeans"


def test_kmeans_is_deterministic(layout, problem):
    scores, _ = problem
    a = allocate(scores, layout, AllocConfig(seed=3))
    b = allocate(scores, layout, AllocConfig(seed=3))
    np.testing.assert_array_equal(a.bits, b.bits)
    np.testing.assert_array_equal(a.centroids, b.centroids)


@pytest.mark.parametrize("clusters, expect", [(1, [4]), (2, [2, 4]), (3, [2, 3, 4]),
                                              (4, [2, 3, 3, 4]), (5, [2, 3, 3, 4, 4])])
def test_cluster_count_differs_from_bit_count(layout, clusters, expect):
    scores = np.repeat(10.0 ** np.arange(8), 3)[:24].reshape(3, 8)  # 8 well-separated values
    bm = allocate(scores, layout, AllocConfig(clusters=clusters))
    by_rank = [int(bm.bits[bm.labels == k][0]) for k in range(clusters)]
    assert by_rank == expect
    assert spread(np.arange(clusters), clusters, 3).tolist() == [b - 2 for b in expect]


def test_fewer_distinct_scores_than_clusters(layout):
    two = np.where(np.arange(24).reshape(3, 8) % 2 == 0, 1.0, 5.0)
    bm = allocate(two, layout, AllocConfig(clusters=3))
    assert bm.meta["effective_clusters"] == 2
    np.testing.assert_array_equal(bm.bits, np.where(two == 1.0, 2, 4))
    flat = allocate(np.ones((3, 8)), layout, AllocConfig(clusters=3, scope="layer"))
    assert flat.meta["effective_clusters"] == [1, 1, 1] and (flat.bits == 4).all()
    assert np.isnan(flat.centroids[:, :2]).all()


def test_model_wise_and_layer_wise_differ_as_they_should():
    layout = synthetic_layout(layers=2, experts=8)
    quiet = np.linspace(0.1, 0.3, 8)  # a layer much less sensitive than the other
    loud = np.array([10, 11, 12, 20, 21, 30, 31, 32.0])
    scores = np.stack([quiet, loud])
    model = allocate(scores, layout, AllocConfig(scope="model"))
    layer = allocate(scores, layout, AllocConfig(scope="layer"))
    assert (model.bits[0] == 2).all() and (model.bits[1] >= 3).all()
    for row in layer.bits:
        assert set(row.tolist()) == {2, 3, 4}
    assert layer.centroids.shape == (2, 3) and model.centroids.shape == (3,)


def test_log_scores_balance_heavy_tailed_scores(layout):
    scores = 10.0 ** np.linspace(-3, 3, 24).reshape(3, 8)
    raw = allocate(scores, layout)
    logged = allocate(scores, layout, AllocConfig(log_scores=True))
    assert (raw.bits == 2).sum() > 12  # raw k-means puts most of a heavy tail at the bottom
    assert sorted(logged.bit_counts.values()) == [8, 8, 8]


def test_kmeans_1d_finds_the_optimum_of_small_problems():
    rng = np.random.default_rng(2)
    for trial in range(20):
        x = np.sort(rng.lognormal(size=9))
        best = min(inertia(x, np.repeat([0, 1, 2], [i, j - i, 9 - j]))
                   for i, j in itertools.combinations(range(1, 9), 2))
        labels, centers = kmeans_1d(x, 3, seed=trial)
        assert inertia(x, labels) == pytest.approx(best, rel=1e-9)
        assert (np.diff(centers) > 0).all()


@pytest.mark.slow  # importing scikit-learn takes seconds
def test_kmeans_1d_matches_scikit_learn():
    from sklearn.cluster import KMeans

    rng = np.random.default_rng(3)
    for k in (2, 3, 5):
        x = rng.lognormal(size=300)
        ours, _ = kmeans_1d(x, k, seed=0)
        ref = KMeans(k, n_init=10, random_state=0).fit(x[:, None])
        assert inertia(x, ours) <= ref.inertia_ * (1 + 1e-9)
        order = np.argsort(ref.cluster_centers_.ravel())
        np.testing.assert_array_equal(ours, np.argsort(order)[ref.labels_])


def test_frequency_gives_frequent_experts_more_bits(layout):
    freq = np.tile(np.array([1, 1, 1, 50, 50, 100, 100, 100.0]), (3, 1))
    bm = allocate(freq, layout, AllocConfig(method="frequency"))
    assert bm.method == "frequency"
    assert (bm.bits[:, :3] == 2).all() and (bm.bits[:, 5:] == 4).all()


def test_scores_object_is_accepted(layout, problem):
    scores, _ = problem
    obj = SimpleNamespace(scores=scores, method="frobenius")
    bm = allocate(obj, layout)
    np.testing.assert_array_equal(bm.bits, allocate(scores, layout).bits)
    assert bm.meta["scores"] == "frobenius"


# ---------------------------------------------------------------------------------- budget


def brute_force(costs, losses, capacity):
    best = np.inf
    for pick in itertools.product(range(costs.shape[1]), repeat=len(costs)):
        rows = np.arange(len(costs))
        if costs[rows, pick].sum() <= capacity:
            best = min(best, losses[rows, pick].sum())
    return best


def test_solvers_agree_with_brute_force_on_small_cases():
    rng = np.random.default_rng(4)
    for _ in range(25):
        n, b = rng.integers(2, 7), rng.integers(2, 4)
        costs = np.sort(rng.integers(1, 9, size=(n, b)), axis=1)
        losses = rng.uniform(0, 1, size=(n, b))  # not monotone, not convex: worst case
        capacity = int(rng.integers(costs.min(1).sum(), costs.max(1).sum() + 1))
        best = brute_force(costs, losses, capacity)
        rows = np.arange(n)
        for solver in ("dp", "greedy"):
            pick, info = solve_mckp(costs, losses, capacity, solver)
            loss = losses[rows, pick].sum()
            assert costs[rows, pick].sum() <= capacity
            assert loss >= best - 1e-9
            assert loss <= best + info["gap_bound"] + 1e-9
            assert info["lower_bound"] <= best + 1e-9
            if solver == "dp":
                assert loss == pytest.approx(best)


def test_greedy_fills_leftover_room_without_overflowing():
    # A's step (cost 10) does not fit in 5; B's and C's (cost 3 each) fit alone, not together
    costs = np.array([[0, 10], [0, 3], [0, 3]])
    losses = np.array([[10.0, 0.0], [2.4, 0.0], [2.4, 0.0]])
    pick, info = solve_mckp(costs, losses, 5, "greedy")
    assert pick.tolist() == [0, 1, 0]
    assert info["lower_bound"] == pytest.approx(14.8 - 5 / 10 * 10)  # LP: half of A
    assert info["gap_bound"] == pytest.approx(12.4 - 9.8)


def test_greedy_is_exact_on_convex_errors():
    rng = np.random.default_rng(5)
    n = 7
    costs = np.tile([2, 3, 4], (n, 1))
    losses = rng.uniform(0.5, 2, size=(n, 1)) * 4.0 ** -np.array([2, 3, 4])
    for capacity in range(14, 29):
        pick, info = solve_mckp(costs, losses, capacity, "greedy")
        assert losses[np.arange(n), pick].sum() == pytest.approx(
            brute_force(costs, losses, capacity))


def test_budget_meets_its_bits_target_and_beats_baselines(layout, problem):
    scores, errors = problem
    for target in (2.5, 3.0, 3.4):
        bm = allocate(scores, layout, AllocConfig(method="budget", target_bits=target),
                      errors=errors)
        assert bm.avg_bits <= target + 1e-9
        assert bm.meta["solver"] == "dp" and bm.meta["gap_bound"] == 0.0  # small: exact
        loss = predicted_loss(bm, scores, errors, (2, 3, 4))
        assert loss == pytest.approx(bm.meta["predicted_loss"])
        rand = allocate(scores, layout, AllocConfig(method="random", seed=7), reference=bm)
        assert rand.avg_bits == pytest.approx(bm.avg_bits)
        assert loss <= predicted_loss(rand, scores, errors, (2, 3, 4))
        km = allocate(scores, layout)
        if km.avg_bits <= target:
            assert loss <= predicted_loss(km, scores, errors, (2, 3, 4))
    uni = allocate(scores, layout, AllocConfig(method="uniform", uniform_bits=3))
    bm3 = allocate(scores, layout, AllocConfig(method="budget", target_bits=3.0), errors=errors)
    assert predicted_loss(bm3, scores, errors, (2, 3, 4)) < predicted_loss(uni, scores, errors,
                                                                           (2, 3, 4))


def test_budget_brute_force_through_allocate():
    layout = synthetic_layout(layers=2, experts=3)
    rng = np.random.default_rng(6)
    scores = rng.lognormal(size=(2, 3))
    errors = rng.uniform(0.1, 1, size=(2, 3, 1)) * 4.0 ** -np.array([2, 3, 4])
    for target in (2.0, 2.5, 3.0, 3.5, 4.0):
        combos = [np.array(p).reshape(2, 3) for p in itertools.product((2, 3, 4), repeat=6)
                  if np.mean(p) <= target + 1e-9]
        losses = [(scores * np.take_along_axis(errors, (c - 2)[..., None], -1)[..., 0]).sum()
                  for c in combos]
        for solver in ("dp", "greedy"):
            bm = allocate(scores, layout, AllocConfig(method="budget", target_bits=target,
                                                      solver=solver), errors=errors)
            assert bm.meta["predicted_loss"] == pytest.approx(min(losses))


def test_budget_meets_a_gb_target(layout, problem):
    scores, errors = problem
    cfg_mem = MEM
    lo = estimate(layout, np.full((3, 8), 2), cfg_mem).gb
    hi = estimate(layout, np.full((3, 8), 4), cfg_mem).gb
    for frac in (0.0, 0.3, 0.7, 1.0):
        target = lo + frac * (hi - lo)
        bm = allocate(scores, layout, AllocConfig(method="budget", target_gb=target,
                                                  memory=cfg_mem), errors=errors)
        assert estimate(layout, bm, cfg_mem).gb <= target + 1e-12
    with pytest.raises(ValueError, match="below the minimum achievable"):
        allocate(scores, layout, AllocConfig(method="budget", target_gb=lo * 0.9,
                                             memory=cfg_mem), errors=errors)


def test_budget_rejects_impossible_targets_and_missing_errors(layout, problem):
    scores, errors = problem
    with pytest.raises(ValueError, match=r"below the minimum achievable 2"):
        allocate(scores, layout, AllocConfig(method="budget", target_bits=1.5), errors=errors)
    with pytest.raises(ValueError, match="needs errors="):
        allocate(scores, layout, AllocConfig(method="budget", target_bits=3.0))
    with pytest.raises(ValueError, match="errors have shape"):
        allocate(scores, layout, AllocConfig(method="budget", target_bits=3.0),
                 errors=errors[..., :2])


def test_greedy_at_scale_is_certified_and_beats_uniform():
    layout = synthetic_layout(layers=12, experts=64, tensors=())
    rng = np.random.default_rng(8)
    scores = rng.lognormal(size=(12, 64))
    errors = rng.uniform(0.5, 2, size=(12, 64, 1)) * 4.0 ** -np.array([2, 3, 4])
    bm = allocate(scores, layout, AllocConfig(method="budget", target_bits=3.0, solver="greedy"),
                  errors=errors)
    uni = allocate(scores, layout, AllocConfig(method="uniform", uniform_bits=3))
    assert bm.meta["solver"] == "greedy" and bm.avg_bits <= 3.0
    assert bm.meta["gap_bound"] <= 1e-6 * bm.meta["predicted_loss"]
    assert bm.meta["predicted_loss"] < predicted_loss(uni, scores, errors, (2, 3, 4))


# ---------------------------------------------------------------------------------- pareto


def test_pareto_frontier_is_monotone_and_reproducible(layout, problem):
    scores, errors = problem
    pts = pareto(scores, errors, layout, (2, 3, 4), MEM, n_points=12)
    assert 2 <= len(pts) <= 12
    assert all(a["bytes"] < b["bytes"] for a, b in itertools.pairwise(pts))
    assert all(a["predicted_loss"] >= b["predicted_loss"] for a, b in itertools.pairwise(pts))
    assert pts[0]["avg_bits"] == 2.0 and pts[-1]["avg_bits"] == 4.0
    assert pts[0]["bytes"] == estimate(layout, np.full((3, 8), 2), MEM).total_bytes
    for p in pts[1:-1]:
        bm = allocate(scores, layout, AllocConfig(method="budget", target_gb=p["gb"],
                                                  memory=MEM), errors=errors)
        assert bm.meta["predicted_loss"] == pytest.approx(p["predicted_loss"])


# ------------------------------------------------------------------------------- baselines


def test_uniform_is_uniform_and_deployable(layout, problem):
    bm = allocate(problem[0], layout, AllocConfig(method="uniform", uniform_bits=3))
    assert (bm.bits == 3).all() and bm.deployable_fused and bm.avg_bits == 3.0


def test_random_keeps_the_reference_multiset(layout, problem):
    scores, _ = problem
    ref = allocate(scores, layout)
    a = allocate(scores, layout, AllocConfig(method="random", seed=1), reference=ref)
    b = allocate(scores, layout, AllocConfig(method="random", seed=1), reference=ref)
    c = allocate(scores, layout, AllocConfig(method="random", seed=2), reference=ref)
    assert sorted(a.bits.ravel()) == sorted(ref.bits.ravel())
    assert a.avg_bits == ref.avg_bits
    np.testing.assert_array_equal(a.bits, b.bits)
    assert not np.array_equal(a.bits, c.bits) and not np.array_equal(a.bits, ref.bits)
    per_layer = allocate(scores, layout, AllocConfig(method="random", scope="layer"),
                         reference=ref)
    for row, ref_row in zip(per_layer.bits, ref.bits, strict=True):
        assert sorted(row) == sorted(ref_row)
    default = allocate(scores, layout, AllocConfig(method="random"))
    assert default.avg_bits == ref.avg_bits


# ------------------------------------------------------------------------------------ snap


def test_snap_per_layer_rules(layout):
    bits = np.array([[2, 2, 2, 2, 3, 3, 3, 3], [2, 2, 2, 2, 2, 2, 2, 4], [4] * 8])
    bm = BitMap(bits, "kmeans", meta={"bit_set": [2, 3, 4]})
    assert not bm.deployable_fused
    mean = snap_per_layer(bm, layout)
    assert mean.deployable_fused
    assert mean.bits[:, 0].tolist() == [3, 2, 4]  # means 2.5 (a tie: up), 2.25, 4
    assert snap_per_layer(bm, layout, "max").bits[:, 0].tolist() == [3, 4, 4]
    assert snap_per_layer(bm, layout, "min").bits[:, 0].tolist() == [2, 2, 4]
    assert mean.meta["snapped"] == "mean"
    with pytest.raises(ValueError, match="rule"):
        snap_per_layer(bm, layout, "median")


# ---------------------------------------------------------------------------------- BitMap


def test_bitmap_json_round_trip(layout, problem):
    scores, _ = problem
    for scope in ("model", "layer"):
        bm = allocate(np.round(scores, 1), layout, AllocConfig(scope=scope, clusters=4))
        d = json.loads(json.dumps(bm.to_json()))
        for key in ("bits", "avg_bits", "deployable_fused", "method"):
            assert key in d
        back = BitMap.from_json(d)
        np.testing.assert_array_equal(back.bits, bm.bits)
        np.testing.assert_array_equal(back.labels, bm.labels)
        np.testing.assert_array_equal(back.centroids, bm.centroids)
        assert back.avg_bits == bm.avg_bits and back.meta == bm.meta


def test_avg_bits_is_weighted_by_expert_size():
    bm = BitMap(np.array([[2, 4]]), "x", numel=np.array([[3, 1]]))
    assert bm.avg_bits == pytest.approx(2.5)
    back = BitMap.from_json(json.loads(json.dumps(bm.to_json())))
    assert back.avg_bits == pytest.approx(2.5)
    with pytest.raises(ValueError, match="1..16"):
        BitMap(np.array([[0, 4]]), "x")


def test_clusters_table(layout, problem):
    scores, _ = problem
    bm = allocate(scores, layout)
    rows = bm.clusters_table(scores)
    assert [r["cluster"] for r in rows] == [0, 1, 2] and [r["bits"] for r in rows] == [2, 3, 4]
    assert sum(r["experts"] for r in rows) == 24
    assert all(a["score_max"] < b["score_min"] for a, b in itertools.pairwise(rows))
    assert all(r["score_min"] <= r["centroid"] <= r["score_max"] for r in rows)
    uni = allocate(scores, layout, AllocConfig(method="uniform"))
    assert uni.clusters_table(scores) == [{"cluster": None, "bits": 4, "experts": 24,
                                           "score_min": scores.min(), "score_max": scores.max(),
                                           "centroid": None}]


# ----------------------------------------------------------------------- quantization errors


def test_rtn_by_hand():
    w = torch.tensor([[-1.0, 0.5, 0.25, 0.0]])
    torch.testing.assert_close(rtn(w, 2, 4, sym=True), torch.tensor([[-1.0, 0.5, 0.0, 0.0]]))
    torch.testing.assert_close(rtn(w, 2, 4, sym=False), torch.tensor([[-1.0, 0.5, 0.0, 0.0]]))
    w = torch.tensor([[1.0, -0.3, 0.6, 0.1]])  # max magnitude positive: maps to -2^(b-1)
    torch.testing.assert_close(rtn(w, 3, 4), torch.tensor([[1.0, -0.25, 0.5, 0.0]]))
    with pytest.raises(ValueError, match="divide"):
        rtn(torch.zeros(2, 6), 4, 4)


@pytest.fixture(scope="module")
def olmoe():
    model = tiny_lm("olmoe")
    return model, discover(model)


def test_quant_errors_shape_order_and_rules(olmoe):
    model, layout = olmoe
    err = quant_errors(model, layout, (4, 2, 3, 16), group_size=32)
    assert err.shape == (2, 8, 4)
    assert (err[..., 0] > err[..., 1]).all() and (err[..., 1] > err[..., 2]).all()
    assert (err[..., 3] == 0).all()  # 16 bits: no error
    assert (quant_errors(model, layout, (2,), group_size=256) == 0).all()  # no in % 256 == 0


def test_quant_errors_same_for_fused_and_module_list_experts(olmoe):
    model, layout = olmoe
    listed = list_moe_from_fused(tiny_lm("olmoe"))
    a = quant_errors(model, layout, (2, 4), group_size=32)
    b = quant_errors(listed, discover(listed), (2, 4), group_size=32)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_quant_errors_are_cached_by_fingerprint(olmoe, monkeypatch):
    model, layout = olmoe
    first = quant_errors(model, layout, (2, 3), group_size=32, fingerprint="fp-test")

    def boom(*args, **kwargs):
        raise AssertionError("recomputed despite a cache entry")

    from mopeq.allocation import qerror

    monkeypatch.setattr(qerror, "_compute_errors", boom)
    np.testing.assert_array_equal(
        quant_errors(model, layout, (2, 3), group_size=32, fingerprint="fp-test"), first)
    with pytest.raises(AssertionError):
        quant_errors(model, layout, (2, 3), group_size=64, fingerprint="fp-test")


@pytest.mark.slow
def test_rtn_matches_auto_round():
    from auto_round.data_type.int import quant_tensor_asym, quant_tensor_sym

    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(64, 1)
    for bits in (2, 3, 4, 8):
        for group in (32, 128):
            ref_sym = quant_tensor_sym(w.clone(), bits=bits, group_size=group)[0]
            torch.testing.assert_close(rtn(w, bits, group, sym=True), ref_sym, rtol=0, atol=0)
            ref_asym = quant_tensor_asym(w.clone(), bits=bits, group_size=group)[0]
            torch.testing.assert_close(rtn(w, bits, group, sym=False), ref_asym, rtol=0, atol=0)


def test_signature_defaults_are_the_run_defaults():
    import inspect

    from mopeq.allocation import qerror
    from mopeq.core import defaults as D
    from mopeq.sensitivity import expert_quant, report

    def default(fn, name):
        return inspect.signature(fn).parameters[name].default

    for fn in (qerror.rtn, qerror.quant_errors, expert_quant.experts_quantized,
               expert_quant.expert_quantized, expert_quant.bitmap_quantized):
        assert (default(fn, "group_size"), default(fn, "sym")) == (D.GROUP_SIZE, D.SYM)
    assert default(qerror.quant_errors, "bits") == default(pareto, "bits") == D.BITS
    cfg = report.ReportConfig()
    assert (cfg.bits, cfg.group_size, cfg.sym) == (D.BITS, D.GROUP_SIZE, D.SYM)


def test_user_errors_are_mopeq_errors(layout, problem):
    from mopeq.core.errors import MopeqError
    from mopeq.model.loading import ModelLoadError
    from mopeq.model.moe import NotMoEError
    from mopeq.sensitivity.estimators import NoExpertGradient
    from mopeq.sensitivity.measured import CostTooHigh

    scores, errors = problem
    with pytest.raises(MopeqError, match="method"):
        AllocConfig(method="nope")
    with pytest.raises(MopeqError, match="clusters"):
        allocate(scores, layout, AllocConfig(clusters=25))
    with pytest.raises(MopeqError, match="target_bits"):
        allocate(scores, layout, AllocConfig(method="budget", target_bits=1.0), errors=errors)
    assert all(issubclass(e, MopeqError)
               for e in (ModelLoadError, NotMoEError, NoExpertGradient, CostTooHigh))


def test_inverted_gives_the_most_sensitive_cluster_the_fewest_bits(layout):
    """``inverted``: one table row + one handler (issue #14's proof of a new method)."""
    from mopeq.core import methods

    rng = np.random.default_rng(3)
    scores = rng.lognormal(size=(layout.num_moe_layers, layout.num_experts))
    for scope in ("model", "layer"):
        cfg = dict(clusters=3, bits=(2, 3, 4), scope=scope, seed=1)
        ref = allocate(scores, layout, AllocConfig(method="kmeans", **cfg))
        inv = allocate(scores, layout, AllocConfig(method="inverted", **cfg))
        assert np.array_equal(inv.labels, ref.labels)  # the same clusters
        mirror = {2: 4, 3: 3, 4: 2}
        assert np.array_equal(inv.bits, np.vectorize(mirror.get)(ref.bits))
        top = scores == scores.max()
        assert (inv.bits[top] == 2).all() and (ref.bits[top] == 4).all()
    assert "inverted" in methods.ALLOC_NAMES


def test_a_new_allocation_method_reaches_every_surface():
    """The table row is all the CLI, the page's controls and the spec need."""
    from mopeq.app import view
    from mopeq.cli import build_parser
    from mopeq.workflow.spec import RunSpec

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert "inverted" in sub.choices["allocate"]._option_string_actions["--method"].choices
    shown = view.alloc_controls("inverted")
    assert shown["clusters"] and shown["seed"] and not shown["target_bits"]
    assert shown["score_source"] and not shown["uniform_bits"]
    assert RunSpec(alloc_method="inverted").alloc_config().method == "inverted"
