"""Allocate bits to routed experts: sensitivity scores (MoE layer x expert) -> ``BitMap``.

Methods (``AllocConfig.method``):

- ``kmeans`` (MoPEQ): C clusters over the expert scores, one clustering over all experts
  (``scope="model"``) or one per MoE layer (``scope="layer"``); the most sensitive cluster gets
  the most bits. Optionally on log-scores. Deterministic: scikit-learn's recipe (greedy
  k-means++ seeding, Lloyd, the best of ``n_init`` restarts, ``np.random.default_rng(seed)``)
  specialised to 1-D: on sorted values a Lloyd step is a few ``searchsorted`` calls, so a
  model-wise clustering of 15k experts takes milliseconds instead of scikit-learn's ~60 ms
  (seconds when its OpenMP threads compete for busy cores); the tests check that it finds the
  optimum of small problems and matches scikit-learn's partition.
- ``frequency``: the same clustering on routing-frequency scores (the caller passes them).
- ``budget``: per-expert bits minimising the predicted loss ``sum_e score_e * err_e(b_e)``
  (HAWQ-V2 style; ``err`` from ``quant_errors``) under a target in average bits or GB; an exact
  dynamic programme when it is small, else the convex-hull greedy with a certified gap. When
  the scores carry the method's own per-width errors (``Scores.errors``: ``measured``,
  ``block_error``, ``block_fisher``; ``mopeq.core.methods`` ``provides_errors``), the predicted
  loss is ``sum_e eps_e(b_e)`` with those errors directly, no score x error product
  (``meta["loss_model"]`` says which was used; ``pareto`` and ``predicted_loss`` follow).
- ``uniform``: every expert at ``uniform_bits``.
- ``random``: a seeded permutation of a reference map's bits (same multiset, so the same
  average bits), over the whole model or within each layer (``scope``).

Documented mapping rules:

- *Clusters to bits.* Clusters are ranked by centroid (0 = least sensitive). With C clusters and
  B sorted widths, rank r gets width index ``round(r * (B - 1) / (C - 1))``, halves rounded up
  (towards more bits): the least sensitive cluster gets the fewest bits, the most sensitive the
  most, ranks in between spread evenly (C=2, {2,3,4}: 2 and 4; C=4: 2, 3, 3, 4). A single
  cluster (C=1) gets the most bits.
- *Fewer distinct scores than clusters.* K-means runs with C' = the number of distinct values
  (in the clustering scope); its ranks are spread onto the C labels by the same rule, then to
  bits (so all-equal scores, C'=1, give the most bits). ``meta["effective_clusters"]`` says so.
  C larger than the number of experts in the scope is an error.
- *Per-layer snap* (``snap_per_layer``): ``mean`` = the layer's numel-weighted mean width rounded
  to the nearest allowed width (ties up); ``max`` never loses precision; ``min`` never gains.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from mopeq.allocation.knapsack import DP_MAX_CELLS, DP_MAX_ITEMS, SOLVERS, _hull_steps, solve_mckp
from mopeq.allocation.loss_model import loss_table, method_errors
from mopeq.allocation.qerror import quant_errors, rtn
from mopeq.core import defaults as D
from mopeq.core.layout import MoELayout, bitmap_array, deployable_fused
from mopeq.core.memory import (
    FP_BITS,
    LayoutArrays,
    MemoryConfig,
    bit_set,
    expert_cost_table,
    fixed_bits,
)

METHODS = ("kmeans", "budget", "uniform", "frequency", "random")
SCOPES = ("model", "layer")
SNAP_RULES = ("mean", "max", "min")


@dataclass(frozen=True)
class AllocConfig:
    """How to allocate bits (validated on construction; ``bits`` is stored sorted, unique).

    Attributes:
        method: kmeans | budget | uniform | frequency | random.
        clusters: C, the number of k-means clusters.
        bits: the allowed widths; errors[..., j] of ``quant_errors`` follow their sorted order.
        scope: ``model`` (one clustering / permutation over all experts) or ``layer``.
        log_scores: cluster on log(score) (scores must be > 0).
        target_bits: budget target, numel-weighted average bits of the routed experts.
        target_gb: budget target, whole-model size in GB (1e9 bytes) per ``memory``.
        uniform_bits: width of the ``uniform`` baseline.
        seed: seeds k-means++ and ``random``.
        n_init: k-means restarts (the best inertia wins).
        memory: storage settings (group size, base bits) for GB targets.
        solver: budget solver: auto (exact DP when small, else greedy) | dp | greedy.
    """

    method: str = D.ALLOC_METHOD
    clusters: int = D.CLUSTERS
    bits: tuple[int, ...] = D.BITS
    scope: str = D.SCOPE
    log_scores: bool = False
    target_bits: float | None = None
    target_gb: float | None = None
    uniform_bits: int = D.UNIFORM_BITS
    seed: int = D.SEED
    n_init: int = 10
    memory: MemoryConfig = MemoryConfig()
    solver: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "bits", bit_set(self.bits))
        problems = _config_problems(self)
        if problems:
            raise ValueError("invalid AllocConfig: " + "; ".join(problems))

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def _config_problems(c: AllocConfig) -> list[str]:
    def is_int(v) -> bool:
        return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

    checks = [
        (c.method in METHODS, f"method {c.method!r} is not one of {METHODS}"),
        (c.scope in SCOPES, f"scope {c.scope!r} is not one of {SCOPES}"),
        (c.solver in SOLVERS, f"solver {c.solver!r} is not one of {SOLVERS}"),
        (is_int(c.clusters) and c.clusters >= 1, f"clusters must be an int >= 1, got "
                                                 f"{c.clusters!r}"),
        (is_int(c.n_init) and c.n_init >= 1, f"n_init must be an int >= 1, got {c.n_init!r}"),
        (is_int(c.uniform_bits) and 1 <= c.uniform_bits <= FP_BITS,
         f"uniform_bits must be an int in 1..16, got {c.uniform_bits!r}"),
        (c.target_bits is None or c.target_bits > 0, f"target_bits must be > 0, got "
                                                     f"{c.target_bits!r}"),
        (c.target_gb is None or c.target_gb > 0, f"target_gb must be > 0, got {c.target_gb!r}"),
        (c.method != "budget" or (c.target_bits is None) != (c.target_gb is None),
         "method 'budget' needs exactly one of target_bits or target_gb"),
    ]
    return [msg for ok, msg in checks if not ok]


# ------------------------------------------------------------------------------ BitMap


@dataclass(frozen=True, eq=False)
class BitMap:
    """Bits per routed expert and how they were chosen.

    Attributes:
        bits: [MoE layers, experts] ints in 1..16 (16 = kept in 16 bit).
        method: the allocation method.
        labels: [L, E] cluster label per expert (0 = least sensitive, on the 0..C-1 scale),
            or None.
        centroids: k-means centroids in the clustering space ([C] for ``model`` scope,
            [L, C] for ``layer``; NaN for labels no cluster took), or None.
        meta: JSON-ready details (settings, effective clusters, predicted loss, ...).
        numel: [L, E] weights per expert (weights of ``avg_bits``), or None for equal weights.
    """

    bits: np.ndarray
    method: str
    labels: np.ndarray | None = None
    centroids: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    numel: np.ndarray | None = None

    def __post_init__(self):
        bits = np.array(self.bits, dtype=np.int64)
        if bits.ndim != 2 or bits.size == 0:
            raise ValueError(f"bits must be a non-empty [layers, experts] array, got {bits.shape}")
        if bits.min() < 1 or bits.max() > FP_BITS:
            raise ValueError(f"bits must lie in 1..16, got {bits.min()}..{bits.max()}")
        for name, value, dtype in (("bits", bits, None), ("labels", self.labels, np.int64),
                                   ("centroids", self.centroids, float),
                                   ("numel", self.numel, np.int64)):
            if value is not None:
                arr = np.array(value, dtype=dtype or value.dtype)
                arr.setflags(write=False)
                object.__setattr__(self, name, arr)

    @property
    def avg_bits(self) -> float:
        """Average bits per routed-expert weight (weighted by expert numel)."""
        if self.numel is None:
            return float(self.bits.mean())
        return float((self.bits * self.numel).sum() / self.numel.sum())

    @property
    def deployable_fused(self) -> bool:
        """Whether every layer's experts share one width (loadable by vLLM, llama.cpp, ...)."""
        return deployable_fused(self.bits)

    @property
    def bit_counts(self) -> dict[int, int]:
        """Number of experts at each width."""
        values, counts = np.unique(self.bits, return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts, strict=True)}

    def clusters_table(self, scores) -> list[dict]:
        """Rows (cluster, bits, experts, score min/max, centroid) for a per-cluster table.

        One row per (cluster label, width) pair; without labels, one row per width.
        """
        s = _as_array(scores)
        keys = np.stack([self.labels if self.labels is not None else np.full_like(self.bits, -1),
                         self.bits], -1).reshape(-1, 2)
        rows = []
        for label, b in np.unique(keys, axis=0):
            mask = ((keys[:, 0] == label) & (keys[:, 1] == b)).reshape(self.bits.shape)
            centroid = None
            if label >= 0 and self.centroids is not None and self.centroids.ndim == 1:
                centroid = float(self.centroids[label])
            rows.append({"cluster": int(label) if label >= 0 else None, "bits": int(b),
                         "experts": int(mask.sum()), "score_min": float(s[mask].min()),
                         "score_max": float(s[mask].max()), "centroid": centroid})
        return rows

    def to_json(self) -> dict:
        """A JSON-ready dict (round-trips through ``BitMap.from_json``)."""
        numel = self.numel
        uniform = numel is None or bool((numel == numel.flat[0]).all())
        return {"method": self.method, "bits": self.bits.tolist(), "avg_bits": self.avg_bits,
                "deployable_fused": self.deployable_fused,
                "bit_counts": {str(k): v for k, v in self.bit_counts.items()},
                "labels": None if self.labels is None else self.labels.tolist(),
                "centroids": _nan_to_none(self.centroids), "meta": self.meta,
                "numel": None if uniform else numel.tolist()}

    @staticmethod
    def from_json(d: dict) -> BitMap:
        """Inverse of ``to_json``."""
        cents = d.get("centroids")
        if cents is not None:
            cents = np.array(cents, dtype=float)  # None -> nan
        return BitMap(np.array(d["bits"]), d["method"],
                      labels=None if d.get("labels") is None else np.array(d["labels"]),
                      centroids=cents, meta=dict(d.get("meta") or {}),
                      numel=None if d.get("numel") is None else np.array(d["numel"]))


