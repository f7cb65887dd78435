"""App-only helpers: the shared model cache, per-session state, and the calls the app makes.

Nothing here imports gradio or does numerics: it turns the app's control values into the
library's configs, calls ``workflow.pipeline``, and shapes results into tables. ``app.py`` wires
these to the page and to the public API endpoints.

Sharing rules (several users, one process):

- A loaded model is the largest object in the process, so models live once, in a small LRU
  (``ModelCache``) keyed by ``(source, trust_remote_code)`` and shared by every session.
  Scores and quantization errors computed for a model are memoised beside it: they are pure
  functions of (model, settings), so sharing them leaks nothing between users.
- Anything that *runs* the shared model holds its ``ModelEntry.lock``: data-aware sensitivity
  switches the expert kernels and installs routing hooks, which a concurrent forward pass or
  a quantization's copy of the model must not see. Allocation and memory only read weights
  (or nothing) and never take the lock, so the live controls never wait behind a quantization.
- Everything a user chose or produced (their scores, allocation, runs) lives in that user's
  ``SessionState``.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mopeq.app.view import Drawn
from mopeq.core import methods

if TYPE_CHECKING:
    import pandas as pd

    from mopeq.allocation.allocate import AllocConfig
    from mopeq.core.layout import MoELayout
    from mopeq.model.loading import LoadedModel
    from mopeq.sensitivity.profile import ProfileConfig, Scores
    from mopeq.workflow.pipeline import Allocation, Run

Progress = Callable[[float, str], None]
EMBEDDED = "embedded"
# the libraries' method names (tests check they match), here to keep ``import app`` light
SCORE_METHODS = methods.NAMES  # the torch-free method table, as mopeq.sensitivity.profile.METHODS
ALLOC_METHODS = ("kmeans", "budget", "uniform", "frequency", "random")  # allocate.METHODS
CACHE_SIZE = 2  # loaded models kept; the free Spaces CPU has 16 GB
MEMO_SIZE = 16  # scores / error tables remembered per model


class Cancelled(Exception):
    """The user pressed cancel; the job stops at its next progress report."""


def _noop(_f: float, _m: str) -> None:
    pass


# ------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class ScoreSpec:
    """Which sensitivity to compute: a method and its probe settings."""

    method: str = "frobenius"
    probes: int = 0  # 0: the method's default (frobenius 100, hessian 64)
    closed_form: bool = True  # frobenius: the exact value of its Hutchinson estimate

    def config(self) -> ProfileConfig:
        """The library's ``ProfileConfig`` (validated there)."""
        from mopeq.sensitivity.profile import METHODS, ProfileConfig

        if self.method not in METHODS:
            raise ValueError(f"unknown sensitivity method {self.method!r}; choose one of "
                             f"{', '.join(METHODS)}")
        probes = int(self.probes) if self.probes else None
        return ProfileConfig(probes=probes, closed_form=bool(self.closed_form))

    def key(self) -> tuple:
        """What determines the scores (the memo key)."""
        import json

        return self.method, json.dumps(self.config().settings(self.method), sort_keys=True)


@dataclass(frozen=True)
class AllocSettings:
    """The allocation controls of the page (and of the ``allocate`` API endpoint)."""

    method: str = "kmeans"
    clusters: int = 3
    bits: tuple[int, ...] = (2, 3, 4)
    scope: str = "model"
    log_scores: bool = False
    target_bits: float = 3.0
    uniform_bits: int = 4
    group_size: int = 128
    base_bits: int = 4
    snap: str = "none"  # none | mean | max | min
    seed: int = 0

    @staticmethod
    def of(method="kmeans", clusters=3, bits=(2, 3, 4), scope="model", log_scores=False,
           target_bits=3.0, uniform_bits=4, group_size=128, base_bits=4, snap="none",
           seed=0) -> AllocSettings:
        """Build from widget values (floats from sliders, strings from dropdowns, None)."""
        bits = (2, 3, 4) if bits is None else bits  # None: the default; [] is an error
        return AllocSettings(str(method), int(clusters), tuple(int(b) for b in bits), str(scope),
                             bool(log_scores), float(target_bits), int(uniform_bits),
                             int(group_size), int(base_bits), str(snap or "none"), int(seed))

    def config(self) -> AllocConfig:
        """The library's ``AllocConfig`` (it validates and names what is wrong)."""
        from mopeq.allocation.allocate import AllocConfig
        from mopeq.core.memory import MemoryConfig

        if not self.bits:
            raise ValueError("no bit width selected: tick at least one of 2, 3, 4, 8")
        budget = self.method == "budget"
        return AllocConfig(method=self.method, clusters=self.clusters, bits=self.bits,
                           scope=self.scope, log_scores=self.log_scores,
                           target_bits=self.target_bits if budget else None,
                           uniform_bits=self.uniform_bits, seed=self.seed,
                           memory=MemoryConfig(self.group_size, self.base_bits))

    def score_method(self, chosen: str) -> str:
        """The scores this method allocates by (``frequency`` always uses routing counts)."""
        return "frequency" if self.method == "frequency" else chosen


