"""Allocate bits to routed experts: sensitivity scores (MoE layer x expert) -> ``BitMap``.

The dispatcher and its validated config. Methods (``AllocConfig.method``), each in its module:

- ``kmeans`` (MoPEQ, ``allocation.kmeans``): C clusters over the expert scores, model-wise or
  layer-wise; the most sensitive cluster gets the most bits (mapping rules there).
- ``frequency``: the same clustering on routing-frequency scores (the caller passes them).
- ``budget`` (``allocation.budget``): per-expert bits minimising the predicted loss under a
  target in average bits or GB; ``pareto`` traces its frontier.
- ``uniform``, ``random`` (``allocation.baselines``): one width for all; a seeded permutation of
  a reference map's bits.

``allocation.bitmap`` holds the ``BitMap`` and ``snap_per_layer`` (one width per layer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mopeq.allocation.bitmap import AllocInputs, BitMap, scores_array
from mopeq.allocation.knapsack import SOLVERS
from mopeq.core import defaults as D
from mopeq.core import methods
from mopeq.core.errors import MopeqError
from mopeq.core.layout import MoELayout
from mopeq.core.memory import FP_BITS, MemoryConfig, bit_set

METHODS = methods.ALLOC_NAMES
SCOPES = ("model", "layer")


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
            raise MopeqError("invalid AllocConfig: " + "; ".join(problems))

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
        (c.method not in METHODS or not methods.ALLOC_BY_NAME[c.method].uses_target
         or (c.target_bits is None) != (c.target_gb is None),
         f"method {c.method!r} needs exactly one of target_bits or target_gb"),
    ]
    return [msg for ok, msg in checks if not ok]


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
    inputs = AllocInputs(scores_array(scores, layout), scores, errors, reference)
    bitmap = methods.resolve(methods.allocator(config.method).handler)(inputs, layout, config)
    source = getattr(scores, "method", None)
    if isinstance(source, str):
        bitmap.meta["scores"] = source
    return bitmap