def _nan_to_none(a: np.ndarray | None):
    if a is None:
        return None
    return np.where(np.isnan(a), None, a).tolist()


def _as_array(scores) -> np.ndarray:
    return np.asarray(getattr(scores, "scores", scores), dtype=float)


def scores_array(scores, layout: MoELayout) -> np.ndarray:
    """Scores as a finite float [L, E] array (``scores`` may be a ``Scores`` object).

    Raises:
        ValueError: on a shape that does not match the layout or non-finite values.
    """
    s = bitmap_array(_as_array(scores), layout, "scores")
    if not np.isfinite(s).all():
        raise ValueError(f"scores hold {int((~np.isfinite(s)).sum())} non-finite values")
    return s


def _new_map(bits, layout: MoELayout, method: str, config: AllocConfig, **kw) -> BitMap:
    meta = {"bit_set": list(config.bits), "seed": config.seed, **kw.pop("meta", {})}
    return BitMap(bits, method, numel=LayoutArrays.of(layout).expert_numel, meta=meta, **kw)


# ------------------------------------------------------------------------------ k-means


def spread(rank, n_from: int, n_to: int):
    """Map ranks 0..n_from-1 evenly onto 0..n_to-1 (ends to ends, halves up; n_from=1 -> top)."""
    rank = np.asarray(rank, dtype=np.int64)
    if n_from == 1:
        return np.full_like(rank, n_to - 1)
    return (2 * rank * (n_to - 1) + (n_from - 1)) // (2 * (n_from - 1))


