"""The comparison study (``python -m mopeq study``): MoPEQ against the baselines and the peer.

MoPEQ is compared with uniform, frequency, random, budget and auto-round's own AutoScheme, on
one model and one evaluation subset.

Every row is quantized with the same quantizer settings and evaluated with the same harness
and subset as the 16-bit baseline. Rows report memory, average bits, the MME-style score per
category and in total, the delta to the baseline, and the answer-level KL divergence and flip
rate to the baseline (which separate allocations where a small score cannot).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

from mopeq.core import defaults as D
from mopeq.core.memory import MemoryConfig, estimate
from mopeq.model.loading import LoadedModel
from mopeq.workflow.spec import RunSpec
from mopeq.workflow.workspace import Workspace, calibration_texts, interval_fields

STUDY_SCORES = ("frobenius", "hessian", "fisher", "frequency", "block_fisher")


def _plans(scores: dict, base: RunSpec) -> list[tuple[str, RunSpec, str]]:
    """(label, allocation spec, scores key) for every fixed row of the study."""
    cfg = base.replace
    rows = [(f"uniform {b}-bit", cfg(alloc_method="uniform", uniform_bits=b), "frobenius")
            for b in (4, 3, 2)]
    for name in ("frobenius", "hessian"):
        for scope in ("model", "layer"):
            rows.append((f"MoPEQ {name} {scope}-wise", cfg(scope=scope), name))
    rows.append(("MoPEQ fisher model-wise", base, "fisher"))
    for name in ("hessian", "fisher"):  # log scores need positive traces (hessian may not be)
        if name in scores and (scores[name].scores > 0).all():
            rows.append((f"MoPEQ {name} model-wise, log scores", cfg(log_scores=True), name))
    rows.append(("frequency k-means model-wise", cfg(alloc_method="frequency"), "frequency"))
    return [r for r in rows if r[2] in scores]


def run_study(loaded: LoadedModel, pairs: int | None = None, seed: int = D.SEED,
              out_dir: str | Path = D.STUDY_DIR, random_seeds: int = D.RANDOM_SEEDS,
              group_size: int = D.GROUP_SIZE, base_bits: int = D.BASE_BITS,
              with_autoscheme: bool = True,
              on_progress: Callable[[float, str], None] | None = None) -> str:
    """Run every row, write ``study.csv``, ``study.md``, ``study.json``, ``study.html``.

    Returns the markdown table.
    """
    progress = on_progress or (lambda _f, _m: None)
    ws = Workspace(loaded)
    base = RunSpec(group_size=group_size, base_bits=base_bits, pairs=pairs, eval_seed=seed)
    progress(0.0, f"sensitivities ({', '.join(STUDY_SCORES)})")
    # the scores at the default group size, as the study always had them (block_fisher's RTN)
    scores = {m: ws.profile(RunSpec(score_method=m)) for m in STUDY_SCORES}
    errors = ws.errors(base)
    runs: list[dict] = []
    baseline = ws.baseline(base)
    runs.append(_baseline_row(baseline, ws.layout, base.memory_config()))

    def run(label, spec, score, **kw):
        progress(len(runs) / (14 + random_seeds), label)
        r = ws.quantize_evaluate(spec, ws.allocate(spec, score, **kw), label=label)
        runs.append(r.summary())
        return r

    fixed = {label: run(label, spec, scores[key]) for label, spec, key in _plans(scores, base)}
    ref = fixed["MoPEQ frobenius model-wise"].allocation
    for s in range(random_seeds):
        run(f"random (seed {s})", base.replace(alloc_method="random", seed=s),
            scores["frobenius"], reference=ref.bitmap)
    budget = base.replace(alloc_method="budget", target_gb=ref.memory.gb)
    run("budget hessian x RTN error, same GB", budget, scores["hessian"], errors=errors)
    # the recommended data-aware method, by its own errors
    run("budget block_fisher (its own errors), same GB", budget, scores["block_fisher"])
    if with_autoscheme:
        runs.append(_autoscheme_row(ws, base, ref.bitmap.avg_bits, baseline))
    progress(1.0, "writing tables")
    return _write(runs, Path(out_dir), random_seeds)


def _baseline_row(base, layout, mem: MemoryConfig) -> dict:
    bf16 = estimate(layout, np.full((layout.num_moe_layers, layout.num_experts), 16), mem)
    return {"label": "16-bit baseline", "method": "none", "avg_bits": 16.0, "gb": bf16.gb,
            "ratio_vs_bf16": 1.0, "score": base.score, "baseline_score": base.score,
            "delta": 0.0, "kl": 0.0, "flip_rate": 0.0, "baseline": True,
            "per_category": {c: v["score"] for c, v in base.per_category.items()},
            "score_ci95": base.score_ci95, "baseline_score_ci95": base.score_ci95,
            "score_delta_ci95": [0.0, 0.0], "p_value": 1.0}


def _autoscheme_row(ws: Workspace, spec: RunSpec, avg_bits: float, base) -> dict:
    """auto-round's own search at ``avg_bits``, evaluated like every other row."""
    from mopeq.evaluation.evaluate import compare
    from mopeq.quantize.autoround import autoscheme

    loaded, layout = ws.loaded, ws.layout
    texts = calibration_texts(loaded, n=32)
    bits, result = autoscheme(loaded.model, layout, avg_bits, spec.quant_config(),
                              loaded.processor, texts)
    ev = ws.evaluate(spec, result)
    est = ws.memory(spec, bits)
    numel = np.array([e.numel for e in layout.experts], dtype=float).reshape(bits.shape)
    cmp = compare(base, ev)
    return {"label": "auto-round AutoScheme (peer), same avg bits", "method": "autoscheme",
            "avg_bits": round(float((bits * numel).sum() / numel.sum()), 3), "gb": est.gb,
            "ratio_vs_bf16": est.ratio, "score": ev.score, "baseline_score": base.score,
            "delta": ev.score - base.score, "kl": cmp["kl"], "flip_rate": cmp["flip_rate"],
            "per_category": {c: v["score"] for c, v in ev.per_category.items()},
            "quantize_s": round(result.elapsed_s, 2), "mode": "rtn",
            "deployable_fused": bool((bits == bits[:, :1]).all()),
            **interval_fields(SimpleNamespace(baseline=base, result=ev, comparison=cmp))}


