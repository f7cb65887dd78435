"""Per-expert sensitivity of a MoE model: the MoPEQ data-free score and data-aware ones.

``profile(model, layout, method, config, data)`` returns ``Scores``: one row per MoE layer
(``layout.blocks`` order), one column per routed expert, and for every method
``score = gate + up + down`` (the per-projection parts). Methods and units:

- ``frobenius`` (the paper, data-free): per projection, the Hutchinson estimate with unit-norm
  Gaussian probes of the Hessian of the proxy loss ``||W||_F``, i.e. ``Tr(H)/n``, whose exact
  value is ``(n-1)/(n ||W||_F)`` (``closed_form=True``). Units: 1 / weight magnitude.
- ``hessian`` (data-aware): Hutchinson (Rademacher) trace of the Hessian of the calibration
  loss (the mean of per-batch mean losses) w.r.t. each expert's weights, all experts from one
  HVP per probe, PyHessian's early stop (``tol``) between ``min_probes`` and ``probes``.
  ``scores`` is ``Tr(H_e)/n_e`` (average curvature per weight: the score to allocate bits by);
  the parts are ``Tr(H_e,p)/n_e``; ``trace_raw`` is ``Tr(H_e)``; ``stderr`` is the standard
  error of ``scores`` (negative estimates are kept and counted in ``meta["n_negative"]``).
- ``fisher``: empirical Fisher trace ``mean_b ||g_b,e||^2`` over calibration batches ``b``;
  ``scores`` = ``Tr(F_e)/n_e``, ``trace_raw`` = ``Tr(F_e)``.
- ``frequency``: top-k assignments per expert on the data (a count); the parts split it by the
  projections' share of the expert's weights.

Inactive experts (no tokens routed on the data) have no data-aware signal (exactly zero
gradient). For ``hessian`` and ``fisher`` their ``scores`` and parts are filled by
``config.inactive_policy`` (``layer_mean``: mean of the layer's active experts; ``model_mean``;
``zero``), their ``stderr`` is NaN, ``trace_raw`` keeps the measured 0, and ``meta`` lists them
with ``coverage``. ``frequency`` reports zero counts as measured.

Results are cached (``mopeq.cache``, stage ``sensitivity``) under a sha256 of the model
fingerprint, the method, the config fields that determine it, the data description, library
versions and ``ALGORITHM_VERSION``; a hit keeps the original ``elapsed_s`` and sets
``cache_hit``.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mopeq import cache
from mopeq.calibration import CalibData, batch_loss, expert_grad_mode, route_counts
from mopeq.models import fingerprint_model
from mopeq.moe import PROJECTIONS, MoEBlock, MoELayout

ALGORITHM_VERSION = 1
STAGE = "sensitivity"
METHODS = ("frobenius", "hessian", "fisher", "frequency")
DATA_METHODS = ("hessian", "fisher", "frequency")
LOSSES = ("ce", "self_kl")
POLICIES = ("layer_mean", "model_mean", "zero")
DEFAULT_PROBES = {"frobenius": 100, "hessian": 64}
_CHUNK = 2**22  # elements of one frobenius probe batch (memory bound)


def _used_by(*methods: str, default):
    return field(default=default, metadata={"methods": methods})


@dataclass(frozen=True)
class ProfileConfig:
    """Settings of ``profile``; each field names the methods whose result it determines."""

    probes: int | None = _used_by("frobenius", "hessian", default=None)  # None: DEFAULT_PROBES
    min_probes: int = _used_by("hessian", default=32)  # no early stop before this many
    tol: float = _used_by("hessian", default=1e-3)  # PyHessian: rel. change of the running mean
    seed: int = _used_by("frobenius", "hessian", default=0)
    closed_form: bool = _used_by("frobenius", default=False)
    normalize_per_layer: bool = _used_by(*METHODS, default=False)  # S_e / sum of its layer
    loss: str = _used_by("hessian", "fisher", default="ce")
    inactive_policy: str = _used_by("hessian", "fisher", default="layer_mean")
    probes_per_pass: int = _used_by(default=8)  # probes per graph rebuild; results don't depend
    use_cache: bool = _used_by(default=True)

    def __post_init__(self):
        checks = [(self.probes is None or self.probes >= 2, "probes must be >= 2 or None"),
                  (self.min_probes >= 2, "min_probes must be >= 2"),
                  (self.tol >= 0, "tol must be >= 0"),
                  (self.probes_per_pass >= 1, "probes_per_pass must be >= 1"),
                  (self.loss in LOSSES, f"loss must be one of {LOSSES}"),
                  (self.inactive_policy in POLICIES, f"inactive_policy must be one of {POLICIES}")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"ProfileConfig: {message}")

    def probes_for(self, method: str) -> int:
        """Probe count (frobenius) or cap (hessian) for ``method``."""
        return self.probes if self.probes is not None else DEFAULT_PROBES.get(method, 0)

    def settings(self, method: str) -> dict:
        """The fields that determine ``method``'s result (what the cache key holds)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)
               if method in f.metadata["methods"]}
        if "probes" in out:
            out["probes"] = self.probes_for(method)
        if method == "frobenius" and self.closed_form:
            out.pop("probes")
            out.pop("seed")
        return out


