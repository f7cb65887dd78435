"""The page's tables and short summaries: library results shaped for reading.

Plain functions from results (runs, reports, scores, layouts) to ``pandas`` frames and dicts;
no gradio, no numerics. ``mopeq.app.state`` re-exports them (``st.<name>``) for the page.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mopeq.core import methods

if TYPE_CHECKING:
    import pandas as pd

    from mopeq.sensitivity.profile import Scores
    from mopeq.workflow.workspace import Allocation, Run


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
    cfg, meta = report.meta.get("config", {}), report.meta
    if cfg:
        pairs = cfg.get("pairs")
        text += (f"\n\nOn {meta.get('experts')} experts, "
                 f"{cfg['n_batches']} x {cfg['batch_size']} calibration samples, "
                 + ("the whole held-out split" if pairs is None else f"{pairs} MME pairs")
                 + f"; {len(report.rows)} methods.")
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
    info = methods.ALLOC_BY_NAME.get(summary["method"])  # None: e.g. an AutoScheme row
    uses_scores = (info is not None and info.needs_scores and info.score_method is None
                   and summary.get("scores"))
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


def scores_frame(entry, score: Scores, bits=None) -> pd.DataFrame:
    """One row per expert of ``entry.layout``: layer, expert, score, parts, stderr, tokens, bits."""
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


def run_file_prefix(label: str) -> str:
    """File-name prefix of a run's downloads: ``"#2 kmeans · hessian 3.00b"`` -> ``"run2_…_"``."""
    import re

    slug = re.sub(r"[^A-Za-z0-9.]+", "_", label.replace("#", "run")).strip("_.")
    return f"{slug[:60]}_" if slug else "run_"
