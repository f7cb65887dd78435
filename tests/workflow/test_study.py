"""The comparison study: its rows, its random-seed summary, and one small end-to-end run."""

import json

import numpy as np
import pandas as pd
import pytest

from mopeq.workflow import study
from mopeq.workflow.spec import RunSpec


class _S:
    def __init__(self, scores):
        self.scores = np.asarray(scores, dtype=float)


def test_plans_cover_the_paper_and_baselines():
    scores = {m: _S([[1.0, 2.0]]) for m in ("frobenius", "hessian", "fisher", "frequency")}
    labels = [p[0] for p in study._plans(scores, RunSpec())]
    for want in ("uniform 4-bit", "uniform 2-bit", "MoPEQ frobenius model-wise",
                 "MoPEQ frobenius layer-wise", "MoPEQ hessian model-wise",
                 "MoPEQ hessian layer-wise", "frequency k-means model-wise",
                 "MoPEQ hessian model-wise, log scores"):
        assert want in labels


def test_log_rows_need_positive_scores():
    scores = {m: _S([[1.0, -2.0]]) for m in ("frobenius", "hessian", "fisher")}
    labels = [p[0] for p in study._plans(scores, RunSpec())]
    assert not any("log scores" in label for label in labels)


def test_random_rows_are_summarised_as_mean_and_spread():
    df = pd.DataFrame([{"method": "MoPEQ", "total": 900.0, "KL": 0.01},
                       {"method": "random (seed 0)", "total": 880.0, "KL": 0.02},
                       {"method": "random (seed 1)", "total": 890.0, "KL": 0.04}])
    out = study._random_summary(df)
    assert list(out["method"]) == ["MoPEQ", "random, 2 seeds (mean ± sd)"]
    assert out.iloc[1]["total"] == "885 ± 5"
    md = study.markdown_table(out)
    assert md.splitlines()[1] == "|---|---|---|"
    assert "885 ± 5" in md


@pytest.mark.slow
def test_small_study_end_to_end(tmp_path):
    from mopeq.embedded import tiny
    from mopeq.model.loading import LoadedModel, fingerprint_model

    model, processor = tiny.new_model(tiny.TinyRecipe(hidden_size=64, expert_ffn=64))
    loaded = LoadedModel(model, processor, fingerprint_model(model), "random", "tiny_vlm")
    md = study.run_study(loaded, pairs=5, out_dir=tmp_path, random_seeds=2, group_size=32,
                         with_autoscheme=False)
    rows = json.loads((tmp_path / "study.json").read_text())
    assert rows[0]["label"] == "16-bit baseline" and rows[0]["avg_bits"] == 16.0
    assert {r["label"] for r in rows} >= {"uniform 2-bit", "MoPEQ frobenius model-wise",
                                         "random (seed 1)", "budget hessian x RTN error, same GB"}
    assert "random, 2 seeds" in md and (tmp_path / "study.html").exists()
    budget = next(r for r in rows if r["label"].startswith("budget"))
    mopeq = next(r for r in rows if r["label"] == "MoPEQ frobenius model-wise")
    assert budget["gb"] <= mopeq["gb"] * 1.0001


def _row(label, score, ci, delta, dci, p):
    return {"label": label, "gb": 0.5, "avg_bits": 3.0, "per_category": {"color": score / 2},
            "score": score, "delta": delta, "kl": 0.01, "flip_rate": 0.1, "score_ci95": ci,
            "score_delta_ci95": dci, "p_value": p}


def test_study_table_shows_intervals_and_p_values():
    runs = [_row("16-bit baseline", 300.0, [280.0, 320.0], 0.0, [0.0, 0.0], 1.0),
            _row("MoPEQ", 290.0, [270.5, 310.0], -10.0, [-18.0, -2.5], 0.012),
            _row("random (seed 0)", 280.0, [260.0, 300.0], -20.0, [-30.0, -10.0], 0.001),
            _row("random (seed 1)", 284.0, [262.0, 302.0], -16.0, [-26.0, -6.0], 0.004)]
    df = study._frame(runs)
    assert list(df.loc[1, list(study.INTERVAL_COLUMNS)]) == [270.5, 310.0, -18.0, -2.5]
    assert (df["total lo"] <= df["total"]).all() and (df["total"] <= df["total hi"]).all()
    md = study.markdown_table(study._with_intervals(study._random_summary(df)))
    assert "290.0 [270.5, 310.0]" in md and "-10.0 [-18.0, -2.5]" in md and "0.012" in md
    assert "total lo" not in md.splitlines()[0]
    assert "random, 2 seeds" in md