def _kmeanspp(x: np.ndarray, w: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding on weighted 1-D points (as scikit-learn seeds)."""
    trials = 2 + int(np.log(k))
    chosen = [int(rng.choice(len(x), p=w / w.sum()))]
    d2 = (x - x[chosen[0]]) ** 2
    for _ in range(1, k):
        cum = np.cumsum(w * d2)
        cand = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1], side="right"),
                          len(x) - 1)
        d2c = np.minimum(d2, (x[None, :] - x[cand, None]) ** 2)
        best = int(np.argmin((w * d2c).sum(1)))
        chosen.append(int(cand[best]))
        d2 = d2c[best]
    return np.unique(x[chosen])


def _lloyd(x: np.ndarray, w: np.ndarray, centers: np.ndarray,
           max_iter: int = 300) -> tuple[np.ndarray, np.ndarray, float]:
    """Lloyd on sorted 1-D points: clusters are runs between centre midpoints.

    Returns sorted centres, the run boundaries [k+1] and the inertia; empty clusters are dropped.
    """
    cw, cwx = np.concatenate([[0], np.cumsum(w)]), np.concatenate([[0], np.cumsum(w * x)])
    bounds = None
    for _ in range(max_iter):
        cuts = np.searchsorted(x, (centers[:-1] + centers[1:]) / 2, side="right")
        new = np.concatenate([[0], cuts, [len(x)]])
        if bounds is not None and np.array_equal(new, bounds):
            break
        bounds = new
        sw = cw[bounds[1:]] - cw[bounds[:-1]]
        keep = sw > 0
        centers = ((cwx[bounds[1:]] - cwx[bounds[:-1]])[keep] / sw[keep])
        bounds = np.concatenate([[0], bounds[1:][keep]])
    labels = np.repeat(np.arange(len(centers)), np.diff(bounds))
    return centers, bounds, float((w * (x - centers[labels]) ** 2).sum())


def kmeans_1d(values: np.ndarray, k: int, seed: int = 0,
              n_init: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic 1-D k-means: (labels by ascending centre, sorted centres).

    Fewer distinct values than ``k`` give that many clusters; empty clusters are dropped.
    """
    x, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    w = counts.astype(float)
    k = min(k, len(x))
    if k == len(x):
        return inverse.reshape(np.shape(values)), x
    rng, best = np.random.default_rng(seed), None
    for _ in range(n_init):
        centers, bounds, inertia = _lloyd(x, w, _kmeanspp(x, w, k, rng))
        if best is None or inertia < best[2]:
            best = (centers, bounds, inertia)
    centers, bounds, _ = best
    labels = np.repeat(np.arange(len(centers)), np.diff(bounds))
    return labels[inverse].reshape(np.shape(values)), centers


def _cluster(values: np.ndarray, config: AllocConfig) -> tuple[np.ndarray, np.ndarray, int]:
    """Labels on the 0..C-1 scale, centroids [C] (NaN where unused), effective clusters."""
    labels, centers = kmeans_1d(values, config.clusters, config.seed, config.n_init)
    ranks = spread(np.arange(len(centers)), len(centers), config.clusters)
    cents = np.full(config.clusters, np.nan)
    cents[ranks] = centers
    return ranks[labels], cents, len(centers)


def _kmeans_map(s: np.ndarray, layout: MoELayout, config: AllocConfig, method: str) -> BitMap:
    if config.log_scores and (s <= 0).any():
        raise ValueError(f"log_scores needs scores > 0; {int((s <= 0).sum())} are <= 0")
    values = np.log(s) if config.log_scores else s
    n = s.size if config.scope == "model" else s.shape[1]
    if config.clusters > n:
        raise ValueError(f"clusters={config.clusters} exceeds the {n} experts of the "
                         f"clustering scope {config.scope!r}")
    if config.scope == "model":
        labels, cents, eff = _cluster(values, config)
    else:
        parts = [_cluster(row, config) for row in values]
        labels, cents = np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])
        eff = [p[2] for p in parts]
    bits = np.asarray(config.bits)[spread(labels, config.clusters, len(config.bits))]
    meta = {"scope": config.scope, "clusters": config.clusters, "effective_clusters": eff,
            "log_scores": config.log_scores, "n_init": config.n_init}
    return _new_map(bits, layout, method, config, labels=labels, centroids=cents, meta=meta)


