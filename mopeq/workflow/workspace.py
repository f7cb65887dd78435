"""A loaded model and its layout, whose methods are the stages of a run: ``Workspace``.

profile -> errors -> allocate (-> memory) -> quantize -> evaluate -> export, each taking a
``RunSpec``; ``quantize_evaluate`` runs quantize and evaluate against the cached baseline. The
page, the API, the CLI and the study all call these, so each stage is written once. Expensive
results (sensitivities, quantization errors, baseline evaluations) are cached on disk by
``mopeq.core.cache``; allocation and the memory estimate take milliseconds and are recomputed.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mopeq.core import cache, methods
from mopeq.core.errors import MopeqError
from mopeq.workflow.spec import RunSpec

if TYPE_CHECKING:
    from mopeq.allocation.bitmap import BitMap
    from mopeq.core.layout import MoELayout
    from mopeq.core.memory import MemoryEstimate
    from mopeq.evaluation.evaluate import EvalResult
    from mopeq.model.loading import LoadedModel
    from mopeq.quantize.autoround import QuantResult
    from mopeq.sensitivity.profile import Scores

Progress = Callable[[float, str], None] | None
EVAL_STAGE, EVAL_VERSION = "evaluation", 1
EXPORT_SNIPPETS = ("recipe.json", "autoround_layer_config.py", "gptqmodel_dynamic.py",
                   "llama_cpp_tensor_types.txt")


def _noop(_f: float, _m: str) -> None:
    pass


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Report a ``ValueError`` of reading what the user gave (a model, a file) as a ``MopeqError``.

    Only around loading a model (transformers says ``ValueError`` for an unknown or broken
    checkpoint) and parsing a user's JSON files. The stages raise ``MopeqError`` themselves for
    input they cannot take, so a ``ValueError`` inside a computation stays a bug with its
    traceback.
    """
    try:
        yield
    except MopeqError:
        raise
    except ValueError as exc:
        raise MopeqError(str(exc)) from exc


@dataclass
class Allocation:
    """A bit map with its memory estimate and, when errors are known, its predicted loss."""

    bitmap: BitMap
    memory: MemoryEstimate
    pareto: list[dict] = field(default_factory=list)
    current: dict | None = None

    def to_json(self) -> dict:
        """JSON-ready: the bit map (``bits``, ``avg_bits``, ``deployable_fused``) + memory."""
        return {**self.bitmap.to_json(), "memory": self.memory.to_json(),
                "pareto": self.pareto, "current": self.current}


@dataclass
class Run:
    """One quantize-and-evaluate run, baseline beside it."""

    label: str
    allocation: Allocation
    quant: QuantResult
    baseline: EvalResult
    result: EvalResult
    comparison: dict
    scores: Scores | None = None  # the scores the allocation used (exports write them)

    def summary(self) -> dict:
        """A flat JSON-ready row for tables and the app's scatter."""
        bm, mem = self.allocation.bitmap, self.allocation.memory
        return {"label": self.label, "method": bm.method, "avg_bits": round(bm.avg_bits, 3),
                "gb": mem.gb, "ratio_vs_bf16": mem.ratio, "score": self.result.score,
                "baseline_score": self.baseline.score,
                "delta": self.result.score - self.baseline.score,
                "kl": self.comparison["kl"], "flip_rate": self.comparison["flip_rate"],
                "per_category": {c: v["score"] for c, v in self.result.per_category.items()},
                "quantize_s": round(self.quant.elapsed_s, 2), "mode": self.quant.config.mode,
                "deployable_fused": bm.deployable_fused, **interval_fields(self)}


def interval_fields(run) -> dict:
    """The uncertainty of a run (anything with ``baseline``, ``result``, ``comparison``).

    ``score_ci95`` / ``baseline_score_ci95``: bootstrap intervals of each total;
    ``score_delta_ci95``, ``kl_ci95``, ``flip_rate_ci95``: paired intervals on the same
    images; ``p_value``: exact McNemar test of the changed answers; ``n_pairs``: images.
    """
    cmp = run.comparison
    return {"score_ci95": run.result.score_ci95, "baseline_score_ci95": run.baseline.score_ci95,
            "per_category_ci95": {c: v.get("ci95") for c, v in run.result.per_category.items()},
            **{k: cmp.get(k) for k in ("score_delta_ci95", "p_value", "n_discordant", "kl_ci95",
                                       "flip_rate_ci95", "n_pairs")}}