# --------------------------------------------------------------------------- Scores


def _listed(a: np.ndarray | None):
    if a is None:
        return None
    return [[None if not math.isfinite(x) else (int(x) if a.dtype.kind in "iu" else float(x))
             for x in row] for row in a.tolist()]


def _array(v, dtype=np.float64) -> np.ndarray | None:
    if v is None:
        return None
    return np.array([[np.nan if x is None else x for x in row] for row in v], dtype=dtype)


@dataclass
class Scores:
    """Per-(MoE layer, expert) sensitivity and how it was obtained (see the module docstring)."""

    method: str
    scores: np.ndarray  # [L, E]
    per_projection: dict[str, np.ndarray]  # "gate" / "up" / "down" -> [L, E], summing to scores
    stderr: np.ndarray | None = None  # [L, E], stochastic methods
    tokens: np.ndarray | None = None  # [L, E] top-k assignments, data methods
    trace_raw: np.ndarray | None = None  # [L, E] Tr(H_e) / Tr(F_e)
    meta: dict = field(default_factory=dict)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array by name (for npz)."""
        out = {"scores": self.scores, **{f"part_{p}": a for p, a in self.per_projection.items()}}
        for name in ("stderr", "tokens", "trace_raw"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_arrays(cls, method: str, arrays: dict, meta: dict) -> Scores:
        """Inverse of ``arrays``."""
        return cls(method, arrays["scores"], {p: arrays[f"part_{p}"] for p in PROJECTIONS},
                   arrays.get("stderr"), arrays.get("tokens"), arrays.get("trace_raw"), meta)

    def to_json(self) -> dict:
        """JSON-ready dict; arrays as lists of lists (NaN as null), absent ones as null."""
        return {"method": self.method, "scores": _listed(self.scores),
                "per_projection": {p: _listed(a) for p, a in self.per_projection.items()},
                "stderr": _listed(self.stderr), "tokens": _listed(self.tokens),
                "trace_raw": _listed(self.trace_raw), "elapsed_s": self.meta.get("elapsed_s"),
                "cache_hit": self.meta.get("cache_hit", False), "meta": self.meta}

    @classmethod
    def from_json(cls, d: dict) -> Scores:
        """Inverse of ``to_json``."""
        return cls(d["method"], _array(d["scores"]),
                   {p: _array(a) for p, a in d["per_projection"].items()},
                   _array(d.get("stderr")), _array(d.get("tokens"), np.int64),
                   _array(d.get("trace_raw")), dict(d.get("meta", {})))

    def save(self, path: str | Path) -> None:
        """Write ``path`` as ``.json`` (method, meta) and ``.npz`` (arrays); no pickle."""
        import json

        path = Path(path)
        np.savez(path.with_suffix(".npz"), **self.arrays())
        path.with_suffix(".json").write_text(
            json.dumps({"method": self.method, "meta": self.meta}, indent=1, default=str))

    @classmethod
    def load(cls, path: str | Path) -> Scores:
        """Read what ``save`` wrote."""
        import json

        path = Path(path)
        head = json.loads(path.with_suffix(".json").read_text())
        with np.load(path.with_suffix(".npz"), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return cls.from_arrays(head["method"], arrays, head["meta"])


# --------------------------------------------------------------------------- profile


def profile(model, layout: MoELayout, method: str, config: ProfileConfig = ProfileConfig(),
            data: CalibData | None = None,
            on_progress: Callable[[float, str], None] | None = None,
            fingerprint: str | None = None) -> Scores:
    """Score every routed expert of ``model`` by ``method`` (served from the cache if known).

    Args:
        model: the model (or a ``mopeq.models.LoadedModel``, whose fingerprint is used).
        layout: its ``MoELayout`` (``mopeq.moe.discover``).
        method: one of ``METHODS``.
        config: the settings.
        data: calibration data (``mopeq.calibration.calibration_batches``); data methods only.
        on_progress: called as ``on_progress(fraction, message)``.
        fingerprint: the model's fingerprint for the cache key (computed when None).

    Raises:
        ValueError: for an unknown method, missing data, or ``fisher`` with ``self_kl``.
    """
    if not isinstance(model, nn.Module):
        fingerprint, model = fingerprint or model.fingerprint, model.model
    _check(method, config, data)
    progress = on_progress or (lambda _f, _m: None)
    key = None
    if config.use_cache:
        fingerprint = fingerprint or fingerprint_model(model)
        key = _cache_key(fingerprint, method, config, data)
        hit = _cached(key, method)
        if hit is not None:
            progress(1.0, f"{method}: served from cache")
            return hit
    start = time.perf_counter()
    raw = _COMPUTE[method](model, layout, config, data, progress)
    scores = _finish(method, raw, layout, config, data, time.perf_counter() - start)
    if key:
        scores.meta.update(cache_key=key, fingerprint=fingerprint)
        _store(key, scores)
    progress(1.0, f"{method}: done in {scores.meta['elapsed_s']:.2f} s")
    return scores


def _check(method: str, config: ProfileConfig, data) -> None:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if method in DATA_METHODS and (data is None or not data.batches):
        raise ValueError(f"{method} needs calibration data: pass "
                         "data=mopeq.calibration.calibration_batches(...)")
    if method == "fisher" and config.loss == "self_kl":
        raise ValueError("fisher needs loss='ce': self_kl has zero gradient at the model")


def _cache_key(fingerprint: str, method: str, config: ProfileConfig, data) -> str:
    inputs = {"model": fingerprint, "method": method,
              "settings": config.settings(method),
              "data": data.description if method in DATA_METHODS else None}
    return cache.make_key(STAGE, inputs, ALGORITHM_VERSION)


def _cached(key: str, method: str) -> Scores | None:
    entry = cache.load(STAGE, key)
    if entry is None:
        return None
    try:
        scores = Scores.from_arrays(method, entry.arrays, entry.meta)
    except KeyError as exc:
        warnings.warn(f"cache entry {key[:12]} is incomplete ({exc}); recomputing", stacklevel=3)
        return None
    scores.meta = {k: v for k, v in scores.meta.items() if not k.startswith("_")}
    scores.meta["cache_hit"] = True
    return scores


def _store(key: str, scores: Scores) -> None:
    try:
        cache.save(STAGE, key, scores.meta, scores.arrays())
    except OSError as exc:
        warnings.warn(f"could not write the sensitivity cache ({exc})", stacklevel=3)


# --------------------------------------------------------------------------- finishing


def _finish(method, raw: dict, layout, config, data, elapsed: float) -> Scores:
    """Shared post-processing: inactive policy, negatives, per-layer normalisation, meta."""
    scores, parts = raw["scores"], raw["parts"]
    stderr, tokens = raw.get("stderr"), raw.get("tokens")
    inactive = np.zeros_like(scores, dtype=bool) if tokens is None else tokens == 0
    n_negative = int((scores < 0).sum())
    if method in ("hessian", "fisher") and inactive.any():
        scores, parts, stderr = _fill_inactive(scores, parts, stderr, inactive,
                                               config.inactive_policy)
    if config.normalize_per_layer:
        total = scores.sum(1, keepdims=True)
        total = np.where(total == 0, 1.0, total)
        scores, parts = scores / total, {p: a / total for p, a in parts.items()}
        stderr = None if stderr is None else stderr / np.abs(total)
    settings = config.settings(method)
    meta = {"method": method, "settings": settings, "seed": settings.get("seed"),
            "probes": None,
            "data": data.description if data is not None and method in DATA_METHODS else None,
            "layers": layout.moe_layers, "num_experts": layout.num_experts,
            "elapsed_s": round(elapsed, 4), "cache_hit": False, "n_negative": n_negative,
            "coverage": None if tokens is None else float(1 - inactive.mean()),
            "inactive": [[int(r), int(e)] for r, e in zip(*np.nonzero(inactive), strict=True)],
            "inactive_policy": config.inactive_policy if method in ("hessian", "fisher") else None,
            "policy_applied": bool(method in ("hessian", "fisher") and inactive.any()),
            "algorithm_version": ALGORITHM_VERSION, **raw.get("meta", {})}
    return Scores(method, scores, parts, stderr, tokens, raw.get("trace_raw"), meta)


def _fill_inactive(scores, parts, stderr, inactive, policy):
    """Replace inactive experts' values by ``policy`` (linear, so parts still sum to scores)."""
    def fill(a):
        active = np.where(inactive, np.nan, a)
        if policy == "zero":
            value = np.zeros_like(a)
        elif policy == "model_mean":
            value = np.full_like(a, np.nanmean(active))
        else:  # layer_mean; a layer without active experts falls back to the model mean
            value = np.nanmean(active, axis=1, keepdims=True) * np.ones_like(a)
            value = np.where(np.isnan(value), np.nanmean(active), value)
        return np.where(inactive, value, a)
    stderr = None if stderr is None else np.where(inactive, np.nan, stderr)
    return fill(scores), {p: fill(a) for p, a in parts.items()}, stderr


