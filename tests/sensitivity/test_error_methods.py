"""measured, block_error and block_fisher: exactness, layouts, cost, the allocator's use."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mopeq.allocation.allocate import AllocConfig, allocate
from mopeq.allocation.budget import predicted_loss
from mopeq.allocation.qerror import rtn
from mopeq.core import methods
from mopeq.model import moe
from mopeq.sensitivity import calibration as C
from mopeq.sensitivity.estimators import NoExpertGradient
from mopeq.sensitivity.measured import CostTooHigh, measured_cost
from mopeq.sensitivity.profile import METHODS, ProfileConfig, Scores, profile
from tests.helpers import ListMoE, list_moe_from_fused, tiny_lm, tiny_model

G = 32  # group size that divides every tiny expert dimension
CFG = ProfileConfig(use_cache=False, group_size=G, bits=(2, 3))


def random_data(vocab: int = 128, rows: int = 3, length: int = 12, n_batches: int = 2,
                seed: int = 0, pad: int = 3) -> C.CalibData:
    """Random token batches; the first row of each ends in ``pad`` padding tokens."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(3, vocab, (rows, length), generator=gen)
        mask = torch.ones_like(ids)
        mask[0, length - pad:] = 0
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, C.IGNORE))
        batches.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return C.CalibData(batches, f"random:{rows}x{length}x{n_batches}:seed={seed}")


def _hand_quantize(model, layout, row, e, bits):
    """RTN the expert's three projections in place with qerror.rtn (independent of mopeq code)."""
    with torch.no_grad():
        for w in moe.expert_weights(model, layout, row, e).values():
            w.copy_(rtn(w, bits, G, True).to(w.dtype))