# ------------------------------------------------------------------------------ budget

def _budget_costs(layout: MoELayout, config: AllocConfig) -> tuple[np.ndarray, int, str]:
    """Per-expert costs [L, E, B], the capacity, and the target as text."""
    bits = np.asarray(config.bits)
    if config.target_bits is not None:
        numel = LayoutArrays.of(layout).expert_numel
        if config.target_bits < bits[0] - 1e-9:
            raise ValueError(f"target_bits={config.target_bits} is below the minimum "
                             f"achievable {bits[0]} (every expert at {bits[0]} bits)")
        cap = math.floor(config.target_bits * int(numel.sum()) + 1e-6)
        return numel[..., None] * bits, cap, f"{config.target_bits} average bits"
    costs = expert_cost_table(layout, config.bits, config.memory)
    fixed = fixed_bits(layout, config.memory)
    cap = math.floor(config.target_gb * 1e9 + 1e-3) * 8 - fixed  # 1e-3: float slack
    least = int(costs.min(-1).sum())
    if least > cap:
        raise ValueError(f"target_gb={config.target_gb} is below the minimum achievable "
                         f"{math.ceil((least + fixed) / 8) / 1e9:.4g} GB (every expert at "
                         f"{bits[0]} bits, the rest at base {config.memory.base_bits} bits)")
    return costs, cap, f"{config.target_gb} GB"


