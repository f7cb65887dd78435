"""The ``BitMap`` (bits per routed expert and how they were chosen) and what works on one.

*Per-layer snap* (``snap_per_layer``): ``mean`` = the layer's numel-weighted mean width rounded
to the nearest allowed width (ties up); ``max`` never loses precision; ``min`` never gains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from mopeq.core.errors import MopeqError
from mopeq.core.layout import MoELayout, bitmap_array, deployable_fused
from mopeq.core.memory import FP_BITS, LayoutArrays

if TYPE_CHECKING:
    from mopeq.allocation.allocate import AllocConfig

SNAP_RULES = ("mean", "max", "min")


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
            raise MopeqError(f"bits must be a non-empty [layers, experts] array, got {bits.shape}")
        if bits.min() < 1 or bits.max() > FP_BITS:
            raise MopeqError(f"bits must lie in 1..16, got {bits.min()}..{bits.max()}")
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
        MopeqError: on a shape that does not match the layout or non-finite values.
    """
    s = bitmap_array(_as_array(scores), layout, "scores")
    if not np.isfinite(s).all():
        raise MopeqError(f"scores hold {int((~np.isfinite(s)).sum())} non-finite values")
    return s


@dataclass(frozen=True, eq=False)
class AllocInputs:
    """What an allocation method's handler receives besides the layout and the config.

    Attributes:
        s: the scores as a validated finite [L, E] array.
        scores: the scores as passed (a ``Scores`` may carry its method's own ``errors``).
        errors: [L, E, len(bits)] quantization errors, or None.
        reference: the map ``random`` permutes, or None.
    """

    s: np.ndarray
    scores: object = None
    errors: np.ndarray | None = None
    reference: BitMap | None = None


def new_map(bits, layout: MoELayout, method: str, config: AllocConfig, **kw) -> BitMap:
    """A handler's ``BitMap``: expert numels from the layout, the bit set and seed in ``meta``."""
    meta = {"bit_set": list(config.bits), "seed": config.seed, **kw.pop("meta", {})}
    return BitMap(bits, method, numel=LayoutArrays.of(layout).expert_numel, meta=meta, **kw)


def snap_per_layer(bitmap: BitMap, layout: MoELayout, rule: str = "mean") -> BitMap:
    """One width per MoE layer, so fused-MoE engines (vLLM, llama.cpp, ...) can load the map.

    Rules: ``mean`` = the layer's numel-weighted mean width rounded to the nearest width allowed
    (the map's ``meta["bit_set"]`` plus the widths it uses), ties up; ``max`` = the layer's
    widest (never loses precision); ``min`` = its narrowest.
    """
    if rule not in SNAP_RULES:
        raise MopeqError(f"rule {rule!r} is not one of {SNAP_RULES}")
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