class Workspace:
    """A loaded model and its MoE layout; each method is one stage of a run.

    Args:
        loaded: the model, its processor, source and fingerprint.
        layout: its MoE layout (discovered from the model when None).
    """

    def __init__(self, loaded: LoadedModel, layout: MoELayout | None = None):
        if layout is None:
            from mopeq.model.moe import discover

            layout = discover(loaded.model)
        self.loaded, self.layout = loaded, layout

    @classmethod
    def open(cls, source: str, trust_remote_code: bool = False) -> Workspace:
        """Load ``source`` ("embedded", a local folder or a hub id) and discover its layout."""
        from mopeq.model.loading import load_model

        with user_errors():
            return cls(load_model(source, trust_remote_code=trust_remote_code))

    # ------------------------------------------------------------------ sensitivity

    def profile(self, spec: RunSpec | None = None, on_progress: Progress = None) -> Scores:
        """Per-expert scores by ``spec.score_method`` (cached); builds calibration data."""
        spec = spec or RunSpec()
        from mopeq.sensitivity.profile import profile

        data = None
        if methods.info(spec.score_method).needs_data:
            from mopeq.sensitivity.calibration import calibration_batches

            calib = spec.calib_config()
            data = calibration_batches(self.loaded, n_batches=calib.n_batches,
                                       batch_size=calib.batch_size, seed=calib.seed)
        return profile(self.loaded.model, self.layout, spec.score_method,
                       spec.profile_config(), data=data, on_progress=on_progress,
                       fingerprint=self.loaded.fingerprint)

    def errors(self, spec: RunSpec | None = None) -> np.ndarray:
        """Per-expert round-to-nearest errors [L, E, len(bits)] (cached by fingerprint)."""
        spec = spec or RunSpec()
        from mopeq.allocation.qerror import quant_errors

        return quant_errors(self.loaded.model, self.layout, spec.bits,
                            group_size=spec.group_size, sym=spec.sym,
                            fingerprint=self.loaded.fingerprint)

    def report(self, config=None, on_progress: Progress = None):
        """Every sensitivity method against ``measured`` (``sensitivity.report``)."""
        from mopeq.sensitivity.report import ReportConfig, sensitivity_report

        return sensitivity_report(self.loaded, config or ReportConfig(), on_progress)

    # ------------------------------------------------------------------- allocation

    def allocation_scores(self, spec: RunSpec, scores: Scores | None = None,
                          on_progress: Progress = None) -> Scores:
        """The scores ``spec``'s allocation ranks by (profiled unless ``scores`` are those).

        A ``frequency`` allocation always ranks by routing counts, whatever the scores shown.
        """
        wanted = spec.allocation_score_method
        if scores is not None and scores.method == wanted:
            return scores
        return self.profile(spec.replace(score_method=wanted), on_progress)

    def allocate(self, spec: RunSpec, scores: Scores, *, errors: np.ndarray | None = None,
                 with_pareto: bool = False, reference: BitMap | None = None,
                 judge: Scores | None = None, with_current: bool = False) -> Allocation:
        """Allocate bits, snap them per layer if asked, and estimate memory (milliseconds).

        ``judge`` holds the sensitivities the predicted loss and the frontier weigh errors by
        (default: ``scores``); a ``frequency`` allocation passes one, as routing counts rank
        experts but are no loss. ``with_current``: the predicted loss of this map (``current``)
        without the frontier (``with_pareto`` computes both).
        """
        return allocate(scores, self.layout, spec, errors=errors, with_pareto=with_pareto,
                        reference=reference, judge=judge, with_current=with_current)

    def memory(self, spec: RunSpec, bitmap) -> MemoryEstimate:
        """The memory estimate of ``bitmap`` with ``spec``'s storage settings."""
        from mopeq.core.memory import estimate

        return estimate(self.layout, bitmap, spec.memory_config())

    # -------------------------------------------------------------- quantize + eval

    def quantize(self, spec: RunSpec, bitmap, on_progress: Progress = None) -> QuantResult:
        """Quantize a copy of the model with ``bitmap`` (tuned mode: on local calibration text)."""
        from mopeq.quantize.autoround import quantize

        calib = calibration_texts(self.loaded) if spec.mode == "tuned" else None
        return quantize(self.loaded.model, self.layout, bitmap, spec.quant_config(),
                        tokenizer=self.loaded.processor, calib=calib,
                        on_progress=on_progress)

    def evaluate(self, spec: RunSpec | None = None,
                 quant: QuantResult | None = None) -> EvalResult:
        """The MME(-style) evaluation of the model (cached) or of a quantized copy of it."""
        spec = spec or RunSpec()
        from mopeq.evaluation.evaluate import run_evaluation

        if quant is None:
            return self.baseline(spec)
        qloaded = dataclasses.replace(self.loaded, model=quant.model, fingerprint="quantized")
        return run_evaluation(qloaded, spec.dataset, pairs=spec.pairs, seed=spec.eval_seed)

    def baseline(self, spec: RunSpec | None = None) -> EvalResult:
        """The unquantized model's evaluation, cached on disk per (model, dataset, subset)."""
        spec = spec or RunSpec()
        return baseline_evaluation(self.loaded, spec.dataset, spec.pairs, spec.eval_seed)

    def quantize_evaluate(self, spec: RunSpec, alloc: Allocation, label: str | None = None,
                          scores: Scores | None = None, on_progress: Progress = None) -> Run:
        """Quantize with ``alloc``'s bits, then evaluate baseline and quantized on one subset."""
        from mopeq.evaluation.evaluate import compare

        progress = on_progress or _noop
        progress(0.02, "baseline evaluation")
        base = self.baseline(spec)
        sub = lambda lo, hi: (lambda f, m: progress(lo + (hi - lo) * f, m))  # noqa: E731
        quant = self.quantize(spec, alloc.bitmap, on_progress=sub(0.1, 0.8))
        progress(0.85, "evaluating the quantized model")
        result = self.evaluate(spec, quant)
        progress(1.0, f"done: score {result.score:.1f} vs {base.score:.1f}")
        label = label or f"{alloc.bitmap.method} {alloc.bitmap.avg_bits:.2f}b"
        return Run(label, alloc, quant, base, result, compare(base, result), scores)

    # ----------------------------------------------------------------------- export

    def export(self, quant: QuantResult, bitmap, memory: MemoryEstimate, out: str | Path,
               score_method: str | None = None) -> Path:
        """Write the checkpoint, ``recipe.json`` and engine snippets into ``out``."""
        from mopeq.quantize.export import export

        summary = None if score_method is None else {"method": score_method}
        return export(quant, self.layout, out, source=self.loaded.source,
                      fingerprint=self.loaded.fingerprint, bitmap_json=bitmap.to_json(),
                      scores_summary=summary, memory=memory.to_json(),
                      processor=self.loaded.processor)

    def export_run(self, run: Run, out: Path) -> Path:
        """``export`` of a run: its quantized model, bits, memory and the scores it used."""
        bm = run.allocation.bitmap
        return self.export(run.quant, bm, run.allocation.memory, out,
                           score_method=bm.meta.get("scores"))


