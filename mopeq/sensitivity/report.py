"""The sensitivity quality report (``sensitivity-report``): which score predicts quantization?

For one model, every method of ``mopeq.core.methods`` is run on the same calibration data (seed
``calib_seed``) and compared, expert by expert (all MoE layers x routed experts), with the
ground truth ``measured`` (answer KL with that expert alone RTN-quantized to the lowest width):

- ``spearman``: rank correlation with ``measured`` on the same calibration data, with a
  percentile bootstrap interval over experts (``n_boot`` resamples, seeded);
- ``spearman_heldout``: the same against ``measured`` on held-out data (``heldout_seed``);
  ``measured``'s own value there is the ceiling set by calibration-data noise (None when
  ``heldout_reference`` is off, as in the quick report ``QUICK``);
- ``seed_reliability``: for stochastic methods, Spearman between probe seeds 0 and 1;
- ``split_half``: for data methods, Spearman between runs on the two halves of the batches
  (None when ``split_half`` is off);
- ``wall_s``: the method's compute time (``Scores.meta["elapsed_s"]``, kept by the cache);
- for each target (average bits of the routed experts): the budget allocation the method drives
  (its own errors when it has them, else score x RTN weight error), applied with the export's
  RTN, and the realised KL to the 16-bit model on the held-out data (``kl@b``) and, where the
  model has an MME-style evaluation, the realised score and answer KL with a 95 % bootstrap
  interval over questions (``score@b``, ``answer_kl@b``, ``answer_kl@b_ci``).

``sensitivity_report`` returns a ``Report`` (a DataFrame via ``frame()``, the per-method scores it
was computed from); ``write_report`` writes ``sensitivity_report.md`` and ``.json``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mopeq.allocation.allocate import AllocConfig, allocate
from mopeq.core import defaults as D
from mopeq.core import methods as method_table
from mopeq.core.memory import MemoryConfig
from mopeq.sensitivity.calibration import CalibData, calibration_batches
from mopeq.sensitivity.profile import ProfileConfig, Scores, profile

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class ReportConfig:
    """What the report runs (defaults: every method, the app's calibration size)."""

    methods: tuple[str, ...] = method_table.NAMES
    n_batches: int = 4
    batch_size: int = 16
    calib_seed: int = 0
    heldout_seed: int = 1000
    targets: tuple[float, ...] = (2.5, 3.0)
    bits: tuple[int, ...] = D.BITS
    group_size: int = D.GROUP_SIZE
    sym: bool = D.SYM
    pairs: int | None = None  # MME-style evaluation pairs (None: the whole held-out split)
    n_boot: int = 1000
    boot_seed: int = 0
    use_cache: bool = True
    closed_form: bool = False  # frobenius: the exact value instead of Hutchinson probes
    heldout_reference: bool = True  # also ``measured`` on held-out data (spearman_heldout)
    split_half: bool = True  # data methods again on each half of the batches

    def profile_config(self, seed: int = 0) -> ProfileConfig:
        """The sensitivity settings every method shares."""
        return ProfileConfig(seed=seed, bits=self.bits, group_size=self.group_size,
                             sym=self.sym, use_cache=self.use_cache, max_cost_s=None,
                             closed_form=self.closed_form)


# The quick report (the app's default, ``sensitivity-report --quick``): the paper's score in
# closed form and the three fast data-aware scores against ``measured`` on 8 calibration
# samples, realised on the quick MME subset, without the held-out reference and the split
# halves; under a minute on the embedded model instead of ~25 (noisier: the intervals say how
# much).
QUICK = ReportConfig(methods=("frobenius", "fisher", "frequency", "block_fisher"), n_batches=1,
                     batch_size=8, pairs=D.QUICK_PAIRS, n_boot=200, closed_form=True,
                     heldout_reference=False, split_half=False)


@dataclass
class Report:
    """Rows (one per method), the scores behind them, and what they were computed on."""

    rows: list[dict]
    scores: dict[str, Scores]
    reference: str  # "measured"
    data: str  # calibration data description shared by every method
    meta: dict = field(default_factory=dict)

    def frame(self):
        """The rows as a pandas DataFrame (for the app and the CLI)."""
        import pandas as pd

        return pd.DataFrame(self.rows)


# --------------------------------------------------------------------------- statistics


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(inverse, ranks) / counts)[inverse]  # ties get their mean rank


