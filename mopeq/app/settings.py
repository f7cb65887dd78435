"""The page's controls as views of a ``RunSpec``: ``ScoreSpec`` and ``AllocSettings``.

Widget values (floats from sliders, strings from dropdowns, None) become typed settings here;
the ``RunSpec`` they build validates them and builds every stage's config. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mopeq.core import defaults as D
from mopeq.workflow.spec import RunSpec

if TYPE_CHECKING:
    from mopeq.allocation.allocate import AllocConfig
    from mopeq.sensitivity.profile import ProfileConfig


@dataclass(frozen=True)
class ScoreSpec:
    """Which sensitivity to compute: a method and its probe settings (a view of a ``RunSpec``)."""

    method: str = D.SCORE_METHOD
    probes: int = 0  # 0: the method's default (frobenius 100, hessian 64)
    closed_form: bool = D.PAGE_CLOSED_FORM  # frobenius: the exact value of its Hutchinson estimate

    def run_spec(self) -> RunSpec:
        """The ``RunSpec`` of these scores (it validates and names what is wrong)."""
        return RunSpec(score_method=self.method, probes=int(self.probes) or None,
                       closed_form=bool(self.closed_form))

    def config(self) -> ProfileConfig:
        """The library's ``ProfileConfig``."""
        return self.run_spec().profile_config()

    def key(self) -> tuple:
        """What determines the scores (the memo key)."""
        return self.run_spec().score_key()


@dataclass(frozen=True)
class AllocSettings:
    """The allocation controls of the page (and of the API endpoints): a view of a ``RunSpec``."""

    method: str = D.ALLOC_METHOD
    clusters: int = D.CLUSTERS
    bits: tuple[int, ...] = D.BITS
    scope: str = D.SCOPE
    log_scores: bool = False
    target_bits: float = D.TARGET_BITS
    uniform_bits: int = D.UNIFORM_BITS
    group_size: int = D.GROUP_SIZE
    base_bits: int = D.BASE_BITS
    snap: str = D.NO_SNAP  # none | mean | max | min
    seed: int = D.SEED
    target_gb: float | None = None  # budget: a size in GB instead of ``target_bits``

    @staticmethod
    def of(method=D.ALLOC_METHOD, clusters=D.CLUSTERS, bits=D.BITS, scope=D.SCOPE,
           log_scores=False, target_bits=D.TARGET_BITS, uniform_bits=D.UNIFORM_BITS,
           group_size=D.GROUP_SIZE, base_bits=D.BASE_BITS, snap=D.NO_SNAP, seed=D.SEED,
           target_gb=None) -> AllocSettings:
        """Build from widget values (floats from sliders, strings from dropdowns, None)."""
        bits = D.BITS if bits is None else bits  # None: the default; [] is an error
        return AllocSettings(str(method), int(clusters), tuple(int(b) for b in bits), str(scope),
                             bool(log_scores), float(target_bits), int(uniform_bits),
                             int(group_size), int(base_bits), str(snap or D.NO_SNAP), int(seed),
                             None if target_gb in (None, 0) else float(target_gb))

    def spec(self, **more) -> RunSpec:
        """The ``RunSpec`` of these settings, with ``more`` of its fields (mode, pairs...)."""
        return RunSpec(alloc_method=self.method, clusters=self.clusters, bits=self.bits,
                       scope=self.scope, log_scores=self.log_scores,
                       target_bits=self.target_bits, target_gb=self.target_gb,
                       uniform_bits=self.uniform_bits, group_size=self.group_size,
                       base_bits=self.base_bits, snap=self.snap, seed=self.seed, **more)

    def config(self) -> AllocConfig:
        """The library's ``AllocConfig`` (a ``MopeqError`` names what is wrong)."""
        return self.spec().alloc_config()

    def score_method(self, chosen: str) -> str:
        """The scores this method allocates by (``frequency`` always uses routing counts)."""
        return self.spec(score_method=chosen).allocation_score_method
