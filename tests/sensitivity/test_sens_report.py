"""The sensitivity quality report: correlations on the same experts and seeds, outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import spearmanr

from mopeq.core import methods
from mopeq.model.loading import LoadedModel
from mopeq.sensitivity.report import (
    ReportConfig,
    bootstrap_spearman,
    markdown,
    sensitivity_report,
    spearman,
    write_report,
)
from tests.helpers import tiny_lm

METHODS = ("frobenius", "frequency", "block_error", "block_fisher")


@pytest.fixture(scope="module")
def report():
    model = tiny_lm("olmoe")
    loaded = LoadedModel(model, None, "fp-report-test", "test", "causal_lm")
    config = ReportConfig(methods=METHODS, n_batches=2, batch_size=2, group_size=32, n_boot=50,
                          use_cache=False)
    return sensitivity_report(loaded, config)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, 5, 40).astype(float), rng.normal(size=40)
    assert spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, rel=1e-12)
    assert np.isnan(spearman(np.ones(5), np.arange(5.0)))
    lo, hi = bootstrap_spearman(b, 2 * b + rng.normal(size=40) * 0.1, n_boot=200)
    assert 0.8 < lo <= hi <= 1.0


def test_report_correlations_use_the_same_experts_and_seeds(report):
    ref = report.scores["measured"]
    assert [r["method"] for r in report.rows] == ["measured", *METHODS]
    for row in report.rows:
        s = report.scores[row["method"]]
        assert s.scores.shape == ref.scores.shape == (2, 8)
        assert row["spearman"] == pytest.approx(spearmanr(s.scores.ravel(),
                                                          ref.scores.ravel()).statistic)
        info = methods.info(row["method"])
        if info.needs_data:
            assert s.meta["data"] == report.data  # one calibration set for every method
        if info.stochastic:
            assert s.meta["seed"] == 0 and row["seed_reliability"] is not None
        else:
            assert row["seed_reliability"] is None
        lo, hi = row["spearman_ci"]
        assert -1 <= lo <= hi <= 1
    measured = report.rows[0]
    assert measured["spearman"] == pytest.approx(1.0)
    assert report.meta["experts"] == 16


def test_report_realises_every_allocation(report):
    for row in report.rows:
        for target in (2.5, 3.0):
            assert row[f"kl@{target}"] >= 0 and np.isfinite(row[f"kl@{target}"])
            assert row[f"avg_bits@{target}"] <= target + 1e-9
        assert "score@2.5" not in row  # a bare LM has no MME-style evaluation
    frame = report.frame()
    assert list(frame["method"]) == [r["method"] for r in report.rows]


def test_report_files(report, tmp_path):
    out = write_report(report, tmp_path)
    md = (out / "sensitivity_report.md").read_text()
    assert md.startswith("| method | spearman |") and md == markdown(report) + "\n"
    assert md.count("\n") == len(report.rows) + 2
    data = json.loads((out / "sensitivity_report.json").read_text())
    assert data["reference"] == "measured" and set(data["scores"]) == {"measured", *METHODS}


def test_the_quick_report_skips_what_it_says_and_keeps_the_ranking():
    """``QUICK``'s switches: no held-out reference, no split halves, frobenius exact (so no
    seed reliability for it); the same rows and correlations otherwise."""
    import dataclasses

    from mopeq.sensitivity.report import QUICK

    model = tiny_lm("olmoe")
    loaded = LoadedModel(model, None, "fp-quick-report-test", "test", "causal_lm")
    config = dataclasses.replace(QUICK, n_batches=2, batch_size=2, group_size=32, n_boot=50,
                                 use_cache=False, pairs=None)
    quick = sensitivity_report(loaded, config)
    assert [r["method"] for r in quick.rows] == ["measured", *QUICK.methods]
    for row in quick.rows:
        assert row["spearman_heldout"] is None and row["split_half"] is None
        assert -1 <= row["spearman"] <= 1
    rows = {r["method"]: r for r in quick.rows}
    assert rows["frobenius"]["seed_reliability"] is None  # the closed form has no seed
    assert rows["block_fisher"]["seed_reliability"] is not None
    full = sensitivity_report(loaded, dataclasses.replace(config, heldout_reference=True,
                                                          split_half=True))
    same = {r["method"]: r["spearman"] for r in full.rows}
    assert same == pytest.approx({m: r["spearman"] for m, r in rows.items()})
    assert all(r["split_half"] is not None for r in full.rows if r["method"] != "frobenius")