# ------------------------------------------------------------------------ model cache


@dataclass
class ModelEntry:
    """A loaded model, its layout, and what has been computed for it (shared by sessions)."""

    loaded: LoadedModel
    layout: MoELayout
    lock: threading.RLock = field(default_factory=threading.RLock)  # held while the model runs
    memo: OrderedDict = field(default_factory=OrderedDict)
    memo_lock: threading.Lock = field(default_factory=threading.Lock)

    def remembered(self, key: tuple) -> Any:
        """A memoised value or None."""
        with self.memo_lock:
            return self.memo.get(key)

    def remember(self, key: tuple, value: Any) -> Any:
        """Memoise ``value`` (oldest entries go first)."""
        with self.memo_lock:
            self.memo[key] = value
            while len(self.memo) > MEMO_SIZE:
                self.memo.popitem(last=False)
        return value

    def running(self, on_progress: Progress) -> _Running:
        """Context manager holding ``lock``; reports waiting (and so can be cancelled)."""
        return _Running(self.lock, on_progress)


class _Running:
    def __init__(self, lock: threading.RLock, on_progress: Progress):
        self.lock, self.on_progress = lock, on_progress

    def __enter__(self):
        while not self.lock.acquire(timeout=0.5):
            self.on_progress(0.0, "waiting: another job is running this model")

    def __exit__(self, *exc):
        self.lock.release()


class ModelCache:
    """A small LRU of loaded models keyed by ``(source, trust_remote_code)``, thread-safe.

    One per app (``build_demo`` makes it): sessions share models instead of copying them.
    A model is loaded once even when several sessions ask for it at the same moment.
    """

    def __init__(self, size: int = CACHE_SIZE, loader: Callable | None = None):
        self.size = size
        self.loader = loader or _load_entry
        self.entries: OrderedDict[tuple[str, bool], ModelEntry] = OrderedDict()
        self.guard = threading.Lock()
        self.loading: dict[tuple[str, bool], threading.Lock] = {}

    def get(self, source: str, trust_remote_code: bool = False) -> ModelEntry:
        """The entry for a source, loading it on a miss.

        Raises:
            ValueError: ``ModelLoadError`` or ``NotMoEError`` with a readable message.
        """
        key = self.key(source, trust_remote_code)
        hit = self._hit(key)
        if hit is not None:
            return hit
        with self.guard:
            load_lock = self.loading.setdefault(key, threading.Lock())
        with load_lock:
            hit = self._hit(key)
            if hit is None:
                hit = self.loader(*key)
                with self.guard:
                    self.entries[key] = hit
                    while len(self.entries) > self.size:
                        self.entries.popitem(last=False)
        return hit

    @staticmethod
    def key(source: str, trust_remote_code: bool = False) -> tuple[str, bool]:
        """The cache key of a source as typed (blank means the embedded model)."""
        return (source or "").strip() or EMBEDDED, bool(trust_remote_code)

    def _hit(self, key) -> ModelEntry | None:
        with self.guard:
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
            return entry


