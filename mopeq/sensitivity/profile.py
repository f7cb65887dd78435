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
- ``block_error`` (``sensitivity.block_error``, one forward pass): per expert and candidate width b,
  the exact squared change of its MoE layer's output on the calibration tokens when that expert
  alone is RTN-quantized to b bits, ``sum_t g_e(x_t)^2 ||E_e^q(x_t) - E_e(x_t)||^2``;
  ``block_fisher`` weights that change by the Fisher of the answer distribution at the layer
  output (sampled answers, ``fisher_samples``, ``seed``): a second-order estimate of the KL.
- ``measured`` (``sensitivity.measured``, experts x widths forward passes): the ground truth, the
  answer KL to the 16-bit model with that expert alone RTN-quantized to b bits.

The block methods and ``measured`` fill ``errors`` [L, E, widths of ``config.bits``] (their
own ε_e(b), which the budget allocator uses directly) and score by the error at the lowest
width. The method table (names, data needs, labels) is ``mopeq.core.methods``.

Inactive experts (no tokens routed on the data) have no data-aware signal (exactly zero
gradient). For ``hessian`` and ``fisher`` their ``scores`` and parts are filled by
``config.inactive_policy`` (``layer_mean``: mean of the layer's active experts; ``model_mean``;
``zero``), their ``stderr`` is NaN, ``trace_raw`` keeps the measured 0, and ``meta`` lists them
with ``coverage``. ``frequency`` reports zero counts as measured.

Results are cached (``mopeq.core.cache``, stage ``sensitivity``) under a sha256 of the model
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
from torch import nn

from mopeq.core import cache, methods
from mopeq.core import defaults as D
from mopeq.core.errors import MopeqError
from mopeq.core.layout import PROJECTIONS, MoELayout
from mopeq.core.memory import bit_set
from mopeq.model.loading import fingerprint_model
from mopeq.sensitivity.calibration import CalibData

ALGORITHM_VERSION = 1
STAGE = "sensitivity"
METHODS = methods.NAMES
DATA_METHODS = methods.DATA_METHODS
LOSSES = ("ce", "self_kl")
POLICIES = ("layer_mean", "model_mean", "zero")
DEFAULT_PROBES = methods.DEFAULT_PROBES
ERROR_METHODS = methods.ERROR_METHODS


def _used_by(*methods: str, default):
    return field(default=default, metadata={"methods": methods})