def spearman(a, b) -> float:
    """Spearman rank correlation of two equally long vectors (NaN if one is constant)."""
    ra, rb = _ranks(np.ravel(a)), _ranks(np.ravel(b))
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def bootstrap_spearman(a, b, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of ``spearman`` over experts resampled with replacement."""
    a, b = np.ravel(a), np.ravel(b)
    rng = np.random.default_rng(seed)
    draws = [spearman(a[i], b[i]) for i in rng.integers(0, len(a), (n_boot, len(a)))]
    lo, hi = np.nanpercentile(draws, [2.5, 97.5])
    return float(lo), float(hi)


def bootstrap_mean(x, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean of ``x``."""
    x = np.asarray(x, dtype=float)
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (n_boot, len(x)))].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


# --------------------------------------------------------------------------- running


def _run(loaded, layout, method: str, config: ReportConfig, data: CalibData, seed: int = 0):
    return profile(loaded.model, layout, method, config.profile_config(seed), data,
                   fingerprint=loaded.fingerprint)


def _halves(data: CalibData) -> tuple[CalibData, CalibData]:
    k = len(data.batches) // 2
    return (CalibData(data.batches[:k], f"{data.description}:first {k} batches"),
            CalibData(data.batches[k:], f"{data.description}:last {len(data.batches) - k}"))


def _reliability(loaded, layout, method, config, data, main: Scores) -> dict:
    info = method_table.info(method)
    out = {"seed_reliability": None, "split_half": None}
    if info.stochastic and not (info.closed_form and config.closed_form):  # exact: no seeds
        out["seed_reliability"] = spearman(main.scores, _run(loaded, layout, method, config,
                                                             data, seed=1).scores)
    if config.split_half and info.needs_data and len(data.batches) >= 2:
        a, b = (_run(loaded, layout, method, config, h) for h in _halves(data))
        out["split_half"] = spearman(a.scores, b.scores)
    return out


def _realised(loaded, layout, bits: np.ndarray, config: ReportConfig, heldout, baseline):
    """Held-out token KL and (when available) MME score and answer KL with its interval."""
    import torch

    from mopeq.sensitivity.calibration import eval_kernels
    from mopeq.sensitivity.expert_quant import bitmap_quantized
    from mopeq.sensitivity.measured import _compare

    model = loaded.model
    dtype = next(model.get_submodule(layout.blocks[0].experts_path).parameters()).dtype
    with bitmap_quantized(model, layout, bits, config.group_size, config.sym):
        with torch.no_grad(), eval_kernels(model, dtype):
            kl, _ = _compare(model, heldout, baseline["ref"])
        out = {"kl": kl}
        if baseline.get("eval") is not None:
            out.update(_answer_kl(loaded, baseline["eval"], config))
    return out


def _answer_kl(loaded, base, config: ReportConfig) -> dict:
    from mopeq.evaluation.evaluate import _by_question, answer_kl, run_evaluation

    result = run_evaluation(loaded, "synthetic", pairs=config.pairs, seed=0)
    b, q = _by_question(base), _by_question(result)
    keys = sorted(b)
    kl = answer_kl(np.array([b[k]["probs"] for k in keys]), np.array([q[k]["probs"] for k in keys]))
    return {"score": result.score, "answer_kl": float(kl.mean()),
            "answer_kl_ci": bootstrap_mean(kl, config.n_boot, config.boot_seed)}


def _baseline(loaded, heldout: CalibData, layout, config: ReportConfig) -> dict:
    import torch

    from mopeq.sensitivity.calibration import eval_kernels
    from mopeq.sensitivity.measured import _reference

    dtype = next(loaded.model.get_submodule(layout.blocks[0].experts_path).parameters()).dtype
    with torch.no_grad(), eval_kernels(loaded.model, dtype):
        out = {"ref": _reference(loaded.model, heldout)}
    out["eval"] = None
    if loaded.kind in ("tiny_vlm", "vlm"):
        from mopeq.evaluation.evaluate import run_evaluation

        try:
            out["eval"] = run_evaluation(loaded, "synthetic", pairs=config.pairs, seed=0)
        except (ValueError, NotImplementedError):
            out["eval"] = None
    return out