def _load_entry(source: str, trust_remote_code: bool) -> ModelEntry:
    from mopeq.model.loading import load_model
    from mopeq.model.moe import discover

    loaded = load_model(source, trust_remote_code=trust_remote_code)
    return ModelEntry(loaded, discover(loaded.model))


# ------------------------------------------------------------------------ session


class SessionState:
    """One user's choices and results; gradio keeps one per browser session.

    Attributes:
        key: ``(source, trust_remote_code)`` of the model this session works on.
        scores: the scores this user computed, by method (the latest settings win).
        allocation: the latest allocation (bits drawn on the heatmaps, exported).
        runs: summaries of this user's quantize-and-evaluate runs (``Run.summary`` + pairs).
        last_run: the latest ``Run`` (its quantized model is what export writes).
        jobs: a cancel flag per kind of long job; each new job gets a fresh flag.
    """

    def __init__(self):
        self.key: tuple[str, bool] | None = None
        self.scores: dict[str, Scores] = {}
        self.allocation: Allocation | None = None
        self.runs: list[dict] = []
        self.last_run: Run | None = None
        self.jobs: dict[str, threading.Event] = {}
        self.export_dir: Path | None = None  # the latest downloads
        self.drawn = Drawn()  # what this page's outputs show (live events skip the same)

    def __deepcopy__(self, memo) -> SessionState:
        # gradio deep-copies the initial value once per new session: start empty
        return SessionState()

    def use_model(self, key: tuple[str, bool]) -> None:
        """Switch to another model; results of the previous one are dropped."""
        if key != self.key:
            self.close()
            self.__init__()
            self.key = key

    def export_folder(self) -> Path:
        """A fresh temporary folder for downloads; the previous one (already served) goes."""
        self.close(keep_run=True)
        self.export_dir = Path(tempfile.mkdtemp(prefix="mopeq-export-"))
        return self.export_dir

    def close(self, keep_run: bool = False) -> None:
        """Remove the downloads folder (and drop the quantized model unless ``keep_run``)."""
        if self.export_dir is not None:
            shutil.rmtree(self.export_dir, ignore_errors=True)
            self.export_dir = None
        if not keep_run:
            self.last_run = None

    def new_job(self, kind: str) -> threading.Event:
        """A fresh cancel flag for a job of ``kind`` (an older job keeps its own)."""
        self.jobs[kind] = threading.Event()
        return self.jobs[kind]

    def cancel(self, kind: str) -> bool:
        """Flag the running job of ``kind``; False when none was running."""
        flag = self.jobs.get(kind)
        if flag is None or flag.is_set():
            return False
        flag.set()
        return True


def cancellable(flag: threading.Event, report: Progress) -> Progress:
    """A progress callback that raises ``Cancelled`` once ``flag`` is set."""
    def on_progress(fraction: float, message: str) -> None:
        if flag.is_set():
            raise Cancelled("cancelled")
        report(fraction, message)

    return on_progress


# ------------------------------------------------------------------------ computations


def layout_summary(entry: ModelEntry) -> dict:
    """Layers, experts, top-k, shared experts and parameters by component (no per-expert list)."""
    info = entry.layout.to_json()
    info.pop("experts")
    loaded = entry.loaded
    return {"source": loaded.source, "kind": loaded.kind, "fingerprint": loaded.fingerprint,
            **info}


def scores(entry: ModelEntry, spec: ScoreSpec,
           on_progress: Progress = _noop) -> tuple[Scores, bool]:
    """Scores by ``spec`` and whether they were already known (memo or disk cache)."""
    from mopeq.workflow import pipeline

    key = ("scores", *spec.key())
    hit = entry.remembered(key)
    if hit is not None:
        on_progress(1.0, f"{spec.method}: cached")
        return hit, True
    with entry.running(on_progress):
        hit = entry.remembered(key)  # another session may have computed it while we waited
        if hit is not None:
            return hit, True
        result = pipeline.sensitivity(entry.loaded, entry.layout, spec.method, spec.config(),
                                      on_progress=on_progress)
    entry.remember(key, result)
    return result, bool(result.meta.get("cache_hit"))