def _budget_map(s: np.ndarray, layout: MoELayout, config: AllocConfig,
                errors: np.ndarray | None, reference: BitMap | None, scores=None) -> BitMap:
    losses, model = loss_table(s if scores is None else scores, errors, config.bits)
    costs, cap, target = _budget_costs(layout, config)
    b = len(config.bits)
    pick, info = solve_mckp(costs.reshape(-1, b), losses.reshape(-1, b), cap, config.solver)
    bits = np.asarray(config.bits)[pick].reshape(s.shape)
    meta = {"target": target, "predicted_loss": float(losses.reshape(-1, b)[
        np.arange(pick.size), pick].sum()), "negative_scores_clipped": int((s < 0).sum()),
        "loss_model": model, **info}
    return _new_map(bits, layout, "budget", config, meta=meta)


def predicted_loss(bitmap: BitMap, scores, errors: np.ndarray | None,
                   bits: tuple[int, ...]) -> float:
    """``sum_e max(score_e, 0) * err_e(bits_e)``; experts kept at 16 bits count 0.

    With scores that carry their own errors (``method_errors``): ``sum_e eps_e(bits_e)``.

    Raises:
        ValueError: if the map uses a width below 16 that ``bits`` does not hold.
    """
    bits = bit_set(bits)
    lookup = np.full(FP_BITS + 1, -1)
    lookup[list(bits)] = np.arange(len(bits))
    idx = lookup[bitmap.bits]
    if ((idx < 0) & (bitmap.bits < FP_BITS)).any():
        raise ValueError(f"the map uses widths {sorted(set(bitmap.bits.ravel()) - set(bits))} "
                         f"that errors for {bits} do not cover")
    table, _ = loss_table(scores, errors, bits)
    loss = np.take_along_axis(table, np.maximum(idx, 0)[..., None], -1)[..., 0]
    return float(np.where(idx < 0, 0.0, loss).sum())


