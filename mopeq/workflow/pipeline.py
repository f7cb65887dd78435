"""Orchestration shared by the app and the CLI: analyse -> allocate -> quantize -> evaluate.

Every step is a plain function over the library's data objects; progress goes through
``on_progress(fraction, message)`` callbacks. Expensive results (sensitivities, quantization
errors, baseline evaluations) are cached on disk by ``mopeq.core.cache``; allocation and the memory
estimate are recomputed on every call (they take milliseconds).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mopeq.allocation.allocate import AllocConfig, allocate
from mopeq.allocation.bitmap import BitMap, snap_per_layer
from mopeq.allocation.budget import pareto, predicted_loss
from mopeq.allocation.qerror import quant_errors
from mopeq.core import cache
from mopeq.core.layout import MoELayout
from mopeq.core.memory import MemoryEstimate, estimate
from mopeq.evaluation.evaluate import EvalResult, compare, run_evaluation, with_intervals
from mopeq.model.loading import LoadedModel
from mopeq.quantize.autoround import QuantConfig, QuantResult, quantize
from mopeq.sensitivity.profile import ProfileConfig, Scores, profile

Progress = Callable[[float, str], None] | None
EVAL_STAGE, EVAL_VERSION = "evaluation", 1


def _noop(_f: float, _m: str) -> None:
    pass


# ----------------------------------------------------------------------- sensitivity


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data for the data-aware methods (what enters their cache key)."""

    n_batches: int = 4
    batch_size: int = 16
    seed: int = 0


def sensitivity(loaded: LoadedModel, layout: MoELayout, method: str,
                config: ProfileConfig = ProfileConfig(), calib: CalibConfig = CalibConfig(),
                on_progress: Progress = None) -> Scores:
    """Per-expert scores by ``method`` (cached); builds calibration data when needed."""
    from mopeq.core import methods
    from mopeq.sensitivity.calibration import calibration_batches

    data = None
    if methods.info(method).needs_data:
        data = calibration_batches(loaded, n_batches=calib.n_batches,
                                   batch_size=calib.batch_size, seed=calib.seed)
    return profile(loaded.model, layout, method, config, data=data, on_progress=on_progress,
                   fingerprint=loaded.fingerprint)


def errors_for(loaded: LoadedModel, layout: MoELayout, bits, group_size: int,
               sym: bool = True) -> np.ndarray:
    """Per-expert round-to-nearest errors [L, E, len(bits)] (cached by fingerprint)."""
    return quant_errors(loaded.model, layout, tuple(sorted(bits)), group_size=group_size,
                        sym=sym, fingerprint=loaded.fingerprint)


# ------------------------------------------------------------------------ allocation


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


def allocation(scores, layout: MoELayout, config: AllocConfig, *, snap: str | None = None,
               errors: np.ndarray | None = None, with_pareto: bool = False,
               reference: BitMap | None = None, judge=None) -> Allocation:
    """Allocate bits, optionally snap them per layer, and estimate memory (milliseconds).

    ``judge`` holds the sensitivities the predicted loss and the frontier weigh errors by
    (default: ``scores``). A ``frequency`` allocation passes one: routing counts rank experts
    but are no loss.
    """
    judge = scores if judge is None else judge
    bitmap = allocate(scores, layout, config, errors=errors, reference=reference)
    if snap:
        bitmap = snap_per_layer(bitmap, layout, snap)
    memory = estimate(layout, bitmap, config.memory)
    result = Allocation(bitmap, memory)
    if with_pareto and (errors is not None or getattr(judge, "errors", None) is not None):
        result.pareto = pareto(judge, errors, layout, config.bits, config.memory)
        if set(np.unique(bitmap.bits)) <= set(config.bits):
            result.current = {"gb": memory.gb, "avg_bits": bitmap.avg_bits,
                              "predicted_loss": predicted_loss(bitmap, judge, errors,
                                                               config.bits)}
    return result


# ------------------------------------------------------------------- quantize + eval


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


def baseline_evaluation(loaded: LoadedModel, dataset="synthetic", pairs: int | None = None,
                        seed: int = 0) -> EvalResult:
    """The unquantized model's evaluation, cached on disk per (model, dataset, subset)."""
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


def quantize_and_evaluate(loaded: LoadedModel, layout: MoELayout, alloc: Allocation,
                          qconfig: QuantConfig = QuantConfig(), *, dataset="synthetic",
                          pairs: int | None = 50, seed: int = 0, label: str | None = None,
                          calib_texts: list[str] | None = None,
                          on_progress: Progress = None) -> Run:
    """Quantize with ``alloc``'s bits, then evaluate baseline and quantized on one subset."""
    progress = on_progress or _noop
    progress(0.02, "baseline evaluation")
    base = baseline_evaluation(loaded, dataset, pairs, seed)
    sub = lambda lo, hi: (lambda f, m: progress(lo + (hi - lo) * f, m))  # noqa: E731
    quant = quantize(loaded.model, layout, alloc.bitmap, qconfig, tokenizer=loaded.processor,
                     calib=calib_texts, on_progress=sub(0.1, 0.8))
    progress(0.85, "evaluating the quantized model")
    qloaded = dataclasses.replace(loaded, model=quant.model, fingerprint="quantized")
    result = run_evaluation(qloaded, dataset, pairs=pairs, seed=seed)
    progress(1.0, f"done: score {result.score:.1f} vs {base.score:.1f}")
    label = label or f"{alloc.bitmap.method} {alloc.bitmap.avg_bits:.2f}b"
    return Run(label, alloc, quant, base, result, compare(base, result))


def calibration_texts(loaded: LoadedModel, n: int = 64, seed: int = 0) -> list[str]:
    """Local calibration strings for tuned quantization (never the hub's default data)."""
    from mopeq.embedded import synthetic

    if loaded.kind == "tiny_vlm":
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