def errors(entry: ModelEntry, bits: tuple[int, ...], group_size: int):
    """Per-expert round-to-nearest errors [L, E, B] (memoised; they only read weights)."""
    from mopeq.workflow import pipeline

    key = ("errors", tuple(sorted(bits)), group_size)
    hit = entry.remembered(key)
    if hit is None:
        hit = entry.remember(key, pipeline.errors_for(entry.loaded, entry.layout, bits,
                                                      group_size))
    return hit


def allocation(entry: ModelEntry, score: Scores, settings: AllocSettings,
               with_pareto: bool = True, judge: Scores | None = None) -> Allocation:
    """Bits, memory estimate and (with errors) the Pareto frontier for ``settings``.

    ``judge``: the sensitivities the predicted loss weighs errors by (default ``score``).
    """
    from mopeq.workflow import pipeline

    config = settings.config()
    need_errors = with_pareto or config.method == "budget"
    errs = errors(entry, config.bits, settings.group_size) if need_errors else None
    snap = None if settings.snap == "none" else settings.snap
    return pipeline.allocation(score, entry.layout, config, snap=snap, errors=errs,
                               with_pareto=with_pareto, judge=judge)


def bf16_breakdown(entry: ModelEntry) -> dict[str, int]:
    """Bytes per component with every weight in 16 bits (the memory chart's reference)."""
    from mopeq.core.memory import MemoryConfig, estimate

    key = ("bf16",)
    hit = entry.remembered(key)
    if hit is None:
        shape = (entry.layout.num_moe_layers, entry.layout.num_experts)
        full = [[16] * shape[1] for _ in range(shape[0])]
        hit = entry.remember(key, estimate(entry.layout, full, MemoryConfig(base_bits=16))
                             .breakdown)
    return hit


def quantize_evaluate(entry: ModelEntry, alloc: Allocation, settings: AllocSettings,
                      mode: str = "rtn", pairs: int = 50, label: str | None = None,
                      on_progress: Progress = _noop, scores: Scores | None = None,
                      seed: int = 0) -> Run:
    """Quantize with ``alloc``'s bits and evaluate baseline and quantized on ``pairs``.

    ``scores`` (those ``alloc`` was made from) travel with the run, so its export is whole.
    ``seed`` seeds tuned (SignRound) quantization: the same settings and seed give the same run.
    """
    from mopeq.quantize.autoround import QuantConfig
    from mopeq.workflow import pipeline

    qconfig = QuantConfig(mode=mode, group_size=settings.group_size,
                          base_bits=settings.base_bits, seed=int(seed))
    pairs = int(pairs)
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    with entry.running(on_progress):
        calib = pipeline.calibration_texts(entry.loaded) if mode == "tuned" else None
        run = pipeline.quantize_and_evaluate(entry.loaded, entry.layout, alloc, qconfig,
                                             pairs=pairs, label=label, calib_texts=calib,
                                             on_progress=on_progress)
    run.scores = scores
    return run


def sensitivity_quality(entry: ModelEntry, config=None, on_progress: Progress = _noop):
    """The sensitivity report (every method against ``measured``) of the entry's model.

    Minutes on the embedded model (each method's scores come from the cache when known); one
    heavy job at a time, like a quantization.
    """
    from mopeq.sensitivity.report import ReportConfig, sensitivity_report

    with entry.running(on_progress):
        return sensitivity_report(entry.loaded, config or ReportConfig(), on_progress)


REPORT_COLUMNS = ("method", "spearman", "spearman_ci", "spearman_heldout", "seed_reliability",
                  "split_half", "wall_s", "answer_kl@2.5", "answer_kl@3.0")


def report_table(report) -> pd.DataFrame:
    """The report's main columns, one row per method (what the page shows)."""
    frame = report.frame()
    return frame[[c for c in REPORT_COLUMNS if c in frame.columns]]