# --------------------------------------------------------------------------- expert tensors


def _block_params(model: nn.Module, block: MoEBlock) -> list[torch.Tensor]:
    """The block's expert parameters: fused (gate_up, down), or 3 Linear weights per expert."""
    experts = model.get_submodule(block.experts_path)
    if block.fused:
        return [experts.gate_up_proj, experts.down_proj]
    return [getattr(experts[e], n).weight for e in range(block.num_experts)
            for n in block.proj_names]


def _canonical(block: MoEBlock, tensors) -> dict[str, torch.Tensor]:
    """Tensors aligned with ``_block_params`` -> projection -> [E, out, in]."""
    if not block.fused:
        return {p: torch.stack(list(tensors[i::3])) for i, p in enumerate(PROJECTIONS)}
    gate_up, down = tensors
    if block.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    i = gate_up.shape[1] // 2
    return {"gate": gate_up[:, :i], "up": gate_up[:, i:], "down": down}


def _from_canonical(block: MoEBlock, parts: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of ``_canonical``."""
    if not block.fused:
        return [parts[p][e] for e in range(block.num_experts) for p in PROJECTIONS]
    gate_up, down = torch.cat([parts["gate"], parts["up"]], 1), parts["down"]
    if block.transposed:
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    return [gate_up, down]


def _numel(layout: MoELayout) -> np.ndarray:
    """Weights per projection [L, E, 3] (layouts have E experts in every MoE layer)."""
    return np.array([[e.shapes[p][0] * e.shapes[p][1] for p in PROJECTIONS]
                     for e in layout.experts], dtype=np.float64).reshape(
        layout.num_moe_layers, layout.num_experts, 3)


def _expert_params(model, layout) -> tuple[list[int], list[torch.Tensor]]:
    """Parameters per block (counts) and all expert parameters, flat."""
    per_block = [_block_params(model, b) for b in layout.blocks]
    return [len(ps) for ps in per_block], [p for ps in per_block for p in ps]


def _split(per_proj: np.ndarray) -> dict[str, np.ndarray]:
    return {p: per_proj[..., i] for i, p in enumerate(PROJECTIONS)}


# --------------------------------------------------------------------------- frobenius


def _frobenius(model, layout, config, _data, progress) -> dict:
    """Per projection ``Tr(H)/n`` of ``||W||_F``: Hutchinson (unit Gaussian probes) or exact."""
    L, E = layout.num_moe_layers, layout.num_experts
    mean, var = np.zeros((L, E, 3)), np.zeros((L, E, 3))
    gen = torch.Generator().manual_seed(config.seed)
    probes = config.probes_for("frobenius")
    for row, block in enumerate(layout.blocks):
        with torch.no_grad():
            parts = _canonical(block, _block_params(model, block))
        for j, p in enumerate(PROJECTIONS):
            w = parts[p].detach().reshape(block.num_experts, -1).double()
            if config.closed_form:
                n = w.shape[1]
                mean[row, :block.num_experts, j] = ((n - 1) / (n * w.norm(dim=1))).numpy()
            else:
                m, v = _norm_hutchinson(w, probes, gen)
                mean[row, :block.num_experts, j], var[row, :block.num_experts, j] = m, v
        progress((row + 1) / L, f"frobenius: layer {block.layer}")
    stderr = None if config.closed_form else np.sqrt(var.sum(-1) / probes)
    return {"scores": mean.sum(-1), "parts": _split(mean), "stderr": stderr,
            "meta": {"probes": None if config.closed_form else probes,
                     "form": "closed" if config.closed_form else "hutchinson"}}


def _norm_hutchinson(w: torch.Tensor, probes: int, gen) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance over probes of ``v^T H v`` of ``||w_e||`` for each row ``w_e``.

    The proxy loss ``sum_e ||w_e||`` is separable, so one HVP gives every row's estimate; rows
    are processed in chunks of at most ``_CHUNK`` elements.
    """
    est = torch.empty(probes, w.shape[0], dtype=w.dtype)
    rows = max(1, _CHUNK // w.shape[1])
    for start in range(0, w.shape[0], rows):
        x = w[start:start + rows].clone().requires_grad_(True)
        with torch.enable_grad():
            g = torch.autograd.grad(x.norm(dim=1).sum(), x, create_graph=True)[0]
            for i in range(probes):
                v = torch.randn(x.shape, generator=gen).to(x.dtype)  # fp32 draws: 3x faster
                v /= v.norm(dim=1, keepdim=True)
                hv = torch.autograd.grad(g, x, grad_outputs=v, retain_graph=True)[0]
                est[i, start:start + rows] = (v * hv).sum(1)
    return est.mean(0).numpy(), est.var(0).numpy()


# --------------------------------------------------------------------------- data-aware


def _routing(model, layout, data, progress, share: float) -> np.ndarray:
    n = len(data.batches)
    return route_counts(model, layout, data.batches,
                        lambda k: progress(share * (k + 1) / n, "routing"))[0]


def _rademacher(blocks, shapes, gen, dtype) -> tuple[list, list[torch.Tensor]]:
    """One probe: canonical per-block parts and the flat list aligned with the parameters."""
    canon = [{p: torch.randint(0, 2, s, generator=gen).to(dtype).mul_(2).sub_(1)
              for p, s in shape.items()} for shape in shapes]
    flat = [t for block, c in zip(blocks, canon, strict=True) for t in _from_canonical(block, c)]
    return canon, flat


def _slice_dots(layout, counts, canon_v, hv: list[torch.Tensor]) -> np.ndarray:
    """Per (layer, expert, projection) ``v . Hv`` of one probe; ``hv . hv`` without ``v``."""
    out = np.zeros((layout.num_moe_layers, layout.num_experts, 3))
    start = 0
    for row, (block, n) in enumerate(zip(layout.blocks, counts, strict=True)):
        parts = _canonical(block, hv[start:start + n])
        start += n
        for j, p in enumerate(PROJECTIONS):
            v = parts[p] if canon_v is None else canon_v[row][p]
            out[row, :block.num_experts, j] = (v * parts[p]).sum((1, 2), dtype=torch.float64)
    return out


def _stop_index(dots: list[np.ndarray], tol: float, floor: int) -> int | None:
    """PyHessian's stopping rule, or None if it never fires.

    The first probe count >= ``floor`` at which the running mean of the total trace changed by
    less than ``tol`` relative to the previous running mean.
    """
    totals = np.cumsum([d.sum() for d in dots]) / np.arange(1, len(dots) + 1)
    for i in range(max(floor, 2), len(dots) + 1):
        if abs(totals[i - 1] - totals[i - 2]) / (abs(totals[i - 2]) + 1e-6) < tol:
            return i
    return None


def _hessian(model, layout, config, data, progress) -> dict:
    """Hutchinson traces of every expert from one HVP per probe (and calibration batch)."""
    tokens = _routing(model, layout, data, progress, 0.05)
    blocks, (counts, params) = list(layout.blocks), _expert_params(model, layout)
    shapes = [{p: t.shape for p, t in _canonical(b, _block_params(model, b)).items()}
              for b in blocks]
    cap = config.probes_for("hessian")
    floor, gen, dots, kept = min(config.min_probes, cap), torch.Generator(), [], {}
    gen.manual_seed(config.seed)
    weight = 1.0 / len(data.batches)
    stop = None
    with expert_grad_mode(model, params):
        while len(dots) < cap and stop is None:
            probes = [_rademacher(blocks, shapes, gen, params[0].dtype)
                      for _ in range(min(config.probes_per_pass, cap - len(dots)))]
            acc = [np.zeros((layout.num_moe_layers, layout.num_experts, 3)) for _ in probes]
            for k, batch in enumerate(data.batches):
                g = kept.get(k) or _first_grad(model, batch, params, config.loss)
                if len(data.batches) == 1:
                    kept[k] = g  # one batch: its graph serves every probe
                for a, (canon, flat) in zip(acc, probes, strict=True):
                    hv = torch.autograd.grad(g, params, grad_outputs=flat, retain_graph=True)
                    a += weight * _slice_dots(layout, counts, canon, hv)
            dots += acc
            stop = _stop_index(dots, config.tol, floor)
            progress(0.05 + 0.95 * len(dots) / cap, f"hessian: {len(dots)} probes")
    dots = np.stack(dots[:stop] if stop else dots)  # [P, L, E, 3]
    return _trace_result(dots, layout, tokens, converged=stop is not None, cap=cap)


def _first_grad(model, batch, params, loss) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(batch_loss(model, batch, loss), params, create_graph=True)


def _trace_result(dots: np.ndarray, layout, tokens, converged: bool, cap: int) -> dict:
    n = _numel(layout).sum(-1)
    parts, total = dots.mean(0), dots.sum(-1)
    stderr = total.std(0, ddof=1) / math.sqrt(len(dots)) / n
    return {"scores": parts.sum(-1) / n, "parts": _split(parts / n[..., None]),
            "stderr": stderr, "trace_raw": parts.sum(-1), "tokens": tokens,
            "meta": {"probes": len(dots), "probe_cap": cap, "converged": converged,
                     "score_unit": "Tr(H_e)/n_e"}}


def _fisher(model, layout, config, data, progress) -> dict:
    """Empirical Fisher trace: mean over batches of the squared per-batch gradient."""
    tokens = _routing(model, layout, data, progress, 0.3)
    counts, params = _expert_params(model, layout)
    acc = np.zeros((layout.num_moe_layers, layout.num_experts, 3))
    with expert_grad_mode(model, params):
        for k, batch in enumerate(data.batches):
            grads = torch.autograd.grad(batch_loss(model, batch, config.loss), params)
            acc += _slice_dots(layout, counts, None, grads)
            progress(0.3 + 0.7 * (k + 1) / len(data.batches), f"fisher: batch {k + 1}")
    acc /= len(data.batches)
    n = _numel(layout).sum(-1)
    return {"scores": acc.sum(-1) / n, "parts": _split(acc / n[..., None]),
            "trace_raw": acc.sum(-1), "tokens": tokens, "meta": {"score_unit": "Tr(F_e)/n_e"}}


def _frequency(model, layout, _config, data, progress) -> dict:
    """Top-k assignments per expert; parts split each count by projection weight share."""
    tokens = _routing(model, layout, data, progress, 1.0)
    numel = _numel(layout)
    share = numel / np.maximum(numel.sum(-1, keepdims=True), 1)
    counts = tokens.astype(np.float64)
    return {"scores": counts, "parts": _split(counts[..., None] * share), "tokens": tokens,
            "meta": {"score_unit": "top-k assignments"}}


_COMPUTE = {"frobenius": _frobenius, "hessian": _hessian, "fisher": _fisher,
            "frequency": _frequency}