def _labelled(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    keep = labels != C.IGNORE
    return logits[:, :-1][keep].double().log_softmax(-1), labels[keep]


def eager(model):
    """Float64 with eager expert kernels (grouped_mm is float32-only) for the hand runs."""
    model = model.double()
    if hasattr(model, "set_experts_implementation") and getattr(
            model.config, "_experts_implementation", None):
        model.set_experts_implementation("eager")
    return model


@pytest.fixture(scope="module")
def olmoe():
    model = eager(tiny_lm("olmoe"))
    return model, moe.discover(model), random_data()


# ------------------------------------------------------------------------- method table


def test_one_method_table_everywhere():
    from mopeq.app import state as app_state
    from mopeq.cli import build_parser

    assert METHODS == methods.NAMES == app_state.SCORE_METHODS
    assert all(callable(methods.resolve(m.estimator)) for m in methods.TABLE)
    profile_parser = build_parser()._subparsers._group_actions[0].choices["profile"]
    choices = next(a.choices for a in profile_parser._actions if a.dest == "method")
    assert list(choices) == list(methods.NAMES)
    assert {m.name for m in methods.TABLE if m.provides_errors} == {
        "block_error", "block_fisher", "measured"}
    with pytest.raises(ValueError, match="unknown method"):
        methods.info("magic")


# ------------------------------------------------------------------------- measured


def test_measured_equals_a_hand_computation(olmoe):
    model, layout, data = olmoe
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = profile(model, layout, "measured", CFG, data)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored
    assert s.errors.shape == (2, 8, 2) and s.meta["error_bits"] == [2, 3]
    with torch.no_grad():
        ref = [_labelled(model, b) for b in data.batches]
        for row, e, j in [(0, 0, 0), (1, 5, 1), (1, 2, 0)]:
            hand = copy.deepcopy(model)
            _hand_quantize(hand, layout, row, e, CFG.bits[j])
            kl = ce = n = 0.0
            for batch, (logp0, labels) in zip(data.batches, ref, strict=True):
                logp, _ = _labelled(hand, batch)
                kl += F.kl_div(logp, logp0, log_target=True, reduction="sum").item()
                ce += (F.nll_loss(logp, labels, reduction="sum")
                       - F.nll_loss(logp0, labels, reduction="sum")).item()
                n += len(labels)
            assert s.errors[row, e, j] == pytest.approx(kl / n, rel=1e-6, abs=1e-15)
            assert s.extras["loss_increase"][row, e, j] == pytest.approx(ce / n, rel=1e-6,
                                                                         abs=1e-12)
    assert (s.errors > 0).all() and np.array_equal(s.scores, s.errors[..., 0])
    np.testing.assert_allclose(s.scores, sum(s.per_projection.values()), rtol=1e-12)


def test_measured_reports_its_cost_and_refuses_when_too_high(olmoe):
    model, layout, data = olmoe
    cost = measured_cost(model, layout, CFG, data)
    assert cost.passes == 2 * 8 * 2 and cost.seconds == pytest.approx(cost.passes
                                                                      * cost.seconds_per_pass)
    seen = []
    with pytest.raises(CostTooHigh, match="forward passes"):
        profile(model, layout, "measured",
                ProfileConfig(use_cache=False, group_size=G, max_cost_s=1e-9), data,
                on_progress=lambda f, m: seen.append(m))
    assert "forward passes" in seen[0]


# ------------------------------------------------------------------------- block error


def _block_outputs(model, layout, batch) -> list[torch.Tensor]:
    outs = []

    def hook(_m, _i, out):
        outs.append((out[0] if isinstance(out, tuple) else out).detach().reshape(
            -1, out[0].shape[-1] if isinstance(out, tuple) else out.shape[-1]).clone())
    handles = [model.get_submodule(b.path).register_forward_hook(hook) for b in layout.blocks]
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for h in handles:
            h.remove()
    return outs


def _exact_layer_change(model, layout, data, row, e, bits) -> float:
    """sum over real tokens of ||y_l(expert e quantized) - y_l||^2, the model run twice."""
    hand = copy.deepcopy(model)
    _hand_quantize(hand, layout, row, e, bits)
    total = 0.0
    for batch in data.batches:
        y0, y1 = _block_outputs(model, layout, batch)[row], _block_outputs(hand, layout, batch)[row]
        mask = batch["attention_mask"].reshape(-1).bool()
        total += float(((y1 - y0)[mask] ** 2).sum())
    return total


def _listed_olmoe():
    return list_moe_from_fused(copy.deepcopy(tiny_lm("olmoe"))).double().eval()


MODELS = {"fused": lambda: eager(tiny_lm("olmoe")), "module_list": _listed_olmoe,
          "transposed": lambda: eager(tiny_model("aria_text")),
          "transposed_sorted": lambda: eager(tiny_model("llama4_text"))}


@pytest.mark.parametrize("name", list(MODELS))
def test_block_error_is_the_exact_change_of_the_layer_output(name):
    model = MODELS[name]()
    layout, data = moe.discover(model), random_data()
    assert layout.blocks[0].fused == (name != "module_list")
    assert layout.blocks[0].transposed == name.startswith("transposed")
    s = profile(model, layout, "block_error", CFG, data)
    assert (s.tokens.sum() > 0) and s.errors.shape == (layout.num_moe_layers, 8, 2)
    for row, e, j in [(0, int(s.tokens[0].argmax()), 0), (layout.num_moe_layers - 1,
                                                         int(s.tokens[-1].argmin()), 1)]:
        want = _exact_layer_change(model, layout, data, row, e, CFG.bits[j])
        assert s.errors[row, e, j] == pytest.approx(want, rel=1e-6, abs=1e-20), (row, e)
    unrouted = s.tokens == 0
    assert (s.errors[unrouted] == 0).all() and (s.errors[~unrouted] > 0).all()


@pytest.mark.parametrize("method", ["block_error", "block_fisher", "measured"])
def test_fused_and_module_list_layouts_give_the_same_numbers(method):
    fused, listed = eager(tiny_lm("olmoe")), _listed_olmoe()
    data = random_data()
    a = profile(fused, moe.discover(fused), method, CFG, data)
    b = profile(listed, moe.discover(listed), method, CFG, data)
    # OLMoE's router takes its softmax in float32, ListMoE's in float64: weights differ ~1e-7
    np.testing.assert_allclose(a.errors, b.errors, rtol=1e-5, atol=1e-18)
    np.testing.assert_array_equal(a.tokens, b.tokens)


def test_block_fisher_is_seeded_nonnegative_and_tracks_measured(olmoe):
    model, layout, data = olmoe
    run = lambda seed: profile(model, layout, "block_fisher",  # noqa: E731
                               ProfileConfig(use_cache=False, group_size=G, seed=seed), data)
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a.errors, b.errors)
    assert not np.array_equal(a.errors, c.errors)
    assert (a.errors >= 0).all() and a.meta["fisher_samples"] == 4
    # its expectation is the second-order KL: same order of magnitude as measured
    m = profile(model, layout, "measured", ProfileConfig(use_cache=False, group_size=G), data)
    ratio = np.median(a.errors[..., 0] / m.errors[..., 0])
    assert 0.1 < ratio < 10, ratio