INTERVAL_COLUMNS = ("total lo", "total hi", "delta lo", "delta hi")


def _frame(runs: list[dict]) -> pd.DataFrame:
    """One row per run; 95 % intervals of the total and the (paired) delta, McNemar's p."""
    rows = []
    for r in runs:
        total, delta = r.get("score_ci95") or [None] * 2, r.get("score_delta_ci95") or [None] * 2
        row = {"method": r["label"], "GB": r["gb"], "avg bits": r["avg_bits"],
               **{c: round(v, 1) for c, v in r["per_category"].items()},
               "total": round(r["score"], 1), "delta": round(r["delta"], 1),
               "KL": r["kl"], "flips": r["flip_rate"], "p": r.get("p_value"),
               **dict(zip(INTERVAL_COLUMNS, [*total, *delta], strict=True))}
        rows.append(row)
    return pd.DataFrame(rows)


def _with_intervals(table: pd.DataFrame) -> pd.DataFrame:
    """The markdown view: "total [lo, hi]" and "delta [lo, hi]" cells, p to 2 digits."""
    out = table.copy()
    for col in ("total", "delta"):
        lo, hi = table[f"{col} lo"], table[f"{col} hi"]
        out[col] = [f"{v:.1f} [{a:.1f}, {b:.1f}]" if isinstance(a, float) and a == a else v
                    for v, a, b in zip(table[col], lo, hi, strict=True)]
    out["p"] = [f"{p:.2g}" if isinstance(p, float) and p == p else p for p in table["p"]]
    return out.drop(columns=list(INTERVAL_COLUMNS))


def _random_summary(df: pd.DataFrame) -> pd.DataFrame:
    rnd = df[df["method"].str.startswith("random (seed")]
    if rnd.empty:
        return df
    num = rnd.select_dtypes("number")
    mean, std = num.mean(), num.std(ddof=0)
    summary = {"method": f"random, {len(rnd)} seeds (mean ± sd)"}
    for col in num.columns:
        summary[col] = f"{mean[col]:.4g} ± {std[col]:.2g}"
    rest = df[~df["method"].str.startswith("random (seed")]
    return pd.concat([rest, pd.DataFrame([summary])], ignore_index=True)


def _write(runs: list[dict], out: Path, random_seeds: int) -> str:
    from mopeq.app.figures import tradeoff_scatter

    out.mkdir(parents=True, exist_ok=True)
    df = _frame(runs)
    df.to_csv(out / "study.csv", index=False)
    table = _random_summary(df)
    fmt = _with_intervals(table)
    fmt["GB"] = fmt["GB"].map(lambda x: f"{x:.6f}" if isinstance(x, float) else x)
    for col in ("KL", "flips"):
        fmt[col] = fmt[col].map(lambda x: f"{x:.4f}" if isinstance(x, float) else x)
    md = markdown_table(fmt)
    (out / "study.md").write_text(md + "\n")
    (out / "study.json").write_text(json.dumps(runs, indent=1, default=str))
    scatter = [{"method": r["method"], "avg_bits": r["avg_bits"], "gb": r["gb"],
                "score": r["score"], "label": r["label"], "baseline": r.get("baseline", False)}
               for r in runs]
    tradeoff_scatter(scatter).write_html(out / "study.html", include_plotlyjs="cdn")
    return md


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table (no extra dependency)."""
    cells = [[str(c) for c in df.columns]] + [[str(v) for v in row] for row in df.values]
    lines = ["| " + " | ".join(r) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("---" for _ in df.columns) + "|")
    return "\n".join(lines)