@dataclass(frozen=True)
class ProfileConfig:
    """Settings of ``profile``; each field names the methods whose result it determines."""

    probes: int | None = _used_by(*DEFAULT_PROBES, default=None)  # None: DEFAULT_PROBES
    min_probes: int = _used_by("hessian", default=32)  # no early stop before this many
    tol: float = _used_by("hessian", default=1e-3)  # PyHessian: rel. change of the running mean
    seed: int = _used_by(*methods.STOCHASTIC, default=D.SEED)
    closed_form: bool = _used_by("frobenius", default=False)
    normalize_per_layer: bool = _used_by(*METHODS, default=False)  # S_e / sum of its layer
    loss: str = _used_by("hessian", "fisher", default="ce")
    inactive_policy: str = _used_by("hessian", "fisher", default="layer_mean")
    probes_per_pass: int = _used_by(default=8)  # probes per graph rebuild; results don't depend
    use_cache: bool = _used_by(default=True)
    bits: tuple[int, ...] = _used_by(*ERROR_METHODS, default=D.BITS)  # candidate widths
    group_size: int = _used_by(*ERROR_METHODS, default=D.GROUP_SIZE)  # RTN as the export uses it
    sym: bool = _used_by(*ERROR_METHODS, default=D.SYM)
    max_cost_s: float | None = _used_by(default=900.0)  # measured refuses beyond; None: no cap
    fisher_samples: int = _used_by("block_fisher", default=4)  # answers sampled per position

    def __post_init__(self):
        object.__setattr__(self, "bits", tuple(w for w in bit_set(self.bits) if w < 16))
        checks = [(self.probes is None or self.probes >= 2, "probes must be >= 2 or None"),
                  (self.min_probes >= 2, "min_probes must be >= 2"),
                  (self.tol >= 0, "tol must be >= 0"),
                  (self.probes_per_pass >= 1, "probes_per_pass must be >= 1"),
                  (self.loss in LOSSES, f"loss must be one of {LOSSES}"),
                  (self.inactive_policy in POLICIES, f"inactive_policy must be one of {POLICIES}"),
                  (bool(self.bits), "bits needs a width below 16"),
                  (self.fisher_samples >= 1, "fisher_samples must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise MopeqError(f"ProfileConfig: {message}")

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
    errors: np.ndarray | None = None  # [L, E, B] the method's own ε_e(b), B = meta["error_bits"]
    extras: dict[str, np.ndarray] = field(default_factory=dict)  # further [L, E, B] tables

    @property
    def error_bits(self) -> tuple[int, ...] | None:
        """The widths of ``errors``' last axis (None without errors)."""
        bits = self.meta.get("error_bits")
        return None if self.errors is None or bits is None else tuple(int(b) for b in bits)

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array by name (for npz)."""
        out = {"scores": self.scores, **{f"part_{p}": a for p, a in self.per_projection.items()}}
        for name in ("stderr", "tokens", "trace_raw", "errors"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out.update({f"extra_{k}": a for k, a in self.extras.items()})
        return out

    @classmethod
    def from_arrays(cls, method: str, arrays: dict, meta: dict) -> Scores:
        """Inverse of ``arrays``."""
        extras = {k[len("extra_"):]: a for k, a in arrays.items() if k.startswith("extra_")}
        return cls(method, arrays["scores"], {p: arrays[f"part_{p}"] for p in PROJECTIONS},
                   arrays.get("stderr"), arrays.get("tokens"), arrays.get("trace_raw"), meta,
                   arrays.get("errors"), extras)

    def to_json(self) -> dict:
        """JSON-ready dict; arrays as lists of lists (NaN as null), absent ones as null."""
        return {"method": self.method, "scores": _listed(self.scores),
                "per_projection": {p: _listed(a) for p, a in self.per_projection.items()},
                "stderr": _listed(self.stderr), "tokens": _listed(self.tokens),
                "trace_raw": _listed(self.trace_raw), "elapsed_s": self.meta.get("elapsed_s"),
                "cache_hit": self.meta.get("cache_hit", False), "meta": self.meta,
                "errors": None if self.errors is None else self.errors.tolist(),
                "extras": {k: a.tolist() for k, a in self.extras.items()}}

    @classmethod
    def from_json(cls, d: dict) -> Scores:
        """Inverse of ``to_json``."""
        errors = d.get("errors")
        return cls(d["method"], _array(d["scores"]),
                   {p: _array(a) for p, a in d["per_projection"].items()},
                   _array(d.get("stderr")), _array(d.get("tokens"), np.int64),
                   _array(d.get("trace_raw")), dict(d.get("meta", {})),
                   None if errors is None else np.array(errors, dtype=np.float64),
                   {k: np.array(a, dtype=np.float64) for k, a in d.get("extras", {}).items()})

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
        model: the model (or a ``mopeq.model.loading.LoadedModel``, whose fingerprint is used).
        layout: its ``MoELayout`` (``mopeq.model.moe.discover``).
        method: one of ``METHODS``.
        config: the settings.
        data: calibration data (``sensitivity.calibration.calibration_batches``); data methods only.
        on_progress: called as ``on_progress(fraction, message)``.
        fingerprint: the model's fingerprint for the cache key (computed when None).

    Raises:
        MopeqError: for an unknown method, missing data, or ``fisher`` with ``self_kl``.
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
    raw = methods.resolve(methods.info(method).estimator)(model, layout, config, data, progress)
    scores = _finish(method, raw, layout, config, data, time.perf_counter() - start)
    if key:
        scores.meta.update(cache_key=key, fingerprint=fingerprint)
        _store(key, scores)
    progress(1.0, f"{method}: done in {scores.meta['elapsed_s']:.2f} s")
    return scores


def _check(method: str, config: ProfileConfig, data) -> None:
    if method not in METHODS:
        raise MopeqError(f"unknown method {method!r}; choose one of {METHODS}")
    if method in DATA_METHODS and (data is None or not data.batches):
        raise MopeqError(f"{method} needs calibration data: pass "
                         "data=mopeq.sensitivity.calibration.calibration_batches(...)")
    if method == "fisher" and config.loss == "self_kl":
        raise MopeqError("fisher needs loss='ce': self_kl has zero gradient at the model")


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
    if raw.get("errors") is not None:
        meta["error_bits"] = list(config.bits)
    return Scores(method, scores, parts, stderr, tokens, raw.get("trace_raw"), meta,
                  raw.get("errors"), raw.get("extras", {}))


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

