"""The page's uncertainty: "± x" beside scores, plain words on significance, error bars."""

from types import SimpleNamespace

import numpy as np

from mopeq.app import figures as plots
from mopeq.app import state as st
from mopeq.app import tables
from mopeq.app.api import run_text, significance_text
from mopeq.evaluation.evaluate import compare, score_mme
from mopeq.workflow.workspace import interval_fields


def _records(right, category):
    out = []
    for i, ok in enumerate(right):
        gold = ["Yes", "No"][i % 2]
        out.append({"question_id": f"{category}{i // 2}", "category": category,
                    "question": f"q{i % 2}", "answer": gold,
                    "prediction": gold if ok else ["No", "Yes"][i % 2],
                    "probs": [0.7, 0.3, 0.0] if ok else [0.3, 0.7, 0.0]})
    return out


def _run(drop: float, seed: int = 0):
    rng = np.random.default_rng(seed)
    right = {c: list(rng.random(40) < 0.85) for c in ("color", "count")}
    worse = {c: [ok and rng.random() > drop for ok in r] for c, r in right.items()}
    base = score_mme([x for c, r in right.items() for x in _records(r, c)])
    other = score_mme([x for c, r in worse.items() for x in _records(r, c)])
    return SimpleNamespace(baseline=base, result=other, comparison=compare(base, other))


def _summary(run, pairs=40):
    return {"label": "#1 kmeans", "mode": "rtn", "score": run.result.score,
            "baseline_score": run.baseline.score,
            "delta": run.result.score - run.baseline.score, "pairs": pairs,
            "kl": run.comparison["kl"], "flip_rate": run.comparison["flip_rate"], "gb": 0.001,
            "quantize_s": 1.0, **interval_fields(run)}


def test_no_change_reads_within_noise_and_a_real_drop_reads_significant():
    same = _summary(_run(0.0))
    assert "within noise at 40 pairs" in significance_text(same)
    assert "within noise at 40 pairs" in run_text(same)
    drop = _summary(_run(0.5))
    assert drop["score_delta_ci95"][1] < 0 and drop["p_value"] < 0.05
    assert "significant at 40 pairs" in run_text(drop)


def test_every_score_in_the_run_line_has_its_plus_minus():
    s = _summary(_run(0.2))
    text = run_text(s)
    half = (s["score_ci95"][1] - s["score_ci95"][0]) / 2
    base_half = (s["baseline_score_ci95"][1] - s["baseline_score_ci95"][0]) / 2
    assert f"{s['score']:.1f} ± {half:.1f}" in text
    assert f"{s['baseline_score']:.1f} ± {base_half:.1f}" in text


def test_category_and_runs_tables_carry_intervals():
    run = _run(0.2)
    table = tables.category_table(run)
    assert {"baseline ±", "quantized ±", "delta 95% CI"} <= set(table.columns)
    assert table["quantized ±"].notna().all() and (table["quantized ±"] > 0).all()
    runs = tables.runs_table([_summary(run)])
    assert runs.loc[0, "score ±"] > 0 and runs.loc[0, "delta 95% CI"].startswith("[")
    assert 0 <= runs.loc[0, "p_value"] <= 1


def test_charts_draw_error_bars_from_intervals():
    run = _run(0.2)
    scores = {c: v["score"] for c, v in run.result.per_category.items()}
    cis = {c: v["ci95"] for c, v in run.result.per_category.items()}
    fig = plots.results_bars({"q": scores}, intervals={"q": cis})
    err = fig.data[0].error_y
    assert list(err.array) == [cis[c][1] - scores[c] for c in scores]
    assert list(err.arrayminus) == [scores[c] - cis[c][0] for c in scores]
    assert plots.results_bars({"q": scores}).data[0].error_y.array is None
    s = {**_summary(run), "method": "kmeans", "avg_bits": 3.0}
    points = tables.tradeoff_points([s], bf16_gb=0.002)
    fig = plots.tradeoff_scatter(points)
    assert all(tr.error_y.array is not None for tr in fig.data)  # the run and its baseline


def test_api_endpoints_pass_the_seed_and_the_gb_target(monkeypatch):
    """/allocate takes target_gb and seed; /quantize_evaluate seeds the allocation too."""
    from mopeq.app.api import Api

    seen = {}
    monkeypatch.setattr(st, "profile", lambda entry, spec, *a: (SimpleNamespace(
        method=spec.method, scores=np.ones((1, 2))), False))

    def allocation(entry, score, settings, with_pareto=True, judge=None):
        seen["settings"] = settings
        bitmap = SimpleNamespace(clusters_table=lambda s: [])
        return SimpleNamespace(to_json=lambda: {}, bitmap=bitmap)

    monkeypatch.setattr(st, "allocate", allocation)
    monkeypatch.setattr(st, "quantize_evaluate", lambda *a, **kw: seen.update(qseed=kw["seed"]))
    monkeypatch.setattr(tables, "run_summary", lambda run, pairs: {})
    api = Api(SimpleNamespace(get=lambda *a: SimpleNamespace()))
    api.allocate(method="budget", target_gb=0.25, seed=3)
    assert seen["settings"].spec().alloc_config().target_gb == 0.25
    assert seen["settings"].seed == 3
    api.quantize_evaluate(method="random", seed=7)
    assert seen["settings"].spec().alloc_config().seed == 7 and seen["qseed"] == 7
