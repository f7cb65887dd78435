"""The app: its public API driven by gradio_client against a launched app, and its helpers.

The launched app and the embedded model (or its stand-in) are fixtures of ``conftest.py``.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mopeq.app import state as st
from mopeq.app import tables
from mopeq.embedded import synthetic

REPO = Path(__file__).resolve().parents[2]
MME_MAX_TOTAL = len(synthetic.CATEGORIES) * 200.0  # 200 points per synthetic category


def _error(client, api_name: str, **kwargs) -> str:
    """The message of the error an endpoint raises (fails the test if it succeeds)."""
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError) as info:
        client.predict(api_name=api_name, **kwargs)
    message = str(info.value)
    assert "Traceback" not in message and 'File "' not in message
    return message


# ------------------------------------------------------------------------ API


def test_public_endpoints_have_stable_names(client):
    named = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert set(named) == {"/load_model", "/profile", "/allocate", "/quantize_evaluate"}
    params = {p["parameter_name"] for p in named["/allocate"]["parameters"]}
    assert {"source", "method", "clusters", "bits", "group_size", "base_bits", "snap"} <= params


def test_load_model_summarises_the_layout(client):
    info = client.predict(source="embedded", api_name="/load_model")
    assert info["num_moe_layers"] == len(info["moe_layers"]) >= 1
    assert info["num_experts"] >= 2 and info["top_k"] >= 1
    assert info["num_shared_experts"] >= 0
    params = info["params"]
    assert params["routed_experts"] > 0
    assert params["total"] == sum(v for k, v in params.items() if k != "total")
    assert "experts" not in info  # the per-expert list stays out of the summary


def test_profile_scores_and_second_call_is_cached(client):
    layout = client.predict(source="embedded", api_name="/load_model")
    shape = (layout["num_moe_layers"], layout["num_experts"])
    # settings no other test uses, so the first call really computes
    first = client.predict(source="embedded", method="frobenius", probes=7, closed_form=False,
                           api_name="/profile")
    again = client.predict(source="embedded", method="frobenius", probes=7, closed_form=False,
                           api_name="/profile")
    assert first["cache_hit"] is False and again["cache_hit"] is True
    assert first["scores"] == again["scores"]
    assert (len(first["scores"]), len(first["scores"][0])) == shape
    assert first["stderr"] is not None  # probes: a standard error per expert
    exact = client.predict(source="embedded", method="frobenius", closed_form=True,
                           api_name="/profile")
    assert all(s > 0 for row in exact["scores"] for s in row)
    assert exact["stderr"] is None
    freq = client.predict(source="embedded", method="frequency", api_name="/profile")
    assert all(isinstance(t, int) and t >= 0 for row in freq["tokens"] for t in row)


def _alloc(client, **kwargs) -> dict:
    return client.predict(source="embedded", api_name="/allocate", **kwargs)


def test_allocate_memory_follows_clusters_and_bits(client):
    base = _alloc(client, clusters=3, bits=[2, 3, 4])
    assert set(base) >= {"bits", "avg_bits", "deployable_fused", "memory", "clusters"}
    total = base["memory"]["total_bytes"]
    assert {b for row in base["bits"] for b in row} <= {2, 3, 4}
    fewer = _alloc(client, clusters=1, bits=[2, 3, 4])  # one cluster takes the most bits
    assert {b for row in fewer["bits"] for b in row} == {4}
    assert fewer["memory"]["total_bytes"] > total
    wider = _alloc(client, clusters=3, bits=[2, 4, 8])
    assert wider["memory"]["total_bytes"] > total
    assert base["memory"]["ratio"] > 1 and 2 <= base["avg_bits"] <= 4
    assert sum(r["experts"] for r in base["clusters"]) == sum(len(r) for r in base["bits"])


def test_allocate_methods_and_settings(client):
    snapped = _alloc(client, clusters=3, snap="mean")
    assert snapped["deployable_fused"] is True
    budget = _alloc(client, method="budget", target_bits=3.0)
    assert budget["avg_bits"] <= 3.0 + 1e-9
    assert budget["current"]["predicted_loss"] >= 0 and len(budget["pareto"]) >= 2
    uniform = _alloc(client, method="uniform", uniform_bits=8)
    assert {b for row in uniform["bits"] for b in row} == {8}
    freq = _alloc(client, method="frequency", clusters=2)
    assert freq["score_method"] == "frequency"
    coarse = _alloc(client, clusters=3, group_size=32)
    base = _alloc(client, clusters=3, group_size=128)
    assert coarse["memory"]["total_bytes"] > base["memory"]["total_bytes"]  # more scales
    high_base = _alloc(client, clusters=3, base_bits=8)
    assert high_base["memory"]["total_bytes"] > base["memory"]["total_bytes"]


def test_allocate_says_what_it_used_and_what_it_capped(client):
    capped = _alloc(client, method="budget", target_bits=8.0, bits=[2, 3, 4])
    assert {b for row in capped["bits"] for b in row} == {4}
    assert len(capped["warnings"]) == 1 and "above the widest width (4)" in capped["warnings"][0]
    assert _alloc(client, method="budget", target_bits=3.0, bits=[2, 3, 4])["warnings"] == []
    freq = _alloc(client, method="frequency", clusters=3, score_method="frobenius")
    kmeans = _alloc(client, method="kmeans", clusters=3, score_method="frobenius")
    assert freq["score_method"] == "frequency" and freq["judge_method"] == "frobenius"
    assert freq["pareto"] == kmeans["pareto"]  # the frontier weighs errors by sensitivity
    worst = max(p["predicted_loss"] for p in freq["pareto"])
    assert 0 <= freq["current"]["predicted_loss"] <= worst * (1 + 1e-9)
    single = _alloc(client, method="kmeans", clusters=1, bits=[8])
    assert {b for row in single["bits"] for b in row} == {8} and len(single["pareto"]) >= 1


def test_bad_input_gives_readable_messages(client, tmp_path):
    assert "bit width" in _error(client, "/allocate", source="embedded", bits=[])
    assert "clusters" in _error(client, "/allocate", source="embedded", clusters=99)
    assert "method" in _error(client, "/allocate", source="embedded", method="magic")
    assert "unknown sensitivity method" in _error(client, "/profile", source="embedded",
                                                  method="magic")
    assert "Hugging Face Hub" in _error(client, "/load_model", source="someone/some-moe")
    assert "no such model folder" in _error(client, "/load_model", source=str(tmp_path / "x"))
    import transformers as T

    dense = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             num_key_value_heads=2, vocab_size=64))
    dense.save_pretrained(tmp_path / "dense")
    assert "no MoE layer" in _error(client, "/load_model", source=str(tmp_path / "dense"))


def test_quantize_evaluate_while_live_controls_stay_responsive(client):
    expected = _alloc(client, clusters=2, bits=[2, 4])
    job = client.submit(source="embedded", clusters=2, bits=[2, 4], pairs=10, seed=3,
                        api_name="/quantize_evaluate")
    time.sleep(1.0)  # let the quantization start
    start = time.perf_counter()
    live = _alloc(client, clusters=3, bits=[2, 3, 4])
    assert time.perf_counter() - start < 2.0
    assert not job.done(), "allocation waited behind the quantization"
    assert live["memory"]["total_bytes"] > 0
    run = job.result(timeout=300)
    assert 0 <= run["score"] <= MME_MAX_TOTAL and 0 <= run["baseline_score"] <= MME_MAX_TOTAL
    assert run["delta"] == pytest.approx(run["score"] - run["baseline_score"])

    assert set(run["per_category"]) == set(synthetic.CATEGORIES)
    assert all(0 <= v <= 200 for v in run["per_category"].values())
    assert set(run["comparison"]) == set(synthetic.CATEGORIES)
    assert run["pairs"] == 10 and run["mode"] == "rtn" and run["seed"] == 3
    assert run["gb"] == pytest.approx(expected["memory"]["gb"])
    assert run["avg_bits"] == pytest.approx(expected["avg_bits"], abs=1e-3)
    assert run["kl"] >= 0 and 0 <= run["flip_rate"] <= 1


# ------------------------------------------------------------------------ helpers


def test_the_first_view_shows_a_loss_beyond_the_noise(client):
    """The page's defaults (the paper's map on the embedded model, the quick subset): the
    quantized score sits below the baseline, outside its own interval, and the page calls the
    difference significant (the issue's first-view criterion)."""
    from mopeq.app.api import significance_text
    from mopeq.core import defaults

    run = client.predict(source="embedded", api_name="/quantize_evaluate")
    assert run["pairs"] == defaults.QUICK_PAIRS
    low, high = run["score_ci95"]
    assert low <= run["score"] <= high < run["baseline_score"], run
    assert run["score_delta_ci95"][1] < 0 and run["p_value"] < 0.05, run
    assert "significant at" in significance_text(run)


def test_import_is_light():
    code = "import sys, app; assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


def test_method_names_match_the_library():
    from mopeq.allocation import allocate
    from mopeq.sensitivity import profile as sensitivity

    assert st.SCORE_METHODS == sensitivity.METHODS
    assert st.ALLOC_METHODS == allocate.METHODS


def test_sessions_start_empty_and_apart():
    initial = st.SessionState()
    a, b = copy.deepcopy(initial), copy.deepcopy(initial)  # what gradio does per session
    a.use_model(("embedded", False))
    a.runs.append({"label": "#1"})
    assert b.runs == [] and b.key is None and a.runs is not b.runs
    a.use_model(("other", False))
    assert a.runs == []  # results of another model are dropped


def test_cancel_flags_only_the_running_job():
    state = st.SessionState()
    assert state.cancel("quantize") is False  # nothing running
    old = state.new_job("quantize")
    report = st.cancellable(old, lambda f, m: None)
    report(0.1, "fine")
    assert state.cancel("quantize") is True
    with pytest.raises(st.Cancelled):
        report(0.2, "stops here")
    new = state.new_job("quantize")  # a new job is not cancelled by the old request
    st.cancellable(new, lambda f, m: None)(0.1, "runs")


def test_model_cache_loads_once_and_evicts_least_recent():
    calls = []

    def loader(source, trust):
        calls.append(source)
        time.sleep(0.05)
        return st.ModelEntry(loaded=source, layout=None)

    cache = st.ModelCache(size=2, loader=loader)
    threads = [threading.Thread(target=cache.get, args=("a",)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["a"]  # four sessions at once, one load
    assert cache.get(" a ") is cache.get("a")
    cache.get("b")
    cache.get("a")  # a is now the most recent
    cache.get("c")  # evicts b
    assert list(cache.entries) == [("a", False), ("c", False)]
    assert cache.get("a", True) is not cache.get("a")  # trust_remote_code is part of the key


def test_alloc_settings_validate():
    with pytest.raises(ValueError, match="no bit width"):
        st.AllocSettings.of(bits=[]).config()
    assert st.AllocSettings.of(bits=None).bits == (2, 3, 4)
    settings = st.AllocSettings.of("budget", 3.0, [4, 2], "model", False, 2.5, 4, 64, 8, None)
    config = settings.config()
    assert config.bits == (2, 4) and config.target_bits == 2.5
    assert config.memory.group_size == 64 and config.memory.base_bits == 8
    assert settings.snap == "none" and settings.score_method("hessian") == "hessian"
    assert st.AllocSettings.of("frequency").score_method("hessian") == "frequency"


def test_scores_export_without_a_run(embedded_model):
    entry = st.ModelCache().get("embedded")
    score, _ = st.profile(entry, st.ScoreSpec("frobenius"))
    alloc = st.allocate(entry, score, st.AllocSettings())
    state = st.SessionState()
    first = state.export_folder()
    files = st.export(entry, score, alloc.bitmap.bits.tolist(), None, first)
    assert [Path(f).name for f in files] == ["scores_frobenius.csv"]
    import pandas as pd

    frame = pd.read_csv(files[0])
    assert state.export_folder() != first and not first.exists()  # one folder per request
    assert list(frame.columns) == ["layer", "expert", "score", "gate", "up", "down", "stderr",
                                   "tokens", "bits"]
    assert len(frame) == entry.layout.num_moe_layers * entry.layout.num_experts
    assert frame["score"].to_numpy() == pytest.approx(
        (frame["gate"] + frame["up"] + frame["down"]).to_numpy())


def test_cancelling_a_running_sensitivity_stops_it_and_frees_the_model(embedded_model):
    entry = st.ModelCache().get("embedded")
    before = {n: p.requires_grad for n, p in entry.loaded.model.named_parameters()}
    flag, calls = threading.Event(), []

    def report(fraction, message):
        calls.append(message)
        if len(calls) == 2:  # the user presses cancel while it runs
            flag.set()

    with pytest.raises(st.Cancelled):
        st.profile(entry, st.ScoreSpec("hessian", probes=64), st.cancellable(flag, report))
    assert len(calls) == 2
    assert entry.lock.acquire(blocking=False)  # released
    entry.lock.release()
    after = {n: p.requires_grad for n, p in entry.loaded.model.named_parameters()}
    assert after == before  # the model is as it was
    assert entry.remembered(("scores", *st.ScoreSpec("hessian", probes=64).key())) is None


def test_runs_scatter_points_group_by_method_and_scores():
    runs = [{"method": "kmeans", "scores": "hessian", "avg_bits": 3.0, "gb": 1.0, "score": 90.0,
             "baseline_score": 100.0, "pairs": 50},
            {"method": "uniform", "scores": "frobenius", "avg_bits": 4.0, "gb": 1.2,
             "score": 95.0, "baseline_score": 98.0, "pairs": 20}]
    points = tables.tradeoff_points(runs, bf16_gb=3.0)
    assert [p["method"] for p in points] == ["kmeans · hessian", "uniform", "baseline",
                                             "baseline"]
    assert [p["score"] for p in points if p.get("baseline")] == [98.0, 100.0]
    from mopeq.app import figures as plots

    assert len(plots.tradeoff_scatter(points).data) == 3


def test_sensitivity_quality_panel_ranks_methods_against_measured(embedded_model):
    from mopeq.sensitivity.report import ReportConfig

    entry = st.ModelCache().get("embedded")
    config = ReportConfig(methods=("frequency", "block_error"), n_batches=1, batch_size=4,
                          targets=(), bits=(2,), pairs=14, use_cache=False)
    report = st.report(entry, config)
    table = tables.report_table(report)
    assert list(table["method"]) == ["measured", "frequency", "block_error"]
    assert table.loc[0, "spearman"] == pytest.approx(1.0)
    assert all(-1 <= r <= 1 for r in table["spearman"])
    text = tables.report_summary(report)
    best = max(report.rows[1:], key=lambda r: r["spearman"])["method"]
    assert f"**{best}**" in text and "95 % CI" in text
