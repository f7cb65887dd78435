"""The method tables: one row per sensitivity method and one per allocation method.

Torch-free on purpose (``import app`` stays light). Adding a method means writing its function in
a module of its own (or beside its kin) and adding one row here that names it
(``"module:function"``, imported only when the method runs); the CLI choices, the app's
dropdowns, the data requirement, probe defaults, the settings each method reads and the budget
allocator's use of per-bit errors all follow from the row.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from mopeq.core.errors import MopeqError


@dataclass(frozen=True)
class MethodInfo:
    """What the rest of mopeq needs to know about a sensitivity method.

    Attributes:
        name: the method name (CLI, API, cache key).
        label: a short human description (dropdowns, reports).
        needs_data: it runs the model on calibration data.
        stochastic: its result depends on a random probe seed (``ProfileConfig.seed``).
        default_probes: Hutchinson probes when ``ProfileConfig.probes`` is None (0: none).
        uses_clusters: its scores are meant for MoPEQ's k-means clustering; False when its
            per-bit errors are meant to drive the budget allocator directly.
        provides_errors: ``Scores.errors`` holds the method's own per-expert error at each
            candidate width (ε_e(b)); the budget allocator then uses it instead of
            ``score x RTN weight error``.
        needs_grad: it back-propagates to the expert weights (fails on models whose expert
            path runs under ``torch.no_grad``).
        closed_form: it also has an exact closed form (``ProfileConfig.closed_form``).
        estimator: ``"module:function"`` of its estimator, called as
            ``(model, layout, config, data, progress)`` (``sensitivity.estimators``).
    """

    name: str
    label: str
    needs_data: bool
    stochastic: bool = False
    default_probes: int = 0
    uses_clusters: bool = True
    provides_errors: bool = False
    needs_grad: bool = False
    closed_form: bool = False
    estimator: str = ""


_EST = "mopeq.sensitivity.estimators:"
TABLE: tuple[MethodInfo, ...] = (
    MethodInfo("frobenius", "paper's data-free baseline: Hutchinson trace of ||W||_F (MoPEQ)",
               needs_data=False, stochastic=True, default_probes=100, closed_form=True,
               estimator=_EST + "_frobenius"),
    MethodInfo("hessian", "Hutchinson trace of the calibration-loss Hessian", needs_data=True,
               stochastic=True, default_probes=64, needs_grad=True, estimator=_EST + "_hessian"),
    MethodInfo("fisher", "empirical Fisher trace of the calibration loss", needs_data=True,
               needs_grad=True, estimator=_EST + "_fisher"),
    MethodInfo("frequency", "routing counts on calibration data", needs_data=True,
               estimator=_EST + "_frequency"),
    MethodInfo("block_error", "MoE block output error of each RTN-quantized expert (one pass)",
               needs_data=True, uses_clusters=False, provides_errors=True,
               estimator="mopeq.sensitivity.block_error:_block_error"),
    MethodInfo("block_fisher", "Fisher-weighted MoE block output error (approx. answer KL)",
               needs_data=True, stochastic=True, uses_clusters=False, provides_errors=True,
               estimator="mopeq.sensitivity.block_error:_block_fisher"),
    MethodInfo("measured", "ground truth: answer KL with one expert RTN-quantized at a time",
               needs_data=True, uses_clusters=False, provides_errors=True,
               estimator="mopeq.sensitivity.measured:_measured"),
)
BY_NAME: dict[str, MethodInfo] = {m.name: m for m in TABLE}
# The data-aware method the sensitivity report ranks best on the embedded model (Spearman 0.95
# with ``measured``, in seconds; README "Sensitivity quality"). The app names it; the first
# view stays on ``frobenius`` (instant, the paper's data-free baseline).
RECOMMENDED = "block_fisher"
NAMES: tuple[str, ...] = tuple(BY_NAME)
DATA_METHODS: tuple[str, ...] = tuple(m.name for m in TABLE if m.needs_data)
DEFAULT_PROBES: dict[str, int] = {m.name: m.default_probes for m in TABLE if m.default_probes}
ERROR_METHODS: tuple[str, ...] = tuple(m.name for m in TABLE if m.provides_errors)
PROBED: tuple[str, ...] = tuple(DEFAULT_PROBES)  # Hutchinson probes (a probes control)
STOCHASTIC: tuple[str, ...] = tuple(m.name for m in TABLE if m.stochastic)  # read the seed


def _row(rows: dict, name: str, kind: str):
    """``rows[name]``, or a ``MopeqError`` that lists the known names."""
    if name not in rows:
        raise MopeqError(f"unknown {kind} {name!r}; choose one of {tuple(rows)}")
    return rows[name]


def info(name: str) -> MethodInfo:
    """The row of sensitivity method ``name`` (``MopeqError`` for an unknown one)."""
    return _row(BY_NAME, name, "method")


def resolve(ref: str):
    """The function a row names as ``"module:function"`` (its module imported now)."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