def report_summary(report) -> str:
    """One paragraph: the best-ranking method and where the paper's score stands."""
    rows = [r for r in report.rows if r["method"] != report.reference]
    if not rows:
        return "Only the reference was computed."
    best = max(rows, key=lambda r: r["spearman"])
    text = (f"Best ranking against `{report.reference}`: **{best['method']}** (Spearman "
            f"{best['spearman']:.2f}, 95 % CI [{best['spearman_ci'][0]:.2f}, "
            f"{best['spearman_ci'][1]:.2f}]).")
    paper = next((r for r in rows if r["method"] == "frobenius"), None)
    if paper is not None:
        text += (f" The paper's data-free `frobenius`: {paper['spearman']:.2f} "
                 f"[{paper['spearman_ci'][0]:.2f}, {paper['spearman_ci'][1]:.2f}]"
                 + (" — it ranks experts backwards." if paper["spearman_ci"][1] < 0 else "."))
    return text


def run_summary(run: Run, pairs: int) -> dict:
    """``Run.summary`` with the subset size and the per-category comparison."""
    per_cat = run.comparison["per_category"]
    return {**run.summary(), "scores": run.allocation.bitmap.meta.get("scores"),
            "pairs": int(pairs), "seed": run.quant.config.seed,
            "comparison": {c: {"baseline": v["baseline"], "quantized": v["other"],
                               "delta": v["delta"],
                               "baseline_ci95": run.baseline.per_category[c].get("ci95"),
                               "quantized_ci95": run.result.per_category[c].get("ci95"),
                               "delta_ci95": v.get("delta_ci95")}
                           for c, v in per_cat.items()}}


# ------------------------------------------------------------------------ tables & files


def layout_table(summary: dict) -> pd.DataFrame:
    """Parameters by component (components with none are left out), with shares."""
    import pandas as pd

    params = {k: v for k, v in summary["params"].items() if v and k != "total"}
    total = summary["params"]["total"]
    rows = [{"component": k, "parameters": v, "share": f"{v / total:.1%}"}
            for k, v in params.items()]
    rows.append({"component": "total", "parameters": total, "share": "100%"})
    return pd.DataFrame(rows)


CLUSTER_COLUMNS = ("cluster", "bits", "experts", "score_min", "score_max", "centroid")


def clusters_table(alloc: Allocation, score: Scores) -> pd.DataFrame:
    """One row per (cluster, bits): experts, score range, centroid."""
    import pandas as pd

    rows = alloc.bitmap.clusters_table(score.scores)
    frame = pd.DataFrame(rows, columns=list(CLUSTER_COLUMNS))
    return _tidy(frame.sort_values(["bits", "cluster"], na_position="first")
                 .reset_index(drop=True))


def category_table(run: Run) -> pd.DataFrame:
    """Per-category MME scores: baseline, quantized, delta."""
    import pandas as pd

    from mopeq.evaluation.stats import half_width

    rows = [{"category": c, "baseline": v["baseline"],
             "baseline ±": half_width(run.baseline.per_category[c].get("ci95")),
             "quantized": v["other"],
             "quantized ±": half_width(run.result.per_category[c].get("ci95")),
             "delta": v["delta"], "delta 95% CI": _interval(v.get("delta_ci95"))}
            for c, v in run.comparison["per_category"].items()]
    rows.append({"category": "total", "baseline": run.baseline.score,
                 "baseline ±": half_width(run.baseline.score_ci95),
                 "quantized": run.result.score, "quantized ±": half_width(run.result.score_ci95),
                 "delta": run.result.score - run.baseline.score,
                 "delta 95% CI": _interval(run.comparison.get("score_delta_ci95"))})
    return _tidy(pd.DataFrame(rows))


def _interval(ci) -> str | None:
    return None if ci is None else f"[{ci[0]:.1f}, {ci[1]:.1f}]"


def _tidy(frame: pd.DataFrame) -> pd.DataFrame:
    """Floats to four significant digits, for reading (exports keep full precision)."""
    return frame.map(lambda x: float(f"{x:.4g}") if isinstance(x, float) else x)


RUN_COLUMNS = ("label", "scores", "mode", "pairs", "avg_bits", "gb", "ratio_vs_bf16", "score",
               "score ±", "baseline_score", "delta", "delta 95% CI", "p_value", "kl",
               "flip_rate", "deployable_fused", "quantize_s")


