"""App-only helpers: the shared model cache, per-session state, and the calls the app makes.

Nothing here imports gradio or does numerics: it turns the app's control values into a
``RunSpec`` and calls the entry's ``Workspace`` (the stages); ``mopeq.app.tables`` shapes the
results. ``app.py`` wires these to the page and to the public API endpoints.

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

from mopeq.app.settings import AllocSettings, ScoreSpec
from mopeq.app.tables import run_file_prefix, scores_frame
from mopeq.app.view import Drawn
from mopeq.core import defaults as D
from mopeq.core import methods
from mopeq.workflow.spec import RunSpec
from mopeq.workflow.workspace import EXPORT_SNIPPETS, Workspace

if TYPE_CHECKING:
    from mopeq.core.layout import MoELayout
    from mopeq.model.loading import LoadedModel
    from mopeq.sensitivity.profile import Scores
    from mopeq.workflow.workspace import Allocation, Run

Progress = Callable[[float, str], None]
EMBEDDED = D.MODEL_SOURCE
# the libraries' method names (tests check they match), here to keep ``import app`` light
SCORE_METHODS = methods.NAMES  # the torch-free method table, as mopeq.sensitivity.profile.METHODS
ALLOC_METHODS = methods.ALLOC_NAMES  # the torch-free allocation table
CACHE_SIZE = 2  # loaded models kept; the free Spaces CPU has 16 GB
MEMO_SIZE = 16  # scores / error tables remembered per model


class Cancelled(Exception):
    """The user pressed cancel; the job stops at its next progress report."""


def _noop(_f: float, _m: str) -> None:
    pass


# ------------------------------------------------------------------------ model cache


@dataclass
class ModelEntry:
    """A loaded model, its layout, and what has been computed for it (shared by sessions)."""

    loaded: LoadedModel
    layout: MoELayout
    lock: threading.RLock = field(default_factory=threading.RLock)  # held while the model runs
    memo: OrderedDict = field(default_factory=OrderedDict)
    memo_lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def workspace(self) -> Workspace:
        """The stages over this model (a ``Workspace`` holds no state of its own)."""
        return Workspace(self.loaded, self.layout)

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
    ws = Workspace.open(source, trust_remote_code)
    return ModelEntry(ws.loaded, ws.layout)


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


def profile(entry: ModelEntry, spec: ScoreSpec | RunSpec,
           on_progress: Progress = _noop) -> tuple[Scores, bool]:
    """Scores by ``spec`` and whether they were already known (memo or disk cache)."""
    run = spec.run_spec() if isinstance(spec, ScoreSpec) else spec
    key = ("scores", *run.score_key())
    hit = entry.remembered(key)
    if hit is not None:
        on_progress(1.0, f"{run.score_method}: cached")
        return hit, True
    with entry.running(on_progress):
        hit = entry.remembered(key)  # another session may have computed it while we waited
        if hit is not None:
            return hit, True
        result = entry.workspace.profile(run, on_progress=on_progress)
    entry.remember(key, result)
    return result, bool(result.meta.get("cache_hit"))


def errors(entry: ModelEntry, bits: tuple[int, ...], group_size: int):
    """Per-expert round-to-nearest errors [L, E, B] (memoised; they only read weights)."""
    key = ("errors", tuple(sorted(bits)), group_size)
    hit = entry.remembered(key)
    if hit is None:
        spec = RunSpec(bits=tuple(bits), group_size=group_size)
        hit = entry.remember(key, entry.workspace.errors(spec))
    return hit


def allocate(entry: ModelEntry, score: Scores, settings: AllocSettings,
               with_pareto: bool = True, judge: Scores | None = None,
               with_current: bool = False) -> Allocation:
    """Bits, memory estimate and (with errors) the Pareto frontier for ``settings``.

    ``judge``: the sensitivities the predicted loss weighs errors by (default ``score``);
    ``with_current``: the map's predicted loss without the frontier.
    """
    spec = settings.spec()
    need_errors = (with_pareto or with_current
                   or methods.allocator(spec.alloc_method).needs_errors)
    errs = errors(entry, spec.bits, spec.group_size) if need_errors else None
    return entry.workspace.allocate(spec, score, errors=errs, with_pareto=with_pareto,
                                    judge=judge, with_current=with_current)


def bf16_breakdown(entry: ModelEntry) -> dict[str, int]:
    """Bytes per component with every weight in 16 bits (the memory chart's reference)."""
    key = ("bf16",)
    hit = entry.remembered(key)
    if hit is None:
        shape = (entry.layout.num_moe_layers, entry.layout.num_experts)
        full = [[16] * shape[1] for _ in range(shape[0])]
        hit = entry.remember(key, entry.workspace.memory(RunSpec(base_bits=16), full).breakdown)
    return hit


def quantize_evaluate(entry: ModelEntry, alloc: Allocation, settings: AllocSettings,
                      mode: str = D.QUANT_MODE, pairs: int = D.QUICK_PAIRS,
                      label: str | None = None, on_progress: Progress = _noop,
                      scores: Scores | None = None, seed: int = D.SEED) -> Run:
    """Quantize with ``alloc``'s bits and evaluate baseline and quantized on ``pairs``.

    ``scores`` (those ``alloc`` was made from) travel with the run, so its export is whole.
    ``seed`` seeds tuned (SignRound) quantization: the same settings and seed give the same run.
    """
    spec = settings.spec(mode=mode, pairs=int(pairs), quant_seed=int(seed))
    with entry.running(on_progress):
        return entry.workspace.quantize_evaluate(spec, alloc, label=label, scores=scores,
                                                 on_progress=on_progress)


def report(entry: ModelEntry, config=None, on_progress: Progress = _noop):
    """The sensitivity report (every method against ``measured``) of the entry's model.

    Minutes on the embedded model (each method's scores come from the cache when known); one
    heavy job at a time, like a quantization.
    """
    with entry.running(on_progress):
        return entry.workspace.report(config, on_progress)


def export(entry: ModelEntry, score: Scores, bits, run: Run | None,
                 out: Path) -> list[str]:
    """Write the downloads into the empty folder ``out``; returns their paths.

    Without a run: the scores CSV of ``score`` with the live ``bits``. With a run, one export
    is that run: its scores and bits in the CSV, its recipe JSON, engine snippets and
    quantized checkpoint (a zip), every file named after the run (``run_file_prefix``).
    """
    prefix = ""
    if run is not None:
        score = run.scores or score
        bits, prefix = run.allocation.bitmap.bits.tolist(), run_file_prefix(run.label)
    csv = out / f"{prefix}scores_{score.method}.csv"
    scores_frame(entry, score, bits).to_csv(csv, index=False)
    files = [str(csv)]
    if run is None:
        return files
    ckpt = entry.workspace.export_run(run, out / "checkpoint")
    for name in EXPORT_SNIPPETS:
        if (ckpt / name).exists():
            files.append(str(shutil.copy(ckpt / name, out / f"{prefix}{name}")))
    files.append(shutil.make_archive(str(out / f"{prefix}checkpoint"), "zip", ckpt))
    return files