# ------------------------------------------------------------------ allocation methods


@dataclass(frozen=True)
class AllocatorInfo:
    """What the rest of mopeq needs to know about an allocation method.

    Attributes:
        name: the method name (``AllocConfig.method``, CLI, API).
        label: a short human description (dropdowns, reports).
        handler: ``"module:function"`` called as ``(inputs, layout, config) -> BitMap``
            (``allocation.bitmap.AllocInputs``).
        uses_clusters: reads ``clusters`` (and ``log_scores``, ``n_init``).
        uses_scope: reads ``scope`` (model- or layer-wise).
        uses_target: needs exactly one of ``target_bits`` / ``target_gb``.
        uses_uniform_bits: reads ``uniform_bits``.
        needs_scores: the result depends on the scores.
        needs_errors: uses per-width quantization errors (``quant_errors`` or the scores' own).
        seeded: reads ``seed`` (k-means++ seeding, a permutation).
        score_method: the scores it always ranks by, whatever the user picked (``frequency``:
            routing counts), or None.
    """

    name: str
    label: str
    handler: str
    uses_clusters: bool = False
    uses_scope: bool = False
    uses_target: bool = False
    uses_uniform_bits: bool = False
    needs_scores: bool = True
    needs_errors: bool = False
    seeded: bool = False
    score_method: str | None = None


_ALLOC = "mopeq.allocation."
ALLOCATORS: tuple[AllocatorInfo, ...] = (
    AllocatorInfo("kmeans", "MoPEQ: k-means clusters of the scores, most sensitive -> most bits",
                  _ALLOC + "kmeans:kmeans_map", uses_clusters=True, uses_scope=True, seeded=True),
    AllocatorInfo("budget", "least predicted loss within a memory target (bits or GB)",
                  _ALLOC + "budget:budget_map", uses_target=True, needs_errors=True),
    AllocatorInfo("uniform", "every expert at one width", _ALLOC + "baselines:uniform_map",
                  uses_uniform_bits=True, needs_scores=False),
    AllocatorInfo("frequency", "k-means clusters of routing frequencies",
                  _ALLOC + "kmeans:kmeans_map", uses_clusters=True, uses_scope=True, seeded=True,
                  score_method="frequency"),
    AllocatorInfo("random", "the k-means map's bits, shuffled (seeded)",
                  _ALLOC + "baselines:random_map", uses_clusters=True, uses_scope=True,
                  seeded=True),
    AllocatorInfo("inverted", "control: the k-means clusters with their widths reversed "
                  "(most sensitive -> fewest bits)", _ALLOC + "baselines:inverted_map",
                  uses_clusters=True, uses_scope=True, seeded=True),
)
ALLOC_BY_NAME: dict[str, AllocatorInfo] = {m.name: m for m in ALLOCATORS}
ALLOC_NAMES: tuple[str, ...] = tuple(ALLOC_BY_NAME)


def allocator(name: str) -> AllocatorInfo:
    """The row of allocation method ``name`` (``MopeqError`` for an unknown one)."""
    return _row(ALLOC_BY_NAME, name, "allocation method")