def runs_table(runs: list[dict]) -> pd.DataFrame:
    """The session's runs, one row each."""
    import pandas as pd

    from mopeq.evaluation.stats import half_width

    derived = lambda r: {"score ±": half_width(r.get("score_ci95")),  # noqa: E731
                         "delta 95% CI": _interval(r.get("score_delta_ci95"))}
    return _tidy(pd.DataFrame([{k: {**r, **derived(r)}.get(k) for k in RUN_COLUMNS}
                               for r in runs], columns=list(RUN_COLUMNS)))


def run_group(summary: dict) -> str:
    """Allocation method and, where it matters, the scores it used: 'kmeans · hessian'."""
    uses_scores = summary["method"] in ("kmeans", "budget", "random") and summary.get("scores")
    return f"{summary['method']} · {summary['scores']}" if uses_scores else summary["method"]


def tradeoff_points(runs: list[dict], bf16_gb: float) -> list[dict]:
    """The runs for ``plots.tradeoff_scatter``, with one baseline point per subset size."""
    points = [{**r, "method": run_group(r)} for r in runs]
    for pairs in sorted({r["pairs"] for r in runs}):
        first = next(r for r in runs if r["pairs"] == pairs)
        points.append({"method": "baseline", "avg_bits": 16.0, "gb": bf16_gb,
                       "score": first["baseline_score"],
                       "score_ci95": first.get("baseline_score_ci95"),
                       "baseline": True, "label": f"unquantized ({pairs} pairs)"})
    return points


def scores_frame(entry: ModelEntry, score: Scores, bits=None) -> pd.DataFrame:
    """One row per expert: layer, expert, score, its parts, stderr, tokens, bits."""
    import pandas as pd

    layers = entry.layout.moe_layers
    rows = []
    for i, layer in enumerate(layers):
        for e in range(score.scores.shape[1]):
            rows.append({"layer": layer, "expert": e, "score": score.scores[i, e],
                         **{p: score.per_projection[p][i, e] for p in ("gate", "up", "down")},
                         "stderr": None if score.stderr is None else score.stderr[i, e],
                         "tokens": None if score.tokens is None else int(score.tokens[i, e]),
                         "bits": None if bits is None else int(bits[i][e])})
    return pd.DataFrame(rows)


def export_files(entry: ModelEntry, score: Scores, bits, run: Run | None,
                 out: Path) -> list[str]:
    """Write the downloads into the empty folder ``out``; returns their paths.

    Without a run: the scores CSV of ``score`` with the live ``bits``. With a run, one export
    is that run: its scores and bits in the CSV, its recipe JSON, engine snippets and
    quantized checkpoint (a zip), every file named after the run (``run_file_prefix``).
    """
    from mopeq.quantize.export import export

    prefix = ""
    if run is not None:
        score = run.scores or score
        bits, prefix = run.allocation.bitmap.bits.tolist(), run_file_prefix(run.label)
    csv = out / f"{prefix}scores_{score.method}.csv"
    scores_frame(entry, score, bits).to_csv(csv, index=False)
    files = [str(csv)]
    if run is None:
        return files
    ckpt = export(run.quant, entry.layout, out / "checkpoint", source=entry.loaded.source,
                  fingerprint=entry.loaded.fingerprint,
                  bitmap_json=run.allocation.bitmap.to_json(),
                  scores_summary={"method": run.allocation.bitmap.meta.get("scores")},
                  memory=run.allocation.memory.to_json(), processor=entry.loaded.processor)
    for name in ("recipe.json", "autoround_layer_config.py", "gptqmodel_dynamic.py",
                 "llama_cpp_tensor_types.txt"):
        if (ckpt / name).exists():
            files.append(str(shutil.copy(ckpt / name, out / f"{prefix}{name}")))
    files.append(shutil.make_archive(str(out / f"{prefix}checkpoint"), "zip", ckpt))
    return files


def run_file_prefix(label: str) -> str:
    """File-name prefix of a run's downloads: ``"#2 kmeans · hessian 3.00b"`` -> ``"run2_…_"``."""
    import re

    slug = re.sub(r"[^A-Za-z0-9.]+", "_", label.replace("#", "run")).strip("_.")
    return f"{slug[:60]}_" if slug else "run_"
