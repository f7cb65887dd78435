"""The settings of a run, in one frozen dataclass: ``RunSpec``.

Every front end (the page, the API, the CLI, the study) describes what it wants as a
``RunSpec``; the spec validates itself once (``MopeqError`` naming what is wrong) and builds each
stage's config. Its defaults are read from ``mopeq.core.defaults``, so each default value is
written once. Torch-free at import: the stage configs are imported when they are built.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mopeq.allocation.bitmap import SNAP_RULES
from mopeq.core import defaults as D
from mopeq.core import methods
from mopeq.core.errors import MopeqError

if TYPE_CHECKING:
    from mopeq.allocation.allocate import AllocConfig
    from mopeq.core.memory import MemoryConfig
    from mopeq.quantize.autoround import QuantConfig
    from mopeq.sensitivity.profile import ProfileConfig

QUANT_MODES = ("rtn", "tuned")


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data for the data-aware methods (what enters their cache key)."""

    n_batches: int = D.CALIB_BATCHES
    batch_size: int = D.CALIB_BATCH_SIZE
    seed: int = D.SEED


@dataclass(frozen=True)
class RunSpec:
    """What one run does, from the scores to the evaluation.

    Attributes:
        score_method: the sensitivity method (``core.methods`` table).
        probes: Hutchinson probes; None or 0: the method's default.
        closed_form: frobenius: the exact value of its Hutchinson estimate.
        normalize: divide each score by its layer's sum (the authors' MolmoE variant).
        max_cost_s: ``measured`` refuses beyond this estimated time (None: no cap).
        profile_seed: seed of the probes and of the calibration batches.
        calib_batches: calibration batches of the data-aware methods.
        calib_batch_size: sequences per calibration batch.
        alloc_method: kmeans | budget | uniform | frequency | random.
        clusters: k-means clusters (C).
        bits: the widths clusters map to (the budget allocator's candidates).
        scope: ``model`` (one clustering) or ``layer`` (one per MoE layer).
        log_scores: cluster log10 scores.
        target_bits: budget: average expert bits (ignored when ``target_gb`` is set).
        target_gb: budget: total size in GB.
        uniform_bits: the width of the ``uniform`` baseline.
        snap: one width per layer for fused-MoE engines (mean | max | min; None: per expert).
        seed: the allocation's seed (``random``, k-means initialisation).
        group_size: weights per scale group.
        base_bits: attention, dense MLP and shared experts (16: unquantized).
        sym: symmetric quantization.
        mode: ``rtn`` (data-free) or ``tuned`` (SignRound on local text).
        iters: tuned mode: SignRound iterations.
        quant_seed: tuned mode: SignRound's seed.
        dataset: the evaluation data ("synthetic", a local MME folder or parquet, a hub id).
        pairs: image pairs of the evaluation subset (None: all).
        eval_seed: seed of the evaluation subset.
    """

    score_method: str = D.SCORE_METHOD
    probes: int | None = None
    closed_form: bool = D.CLOSED_FORM
    normalize: bool = False
    max_cost_s: float | None = D.MAX_COST_S
    profile_seed: int = D.SEED
    calib_batches: int = D.CALIB_BATCHES
    calib_batch_size: int = D.CALIB_BATCH_SIZE
    alloc_method: str = D.ALLOC_METHOD
    clusters: int = D.CLUSTERS
    bits: tuple[int, ...] = D.BITS
    scope: str = D.SCOPE
    log_scores: bool = False
    target_bits: float | None = D.TARGET_BITS
    target_gb: float | None = None
    uniform_bits: int = D.UNIFORM_BITS
    snap: str | None = None
    seed: int = D.SEED
    group_size: int = D.GROUP_SIZE
    base_bits: int = D.BASE_BITS
    sym: bool = D.SYM
    mode: str = D.QUANT_MODE
    iters: int = D.QUANT_ITERS
    quant_seed: int = D.SEED
    dataset: str = D.DATASET
    pairs: int | None = None
    eval_seed: int = D.SEED

    def __post_init__(self):
        object.__setattr__(self, "bits", _bit_set(self.bits))
        if self.snap in ("", D.NO_SNAP):
            object.__setattr__(self, "snap", None)
        problems = _problems(self)
        if problems:
            raise MopeqError("; ".join(problems))

    def replace(self, **changes) -> RunSpec:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------- stage configs

    def profile_config(self) -> ProfileConfig:
        """The sensitivity stage's ``ProfileConfig``."""
        from mopeq.sensitivity.profile import ProfileConfig

        return _built(ProfileConfig, probes=int(self.probes) if self.probes else None,
                      seed=self.profile_seed, closed_form=bool(self.closed_form),
                      normalize_per_layer=self.normalize, group_size=self.group_size,
                      max_cost_s=self.max_cost_s or None)

    def calib_config(self) -> CalibConfig:
        """The calibration data of the data-aware methods."""
        return CalibConfig(self.calib_batches, self.calib_batch_size, self.profile_seed)

    def memory_config(self) -> MemoryConfig:
        """The storage settings the memory estimate counts."""
        from mopeq.core.memory import MemoryConfig

        return _built(MemoryConfig, group_size=self.group_size, base_bits=self.base_bits,
                      sym=self.sym)

    def alloc_config(self) -> AllocConfig:
        """The allocation stage's ``AllocConfig`` (a budget target only for ``budget``)."""
        from mopeq.allocation.allocate import AllocConfig

        info = methods.ALLOC_BY_NAME.get(self.alloc_method)  # None: AllocConfig says why
        budget = info is not None and info.uses_target
        return _built(AllocConfig, method=self.alloc_method, clusters=self.clusters,
                      bits=self.bits, scope=self.scope, log_scores=self.log_scores,
                      target_bits=self.target_bits if budget and self.target_gb is None else None,
                      target_gb=self.target_gb if budget else None,
                      uniform_bits=self.uniform_bits, seed=self.seed,
                      memory=self.memory_config())

    def quant_config(self) -> QuantConfig:
        """The quantization stage's ``QuantConfig``."""
        from mopeq.quantize.autoround import QuantConfig

        return _built(QuantConfig, mode=self.mode, group_size=self.group_size, sym=self.sym,
                      base_bits=self.base_bits, iters=self.iters, seed=self.quant_seed)

    # ------------------------------------------------------------- derived

    @property
    def allocation_score_method(self) -> str:
        """The scores the allocation ranks by: ``frequency`` always uses routing counts."""
        info = methods.ALLOC_BY_NAME.get(self.alloc_method)
        return (info and info.score_method) or self.score_method

    def for_allocation(self) -> RunSpec:
        """This spec with the scores the allocation ranks by."""
        return self.replace(score_method=self.allocation_score_method)

    def score_key(self) -> tuple[str, str]:
        """What determines the scores (a memo key): the method and its settings."""
        settings = {**self.profile_config().settings(self.score_method),
                    "calib": dataclasses.asdict(self.calib_config())}
        return self.score_method, json.dumps(settings, sort_keys=True, default=str)