def allocate(scores, layout: MoELayout, spec: RunSpec, *, errors: np.ndarray | None = None,
             with_pareto: bool = False, reference: BitMap | None = None,
             judge=None, with_current: bool = False) -> Allocation:
    """``Workspace.allocate`` on a bare layout (no model needed unless ``budget`` needs errors).

    Raises:
        MopeqError: for settings the scores or layout cannot take (e.g. more clusters than
            experts).
    """
    from mopeq.allocation.allocate import allocate as allocate_bits
    from mopeq.allocation.bitmap import snap_per_layer
    from mopeq.allocation.budget import pareto, predicted_loss
    from mopeq.core.memory import estimate

    config, judge = spec.alloc_config(), scores if judge is None else judge
    bitmap = allocate_bits(scores, layout, config, errors=errors, reference=reference)
    if spec.snap:
        bitmap = snap_per_layer(bitmap, layout, spec.snap)
    result = Allocation(bitmap, estimate(layout, bitmap, config.memory))
    known = errors is not None or getattr(judge, "errors", None) is not None
    if with_pareto and known:
        result.pareto = pareto(judge, errors, layout, config.bits, config.memory)
    if (with_pareto or with_current) and known and set(np.unique(bitmap.bits)) <= set(
            config.bits):
        result.current = {"gb": result.memory.gb, "avg_bits": bitmap.avg_bits,
                          "predicted_loss": predicted_loss(bitmap, judge, errors, config.bits)}
    return result


def baseline_evaluation(loaded: LoadedModel, dataset="synthetic", pairs: int | None = None,
                        seed: int = 0) -> EvalResult:
    """The unquantized model's evaluation, cached on disk per (model, dataset, subset)."""
    from mopeq.evaluation.evaluate import EvalResult, run_evaluation, with_intervals

    spec = dataset if isinstance(dataset, str) else "items"
    key = cache.make_key(EVAL_STAGE, {"model": loaded.fingerprint, "dataset": spec,
                                      "pairs": pairs, "seed": seed}, EVAL_VERSION)
    hit = cache.load(EVAL_STAGE, key) if isinstance(dataset, str) else None
    if hit is not None:
        return with_intervals(EvalResult(**hit.meta["result"]))
    result = run_evaluation(loaded, dataset, pairs=pairs, seed=seed)
    if isinstance(dataset, str):
        cache.save(EVAL_STAGE, key, {"result": dataclasses.asdict(result)})
    return result


def calibration_texts(loaded: LoadedModel, n: int = 64, seed: int = 0) -> list[str]:
    """Local calibration strings for tuned quantization (never the hub's default data)."""
    if loaded.kind == "tiny_vlm":
        from mopeq.embedded import synthetic

        stream = synthetic.train_stream(seed=seed + 7)
        texts = []
        for _ in range(n):  # several samples per string: auto-round skips short ones
            parts = [next(stream) for _ in range(3)]
            texts.append(" ".join(f"{q.text} {q.answer.lower()} . {s.caption}"
                                  for s in parts for q in s.questions))
        return texts
    from mopeq.sensitivity.calibration import BUILTIN_TEXT

    words = BUILTIN_TEXT.split()
    return [" ".join(words[i : i + 48]) for i in range(0, max(len(words) - 48, 1), 24)][:n]