def pareto(scores, errors: np.ndarray, layout: MoELayout, bits: tuple[int, ...] = (2, 3, 4),
           mem_config: MemoryConfig | None = None, n_points: int = 64) -> list[dict]:
    """The memory / predicted-loss frontier of per-expert allocations, cheapest first.

    Points are prefixes of the convex-hull greedy: each is optimal at its own memory, so
    ``allocate`` with ``method="budget", target_gb=point["gb"]`` reproduces it. About
    ``n_points`` points, evenly spaced in memory.

    Returns:
        Dicts with ``bytes``, ``gb``, ``gib``, ``avg_bits`` (routed experts, numel-weighted) and
        ``predicted_loss``.
    """
    mem, bits = mem_config or MemoryConfig(), bit_set(bits)
    scores_array(scores, layout)  # validates the shape
    b = len(bits)
    losses = loss_table(scores, errors, bits)[0].reshape(-1, b)
    costs = expert_cost_table(layout, bits, mem).reshape(-1, b)
    numel = LayoutArrays.of(layout).expert_numel.reshape(-1)
    nominal = numel[:, None] * np.asarray(bits)
    start, st = _hull_steps(costs, losses)
    rows = np.arange(len(costs))

    def path(table, delta):
        return table[rows, start].sum() + np.concatenate([[0], np.cumsum(delta)])

    cost = path(costs, st.dcost) + fixed_bits(layout, mem)
    loss = path(losses, -st.dgain)
    nb = path(nominal, nominal[st.item, st.to] - nominal[st.item, st.frm])
    want = np.linspace(cost[0], cost[-1], max(int(n_points), 2))
    idx = np.unique(np.searchsorted(cost, want, side="right") - 1)
    total = int(numel.sum())
    return [{"bytes": -(-int(cost[i]) // 8), "gb": int(-(-int(cost[i]) // 8)) / 1e9,
             "gib": int(-(-int(cost[i]) // 8)) / 2**30, "avg_bits": float(nb[i] / total),
             "predicted_loss": float(loss[i])} for i in idx]


# ------------------------------------------------------------------------------ baselines


def _uniform_map(s: np.ndarray, layout: MoELayout, config: AllocConfig,
                 errors: np.ndarray | None, reference: BitMap | None) -> BitMap:
    return _new_map(np.full(s.shape, config.uniform_bits), layout, "uniform", config)


def _random_map(s: np.ndarray, layout: MoELayout, config: AllocConfig,
                errors: np.ndarray | None, reference: BitMap | None) -> BitMap:
    if reference is None:
        reference = _kmeans_map(s, layout, config, "kmeans")
    if reference.bits.shape != s.shape:
        raise ValueError(f"reference map has shape {reference.bits.shape}, expected {s.shape}")
    rng = np.random.default_rng(config.seed)
    if config.scope == "layer":
        bits = rng.permuted(reference.bits, axis=1)
    else:
        bits = rng.permutation(reference.bits.ravel()).reshape(s.shape)
    meta = {"scope": config.scope, "reference_method": reference.method,
            "reference_avg_bits": reference.avg_bits}
    return _new_map(bits, layout, "random", config, meta=meta)


_HANDLERS: dict[str, Callable[..., BitMap]] = {
    "kmeans": lambda s, lay, c, e, r: _kmeans_map(s, lay, c, "kmeans"),
    "frequency": lambda s, lay, c, e, r: _kmeans_map(s, lay, c, "frequency"),
    "budget": _budget_map,
    "uniform": _uniform_map,
    "random": _random_map,
}


def allocate(scores, layout: MoELayout, config: AllocConfig | None = None,
             errors: np.ndarray | None = None, reference: BitMap | None = None) -> BitMap:
    """Bits for every routed expert.

    Args:
        scores: [L, E] sensitivities (higher = more sensitive), or an object with ``.scores``;
            for ``frequency``, routing frequencies.
        layout: the model's MoE layout.
        config: the method and its settings.
        errors: [L, E, len(bits)] quantization errors (``quant_errors``), for ``budget``
            (not needed when ``scores`` carries its own ``errors``, which are then used).
        reference: for ``random``, the map whose bits are permuted (default: the k-means map of
            the same config).

    Raises:
        ValueError: for inputs that do not fit the layout or the method (the message says why).
    """
    config = config or AllocConfig()
    s = scores_array(scores, layout)
    if config.method == "budget":
        bitmap = _budget_map(s, layout, config, errors, reference, scores)
    else:
        bitmap = _HANDLERS[config.method](s, layout, config, errors, reference)
    source = getattr(scores, "method", None)
    if isinstance(source, str):
        bitmap.meta["scores"] = source
    return bitmap


def snap_per_layer(bitmap: BitMap, layout: MoELayout, rule: str = "mean") -> BitMap:
    """One width per MoE layer, so fused-MoE engines (vLLM, llama.cpp, ...) can load the map.

    Rules: ``mean`` = the layer's numel-weighted mean width rounded to the nearest width allowed
    (the map's ``meta["bit_set"]`` plus the widths it uses), ties up; ``max`` = the layer's
    widest (never loses precision); ``min`` = its narrowest.
    """
    if rule not in SNAP_RULES:
        raise ValueError(f"rule {rule!r} is not one of {SNAP_RULES}")
    bits = bitmap.bits
    if rule == "max":
        width = bits.max(1)
    elif rule == "min":
        width = bits.min(1)
    else:
        numel = LayoutArrays.of(layout).expert_numel.astype(float)
        mean = (bits * numel).sum(1) / numel.sum(1)
        allowed = np.array(sorted(set(bitmap.meta.get("bit_set", [])) | set(bits.ravel())))
        width = allowed[np.argmin(np.abs(mean[:, None] - allowed) - 1e-9 * allowed, 1)]
    meta = {**bitmap.meta, "snapped": rule, "unsnapped_avg_bits": bitmap.avg_bits}
    return BitMap(np.repeat(width[:, None], bits.shape[1], 1), bitmap.method, meta=meta,
                  numel=LayoutArrays.of(layout).expert_numel)


__all__ = ["AllocConfig", "BitMap", "allocate", "method_errors", "pareto", "predicted_loss",
           "quant_errors",
           "rtn", "snap_per_layer", "solve_mckp", "DP_MAX_CELLS", "DP_MAX_ITEMS", "SOLVERS"]