def _built(cls, **kwargs):
    """``cls(**kwargs)``; a stage config's ``ValueError`` becomes a ``MopeqError``."""
    try:
        return cls(**kwargs)
    except MopeqError:
        raise
    except ValueError as exc:
        raise MopeqError(str(exc)) from exc


def _bit_set(bits) -> tuple[int, ...]:
    """Sorted distinct widths, by the one check of a bit set (``core.memory.bit_set``)."""
    from mopeq.core.memory import bit_set  # lazily: importing the spec stays light

    try:
        empty = len(bits) == 0
    except TypeError:
        empty = False
    if empty:  # the page's message: the boxes are all unticked
        raise MopeqError("no bit width selected: give at least one, e.g. bits=(2, 3, 4)")
    return _built(bit_set, bits=bits)


def _problems(s: RunSpec) -> list[str]:
    """What is wrong with ``s`` before any stage runs (the stage configs check the rest)."""
    checks = [
        (s.score_method in methods.NAMES, f"unknown sensitivity method {s.score_method!r}; "
                                          f"choose one of {', '.join(methods.NAMES)}"),
        (s.probes is None or (isinstance(s.probes, int) and s.probes >= 0),
         f"probes must be an int >= 0, got {s.probes!r}"),
        (isinstance(s.clusters, int) and s.clusters >= 1,
         f"clusters must be an int >= 1, got {s.clusters!r}"),
        (s.snap is None or s.snap in SNAP_RULES,
         f"snap {s.snap!r} is not one of none, {', '.join(SNAP_RULES)}"),
        (s.mode in QUANT_MODES, f"mode {s.mode!r} is not one of {', '.join(QUANT_MODES)}"),
        (s.pairs is None or s.pairs >= 1, f"pairs must be >= 1, got {s.pairs}"),
    ]
    return [msg for ok, msg in checks if not ok]