def _allocations(loaded, layout, scores: Scores, config, heldout, baseline, rtn) -> dict:
    out = {}
    for target in config.targets:
        alloc = AllocConfig(method="budget", target_bits=target, bits=config.bits,
                            memory=MemoryConfig(group_size=config.group_size, sym=config.sym))
        bitmap = allocate(scores, layout, alloc, errors=rtn)
        real = _realised(loaded, layout, bitmap.bits, config, heldout, baseline)
        out[f"kl@{target}"] = real["kl"]
        out[f"avg_bits@{target}"] = round(bitmap.avg_bits, 4)
        for key in ("score", "answer_kl", "answer_kl_ci"):
            if key in real:
                out[f"{key}@{target}"] = real[key]
    return out


def sensitivity_report(loaded, config: ReportConfig = ReportConfig(),
                       on_progress: Progress | None = None) -> Report:
    """Run every method and compare it with ``measured`` (see the module docstring).

    Args:
        loaded: a ``mopeq.model.loading.LoadedModel``.
        config: the report settings.
        on_progress: called as ``on_progress(fraction, message)``.
    """
    from mopeq.allocation.qerror import quant_errors
    from mopeq.model.moe import discover

    progress = on_progress or (lambda _f, _m: None)
    layout = discover(loaded.model)
    calib = dict(n_batches=config.n_batches, batch_size=config.batch_size)
    data = calibration_batches(loaded, seed=config.calib_seed, **calib)
    heldout = calibration_batches(loaded, seed=config.heldout_seed, **calib)
    names = tuple(dict.fromkeys(("measured", *config.methods)))
    progress(0.0, "measured (the reference)")
    scores = {m: _run(loaded, layout, m, config, data) for m in names}
    ref_heldout = (_run(loaded, layout, "measured", config, heldout)
                   if config.heldout_reference else None)
    rtn = quant_errors(loaded.model, layout, config.bits, config.group_size, config.sym,
                       fingerprint=loaded.fingerprint)
    baseline = _baseline(loaded, heldout, layout, config)
    rows = []
    for k, m in enumerate(names):
        progress((k + 1) / (len(names) + 1), f"{m}: reliability and allocations")
        rows.append(_row(loaded, layout, m, scores, ref_heldout, config, data, heldout,
                         baseline, rtn))
    base_eval = baseline["eval"]
    meta = {"model": loaded.source, "fingerprint": loaded.fingerprint,
            "experts": int(scores["measured"].scores.size), "heldout": heldout.description,
            "baseline_score": None if base_eval is None else base_eval.score,
            "eval_questions": None if base_eval is None else len(base_eval.records),
            "config": dataclasses.asdict(config)}
    progress(1.0, "report done")
    return Report(rows, scores, "measured", data.description, meta)


def _row(loaded, layout, m, scores, ref_heldout, config, data, heldout, baseline, rtn) -> dict:
    s, ref = scores[m], scores["measured"]
    lo, hi = bootstrap_spearman(s.scores, ref.scores, config.n_boot, config.boot_seed)
    return {"method": m, "label": method_table.info(m).label,
            "spearman": spearman(s.scores, ref.scores), "spearman_ci": (lo, hi),
            "spearman_heldout": (None if ref_heldout is None
                                 else spearman(s.scores, ref_heldout.scores)),
            **_reliability(loaded, layout, m, config, data, s),
            "wall_s": s.meta.get("elapsed_s"),
            **_allocations(loaded, layout, s, config, heldout, baseline, rtn)}


# --------------------------------------------------------------------------- output


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, tuple | list):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e3 else f"{v:.3f}"
    return str(v)


def markdown(report: Report) -> str:
    """The report as a GitHub markdown table (label column left out)."""
    frame = report.frame().drop(columns=["label"])
    cells = [list(map(str, frame.columns))] + [[_fmt(v) for v in row] for row in
                                               frame.itertuples(index=False)]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("---" for _ in frame.columns) + "|")
    return "\n".join(lines)


def write_report(report: Report, out_dir: str | Path) -> Path:
    """Write ``sensitivity_report.md`` and ``sensitivity_report.json``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sensitivity_report.md").write_text(markdown(report) + "\n")
    payload = {"rows": report.rows, "reference": report.reference, "data": report.data,
               "meta": report.meta, "scores": {m: s.scores.tolist()
                                               for m, s in report.scores.items()}}
    (out / "sensitivity_report.json").write_text(json.dumps(payload, indent=1, default=str))
    return out