# ------------------------------------------------------------------------- no-grad experts


class NoGradListMoE(ListMoE):
    """Experts under torch.no_grad, as DeepSeek-VL2's remote-code moe_infer at inference."""

    def forward(self, x):
        with torch.no_grad():
            return super().forward(x)


def test_gradient_methods_name_the_cause_when_experts_run_under_no_grad():
    model = _listed_olmoe()
    for layer in model.model.layers:
        layer.mlp.__class__ = NoGradListMoE
    layout, data = moe.discover(model), random_data()
    for method in ("hessian", "fisher"):
        cfg = ProfileConfig(use_cache=False, probes=2, min_probes=2)
        with pytest.raises(NoExpertGradient, match="torch.no_grad"):
            profile(model, layout, method, cfg, data)
    fine = profile(model, layout, "block_error", CFG, data)  # forward-only methods still work
    ref = profile(_listed_olmoe(), layout, "block_error", CFG, data)
    np.testing.assert_allclose(fine.errors, ref.errors, rtol=1e-9)
    assert profile(model, layout, "block_fisher", CFG, data).errors.max() > 0


# ------------------------------------------------------------------------- allocator


def test_budget_uses_the_methods_own_errors(olmoe):
    model, layout, data = olmoe
    s = profile(model, layout, "block_error", ProfileConfig(use_cache=False, group_size=G), data)
    config = AllocConfig(method="budget", target_bits=3.0)
    own = allocate(s, layout, config)
    assert own.meta["loss_model"] == "method errors"
    # the same problem posed as score x error with unit scores gives the same map
    same = allocate(np.ones_like(s.scores), layout, config, errors=s.errors)
    np.testing.assert_array_equal(own.bits, same.bits)
    assert same.meta["loss_model"] == "score x RTN error"
    want = sum(s.errors[r, e, (2, 3, 4).index(own.bits[r, e])]
               for r in range(2) for e in range(8))
    assert predicted_loss(own, s, None, (2, 3, 4)) == pytest.approx(want)
    assert own.meta["predicted_loss"] == pytest.approx(want)
    with pytest.raises(ValueError, match="recompute"):
        allocate(s, layout, AllocConfig(method="budget", target_bits=3.0, bits=(2, 3, 8)))


def test_scores_with_errors_round_trip(olmoe, tmp_path):
    model, layout, data = olmoe
    s = profile(model, layout, "measured", CFG, data)
    back = Scores.from_json(json.loads(json.dumps(s.to_json(), allow_nan=False)))
    s.save(tmp_path / "m")
    for other in (back, Scores.load(tmp_path / "m")):
        np.testing.assert_array_equal(other.errors, s.errors)
        np.testing.assert_array_equal(other.extras["loss_increase"], s.extras["loss_increase"])
        assert other.error_bits == (2, 3)


def test_cache_keys_hold_the_quantizer_settings(olmoe, tmp_path, monkeypatch):
    monkeypatch.setenv("MOPEQ_CACHE_DIR", str(tmp_path))
    model, layout, data = olmoe
    cfg = ProfileConfig(group_size=G, bits=(2,))
    first = profile(model, layout, "block_error", cfg, data)
    again = profile(model, layout, "block_error", cfg, data)
    assert again.meta["cache_hit"] and again.error_bits == (2,)
    np.testing.assert_array_equal(again.errors, first.errors)
    other = profile(model, layout, "block_error", ProfileConfig(group_size=G, bits=(2,),
                                                                sym=False), data)
    assert not other.meta["cache_hit"] and not np.array_equal(other.errors, first.errors)
    assert "group_size" not in ProfileConfig().settings("hessian")  # old keys unchanged


@pytest.mark.parametrize("name", ["transposed", "transposed_sorted"])
def test_block_fisher_runs_on_transposed_layouts(name):
    model = MODELS[name]()
    layout, data = moe.discover(model), random_data()
    s = profile(model, layout, "block_fisher", CFG, data)
    plain = profile(model, layout, "block_error", CFG, data)
    np.testing.assert_array_equal(s.tokens, plain.tokens)
    assert np.isfinite(s.errors).all() and (s.errors >= 0).all()
    assert (s.errors[s.tokens == 0] == 0).all() and s.errors.max() > 0
