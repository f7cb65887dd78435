"""The table of sensitivity methods: one row per method, read by every front end.

Torch-free on purpose (``import app`` stays light). Adding a method means writing its estimator
(``sensitivity.estimators.ESTIMATORS`` or a module of its own registered there) and adding one row
here; the CLI choices, the app's dropdowns, the data requirement, probe defaults and the budget
allocator's use of per-bit errors all follow from the row.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    """

    name: str
    label: str
    needs_data: bool
    stochastic: bool = False
    default_probes: int = 0
    uses_clusters: bool = True
    provides_errors: bool = False
    needs_grad: bool = False


TABLE: tuple[MethodInfo, ...] = (
    MethodInfo("frobenius", "paper's data-free baseline: Hutchinson trace of ||W||_F (MoPEQ)",
               needs_data=False, stochastic=True, default_probes=100),
    MethodInfo("hessian", "Hutchinson trace of the calibration-loss Hessian", needs_data=True,
               stochastic=True, default_probes=64, needs_grad=True),
    MethodInfo("fisher", "empirical Fisher trace of the calibration loss", needs_data=True,
               needs_grad=True),
    MethodInfo("frequency", "routing frequency on calibration data", needs_data=True),
    MethodInfo("block_error", "MoE block output error of each RTN-quantized expert (one pass)",
               needs_data=True, uses_clusters=False, provides_errors=True),
    MethodInfo("block_fisher", "Fisher-weighted MoE block output error (approx. answer KL)",
               needs_data=True, stochastic=True, uses_clusters=False, provides_errors=True),
    MethodInfo("measured", "ground truth: answer KL with one expert RTN-quantized at a time",
               needs_data=True, uses_clusters=False, provides_errors=True),
)
BY_NAME: dict[str, MethodInfo] = {m.name: m for m in TABLE}
# The data-aware method the sensitivity report ranks best on the embedded model (Spearman 0.97
# with ``measured``, in seconds; README "Sensitivity quality"). The app names it; the first
# view stays on ``frobenius`` (instant, the paper's data-free baseline).
RECOMMENDED = "block_fisher"
NAMES: tuple[str, ...] = tuple(BY_NAME)
DATA_METHODS: tuple[str, ...] = tuple(m.name for m in TABLE if m.needs_data)
DEFAULT_PROBES: dict[str, int] = {m.name: m.default_probes for m in TABLE if m.default_probes}


def info(name: str) -> MethodInfo:
    """The row of ``name``.

    Raises:
        ValueError: for an unknown method (the message lists the known ones).
    """
    if name not in BY_NAME:
        raise ValueError(f"unknown method {name!r}; choose one of {NAMES}")
    return BY_NAME[name]
