"""Sensitivity scores: exactness against brute force, layout invariance, cache, data."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers as T

from mopeq.core.errors import MopeqError
from mopeq.core.layout import PROJECTIONS
from mopeq.embedded import tiny
from mopeq.model import moe
from mopeq.model.moe import expert_weights
from mopeq.sensitivity import calibration as C
from mopeq.sensitivity.profile import ProfileConfig, Scores, profile
from tests.helpers import list_moe_from_fused, tiny_lm

NOCACHE = dict(use_cache=False)


def micro_olmoe(seed: int = 0) -> torch.nn.Module:
    """2 layers x 4 experts of 96 weights each, float64, eager: small enough for full Hessians."""
    torch.manual_seed(seed)
    config = T.OlmoeConfig(hidden_size=8, intermediate_size=4, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, vocab_size=32,
                           max_position_embeddings=32, num_experts=4, num_experts_per_tok=2,
                           attn_implementation="eager", initializer_range=0.5,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = T.OlmoeForCausalLM(config).double().eval()
    model.set_experts_implementation("eager")
    return model


def micro_llama4(seed: int = 0) -> torch.nn.Module:
    """Like ``micro_olmoe`` but Llama4: fused experts stored transposed, a dense-score router."""
    torch.manual_seed(seed)
    config = T.Llama4TextConfig(hidden_size=8, intermediate_size=4, intermediate_size_mlp=16,
                                num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                head_dim=4, vocab_size=32, num_local_experts=4,
                                num_experts_per_tok=1, interleave_moe_layer_step=1,
                                max_position_embeddings=32, attn_implementation="eager",
                                initializer_range=0.5, pad_token_id=0, bos_token_id=1,
                                eos_token_id=2)
    return T.Llama4ForCausalLM(config).double().eval()


def random_data(vocab: int, shape=(4, 16), n_batches: int = 1, seed: int = 0) -> C.CalibData:
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, shape, generator=gen)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "labels": ids.clone()})
    return C.CalibData(batches, f"random{shape}x{n_batches}:seed={seed}")


def reference_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    logits, labels = logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    if loss == "ce":
        return F.cross_entropy(logits, labels)
    logp = logits.log_softmax(-1)
    return (logp.detach().exp() * (logp.detach() - logp)).sum(-1).mean()


def exact_traces(model, layout, batch, loss: str) -> np.ndarray:
    """Tr of each expert's full Hessian block, by torch.autograd.functional.hessian."""
    out = np.zeros((layout.num_moe_layers, layout.num_experts))
    for row, block in enumerate(layout.blocks):
        experts = model.get_submodule(block.experts_path)
        gu0, dn0 = experts.gate_up_proj.detach(), experts.down_proj.detach()
        for e in range(block.num_experts):
            def f(flat, e=e, gu0=gu0, dn0=dn0, block=block):
                a = gu0[e].numel()
                gu = torch.cat([gu0[:e], flat[:a].view(1, *gu0.shape[1:]), gu0[e + 1:]])
                dn = torch.cat([dn0[:e], flat[a:].view(1, *dn0.shape[1:]), dn0[e + 1:]])
                params = {f"{block.experts_path}.gate_up_proj": gu,
                          f"{block.experts_path}.down_proj": dn}
                logits = torch.func.functional_call(
                    model, params, args=(), kwargs={"input_ids": batch["input_ids"]}).logits
                return reference_loss(logits, batch["labels"], loss)
            flat = torch.cat([gu0[e].flatten(), dn0[e].flatten()])
            hess = torch.autograd.functional.hessian(f, flat, vectorize=True)
            out[row, e] = hess.diagonal().sum().item()
    return out


@pytest.fixture(scope="module")
def micro():
    model = micro_olmoe()
    return model, moe.discover(model), random_data(32)


@pytest.fixture(scope="module")
def olmoe():
    model = tiny_lm("olmoe")
    return model, moe.discover(model)


@pytest.fixture(scope="module")
def tiny_vlm():
    model, processor = tiny.new_model(tiny.TinyRecipe(seed=0))
    return model.eval(), processor, moe.discover(model)


# ------------------------------------------------------------------------- config


def test_config_validation_and_settings():
    with pytest.raises(ValueError, match="loss"):
        ProfileConfig(loss="mse")
    with pytest.raises(ValueError, match="inactive_policy"):
        ProfileConfig(inactive_policy="nothing")
    with pytest.raises(ValueError, match="probes"):
        ProfileConfig(probes=1)
    cfg = ProfileConfig()
    assert cfg.probes_for("frobenius") == 100 and cfg.probes_for("hessian") == 64
    assert "use_cache" not in cfg.settings("hessian")
    assert "probes" not in cfg.settings("frequency") and "loss" in cfg.settings("fisher")
    assert set(ProfileConfig(closed_form=True).settings("frobenius")) == {
        "closed_form", "normalize_per_layer"}


def test_profile_rejects_bad_requests(micro):
    model, layout, data = micro
    with pytest.raises(ValueError, match="unknown method"):
        profile(model, layout, "magic", ProfileConfig(**NOCACHE))
    with pytest.raises(ValueError, match="calibration data"):
        profile(model, layout, "hessian", ProfileConfig(**NOCACHE))
    with pytest.raises(ValueError, match="self_kl"):
        profile(model, layout, "fisher", ProfileConfig(loss="self_kl", **NOCACHE), data)


# ------------------------------------------------------------------------- frobenius


def test_frobenius_closed_form_is_exact(olmoe):
    model, layout = olmoe
    s = profile(model, layout, "frobenius", ProfileConfig(closed_form=True, **NOCACHE))
    for row in range(layout.num_moe_layers):
        for e in range(layout.num_experts):
            w = expert_weights(model, layout, row, e)
            for p in PROJECTIONS:
                n = w[p].numel()
                want = (n - 1) / (n * w[p].double().norm().item())
                assert s.per_projection[p][row, e] == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(s.scores, sum(s.per_projection.values()), rtol=1e-12)
    assert s.stderr is None and s.meta["form"] == "closed"


def test_frobenius_hutchinson_agrees_with_closed_form(olmoe):
    model, layout = olmoe
    exact = profile(model, layout, "frobenius", ProfileConfig(closed_form=True, **NOCACHE))
    est = profile(model, layout, "frobenius", ProfileConfig(**NOCACHE))
    assert est.meta["probes"] == 100 and est.stderr is not None
    err = np.abs(est.scores - exact.scores)
    assert (err <= 4 * est.stderr).all(), (err / est.stderr).max()
    assert (err / exact.scores).max() < 1e-4  # the REFERENCE figure is ~1e-6 per projection


def test_frobenius_per_layer_normalisation(olmoe):
    model, layout = olmoe
    raw = profile(model, layout, "frobenius", ProfileConfig(closed_form=True, **NOCACHE))
    norm = profile(model, layout, "frobenius",
                   ProfileConfig(closed_form=True, normalize_per_layer=True, **NOCACHE))
    np.testing.assert_allclose(norm.scores.sum(1), 1.0)
    np.testing.assert_allclose(norm.scores, raw.scores / raw.scores.sum(1, keepdims=True))
    np.testing.assert_allclose(norm.scores, sum(norm.per_projection.values()))


# ------------------------------------------------------------------------- hessian


@pytest.mark.parametrize("loss", ["ce", "self_kl"])
def test_hessian_within_stderr_of_brute_force(micro, loss):
    model, layout, data = micro
    exact = exact_traces(model, layout, data.batches[0], loss)
    s = profile(model, layout, "hessian",
                ProfileConfig(probes=64, min_probes=64, tol=0, loss=loss, **NOCACHE), data)
    n = np.array([[layout.expert(r, e).numel for e in range(4)] for r in range(2)])
    assert s.meta["probes"] == 64 and s.meta["coverage"] == 1.0
    np.testing.assert_allclose(s.trace_raw, s.scores * n, rtol=1e-12)
    z = (s.trace_raw - exact) / (s.stderr * n)
    assert np.abs(z).max() < 4, z
    np.testing.assert_allclose(s.scores, sum(s.per_projection.values()), rtol=1e-10)


def test_transposed_fused_layout():
    model = micro_llama4()
    layout, data = moe.discover(model), random_data(32)
    assert all(b.fused and b.transposed for b in layout.blocks)
    for row, block in enumerate(layout.blocks):
        params = moe.block_params(model, block)
        canon = moe.canonical(block, params)
        i = params[0].shape[2] // 2  # stored [E, H, 2I] / [E, I, H]
        assert torch.equal(canon["up"][1], params[0][1, :, i:].t())
        assert torch.equal(canon["down"][1], params[1][1].t())
        for e in range(block.num_experts):
            w = expert_weights(model, layout, row, e)
            assert all(torch.equal(canon[p][e], w[p]) for p in PROJECTIONS)
        back = moe.from_canonical(block, canon)
        assert all(torch.equal(a, b) for a, b in zip(back, params, strict=True))
    exact = exact_traces(model, layout, data.batches[0], "ce")
    s = profile(model, layout, "hessian",
                ProfileConfig(probes=64, min_probes=64, tol=0, **NOCACHE), data)
    z = (s.trace_raw - exact) / (s.stderr * layout.experts[0].numel)
    assert np.abs(z).max() < 4, z
    freq = profile(model, layout, "frequency", ProfileConfig(**NOCACHE), data)
    np.testing.assert_array_equal(freq.tokens.sum(1), 64 * layout.top_k)
    np.testing.assert_array_equal(freq.tokens, s.tokens)


@pytest.mark.slow
def test_hessian_within_5_percent_at_high_probe_count(micro):
    # self-KL: its Hessian is the (PSD) Fisher, so traces are well away from zero; 256 tokens
    # give every expert a Hessian of high enough rank for a relative stderr of ~1.5 %
    model, layout, _ = micro
    data = random_data(32, shape=(8, 32))
    exact = exact_traces(model, layout, data.batches[0], "self_kl")
    s = profile(model, layout, "hessian",
                ProfileConfig(probes=3000, min_probes=3000, tol=0, loss="self_kl", **NOCACHE),
                data)
    n = layout.experts[0].numel
    assert (s.stderr * n / exact).max() < 0.02
    assert np.abs(s.trace_raw / exact - 1).max() < 0.05


def test_hessian_early_stop_and_cap(micro):
    model, layout, data = micro
    loose = profile(model, layout, "hessian",
                    ProfileConfig(probes=40, min_probes=10, tol=10.0, **NOCACHE), data)
    assert loose.meta["probes"] == 10 and loose.meta["converged"]
    capped = profile(model, layout, "hessian",
                     ProfileConfig(probes=12, min_probes=4, tol=0, **NOCACHE), data)
    assert capped.meta["probes"] == 12 and not capped.meta["converged"]


def test_hessian_independent_of_probes_per_pass_and_batches_split(micro):
    model, layout, data = micro
    cfg = dict(probes=6, min_probes=6, tol=0, **NOCACHE)
    a = profile(model, layout, "hessian", ProfileConfig(probes_per_pass=1, **cfg), data)
    b = profile(model, layout, "hessian", ProfileConfig(probes_per_pass=4, **cfg), data)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-10)
    ids = data.batches[0]["input_ids"]
    halves = C.CalibData([{"input_ids": h, "attention_mask": torch.ones_like(h),
                           "labels": h.clone()} for h in ids.split(2)], "halves")
    c = profile(model, layout, "hessian", ProfileConfig(probes_per_pass=4, **cfg), halves)
    # the mean of two half-batch losses is the full-batch loss (equal token counts)
    np.testing.assert_allclose(c.trace_raw, b.trace_raw, rtol=1e-8, atol=1e-12)


def test_model_state_restored(micro):
    model, layout, data = micro
    model.train()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    profile(model, layout, "hessian", ProfileConfig(probes=2, min_probes=2, **NOCACHE), data)
    assert model.training
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()


def test_hessian_through_tiny_vlm_sdpa_attention(tiny_vlm):
    model, processor, layout = tiny_vlm
    data = C.calibration_batches(model, processor, n_batches=1, batch_size=4, seed=0)
    s = profile(model, layout, "hessian", ProfileConfig(probes=3, min_probes=3, **NOCACHE), data)
    assert s.scores.shape == (layout.num_moe_layers, layout.num_experts)
    assert np.isfinite(s.scores).all()
    assert s.meta["probes"] == 3 and 0 < s.meta["coverage"] <= 1
    assert model.language_model.config._attn_implementation == "sdpa"  # MATH backend used


# ------------------------------------------------------------------------- fisher / frequency


def test_fisher_is_mean_squared_batch_gradient(micro):
    model, layout, _ = micro
    data = random_data(32, shape=(2, 12), n_batches=3, seed=5)
    s = profile(model, layout, "fisher", ProfileConfig(**NOCACHE), data)
    want = np.zeros((2, 4))
    for batch in data.batches:
        params = [p for b in layout.blocks
                  for p in model.get_submodule(b.experts_path).parameters()]
        loss = reference_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"], "ce")
        grads = torch.autograd.grad(loss, params)
        for row in range(2):
            gu, dn = grads[2 * row], grads[2 * row + 1]
            want[row] += ((gu ** 2).sum((1, 2)) + (dn ** 2).sum((1, 2))).numpy() / 3
    np.testing.assert_allclose(s.trace_raw, want, rtol=1e-10)
    assert s.stderr is None and s.meta["score_unit"] == "Tr(F_e)/n_e"


def test_frequency_counts_sum_to_tokens_times_top_k(tiny_vlm):
    model, processor, layout = tiny_vlm
    data = C.calibration_batches(model, processor, n_batches=2, batch_size=3, seed=1)
    s = profile(model, layout, "frequency", ProfileConfig(**NOCACHE), data)
    real = sum(int(b["attention_mask"].sum()) for b in data.batches)
    assert real < sum(b["input_ids"].numel() for b in data.batches)  # padding is left out
    np.testing.assert_array_equal(s.tokens.sum(1), real * layout.top_k)
    np.testing.assert_array_equal(s.scores, s.tokens)
    np.testing.assert_allclose(s.scores, sum(s.per_projection.values()))


# ------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("method", ["frobenius", "hessian", "fisher", "frequency"])
def test_fused_and_module_list_layouts_agree(method):
    fused = tiny_lm("olmoe").double()
    listed = list_moe_from_fused(copy.deepcopy(tiny_lm("olmoe"))).double().eval()
    lf, ll = moe.discover(fused), moe.discover(listed)
    assert all(b.fused for b in lf.blocks) and not any(b.fused for b in ll.blocks)
    data = random_data(128, shape=(2, 16), n_batches=2)
    cfg = ProfileConfig(probes=4, min_probes=4, **NOCACHE)
    a, b = profile(fused, lf, method, cfg, data), profile(listed, ll, method, cfg, data)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-14)
    for p in PROJECTIONS:
        np.testing.assert_allclose(a.per_projection[p], b.per_projection[p], rtol=1e-5,
                                   atol=1e-14)
    if a.tokens is not None:
        np.testing.assert_array_equal(a.tokens, b.tokens)


# ------------------------------------------------------------------------- inactive experts


def _silence_expert(model, layout, expert: int):
    """Reroute every assignment of ``expert`` to the next expert (router forward hook)."""
    def hook(_m, _i, out):
        logits, weights, idx = out
        return logits, weights, torch.where(idx == expert, (idx + 1) % layout.num_experts, idx)
    return [model.get_submodule(b.router_path).register_forward_hook(hook) for b in layout.blocks]


@pytest.mark.parametrize("policy", ["layer_mean", "model_mean", "zero"])
def test_inactive_experts_get_the_policy_not_a_silent_zero(micro, policy):
    model, layout, data = micro
    handles = _silence_expert(model, layout, 3)
    try:
        cfg = ProfileConfig(probes=4, min_probes=4, inactive_policy=policy, **NOCACHE)
        h = profile(model, layout, "hessian", cfg, data)
        f = profile(model, layout, "fisher", cfg, data)
    finally:
        for handle in handles:
            handle.remove()
    for s in (h, f):
        assert s.meta["inactive"] == [[0, 3], [1, 3]] and s.meta["coverage"] == 0.75
        assert s.meta["inactive_policy"] == policy
        np.testing.assert_array_equal(s.tokens[:, 3], 0)
        np.testing.assert_array_equal(s.trace_raw[:, 3], 0.0)  # the measurement stays raw
        want = {"layer_mean": s.scores[:, :3].mean(1), "zero": np.zeros(2),
                "model_mean": np.full(2, s.scores[:, :3].mean())}[policy]
        np.testing.assert_allclose(s.scores[:, 3], want, rtol=1e-12)
        np.testing.assert_allclose(s.scores, sum(s.per_projection.values()), rtol=1e-10,
                                   atol=1e-15)
    assert np.isnan(h.stderr[:, 3]).all() and np.isfinite(h.stderr[:, :3]).all()


# ------------------------------------------------------------------------- determinism, cache


@pytest.mark.parametrize("method", ["frobenius", "hessian"])
def test_deterministic_under_a_seed(micro, method):
    model, layout, data = micro
    run = lambda seed: profile(model, layout, method,  # noqa: E731
                               ProfileConfig(probes=6, min_probes=6, seed=seed, **NOCACHE), data)
    a, b, c = run(0), run(0), run(1)
    np.testing.assert_array_equal(a.scores, b.scores)
    assert not np.array_equal(a.scores, c.scores)


def test_cache_hit_miss_and_corrupt_files(micro, tmp_path, monkeypatch):
    monkeypatch.setenv("MOPEQ_CACHE_DIR", str(tmp_path))
    model, layout, data = micro
    cfg = ProfileConfig(probes=4, min_probes=4)
    first = profile(model, layout, "hessian", cfg, data)
    second = profile(model, layout, "hessian", cfg, data)
    assert not first.meta["cache_hit"] and second.meta["cache_hit"]
    for name, arr in first.arrays().items():
        np.testing.assert_array_equal(arr, second.arrays()[name])
    assert not profile(model, layout, "hessian", ProfileConfig(probes=4, min_probes=4, seed=1),
                       data).meta["cache_hit"]
    other = C.CalibData(data.batches, data.description + ":other")
    assert not profile(model, layout, "hessian", cfg, other).meta["cache_hit"]
    assert len(list((tmp_path / "sensitivity").glob("*.json"))) == 3
    path = tmp_path / "sensitivity" / f"{first.meta['cache_key']}.json"
    for damage in ("json", "npz", "format"):
        if damage == "format":
            path.write_text(json.dumps({**json.loads(path.read_text()), "_format": -1}))
        else:
            path.with_suffix(f".{damage}").write_bytes(b"\x00garbage")
        with pytest.warns(UserWarning, match="recomputing"):
            again = profile(model, layout, "hessian", cfg, data)
        assert not again.meta["cache_hit"]
        np.testing.assert_array_equal(again.scores, first.scores)
        assert profile(model, layout, "hessian", cfg, data).meta["cache_hit"]


def test_loaded_model_fingerprint_keys_the_cache(micro, tmp_path, monkeypatch):
    from mopeq.model.loading import LoadedModel, fingerprint_model

    monkeypatch.setenv("MOPEQ_CACHE_DIR", str(tmp_path))
    model, layout, _ = micro
    cfg = ProfileConfig(closed_form=True)
    loaded = profile(LoadedModel(model, None, "fp-test", "test", "causal_lm"), layout,
                     "frobenius", cfg)
    bare = profile(model, layout, "frobenius", cfg)
    assert loaded.meta["fingerprint"] == "fp-test" and not loaded.meta["cache_hit"]
    assert bare.meta["fingerprint"] == fingerprint_model(model) and not bare.meta["cache_hit"]
    assert profile(model, layout, "frobenius", cfg, fingerprint="fp-test").meta["cache_hit"]


def test_progress_reports_monotone_fractions(micro):
    model, layout, data = micro
    seen = []
    profile(model, layout, "hessian", ProfileConfig(probes=8, min_probes=8, probes_per_pass=2,
                                                     **NOCACHE), data,
            on_progress=lambda f, m: seen.append((f, m)))
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(seen) >= 5
    assert all(isinstance(m, str) and m for _, m in seen)


# ------------------------------------------------------------------------- serialisation


def test_scores_json_and_files_round_trip(micro, tmp_path):
    model, layout, data = micro
    s = profile(model, layout, "hessian", ProfileConfig(probes=4, min_probes=4, **NOCACHE), data)
    s.stderr[0, 0] = np.nan  # NaN must become null, not invalid JSON
    d = json.loads(json.dumps(s.to_json(), allow_nan=False))
    assert {"method", "scores", "per_projection", "stderr", "tokens", "elapsed_s",
            "cache_hit"} <= set(d)
    assert d["stderr"][0][0] is None and d["method"] == "hessian"
    back = Scores.from_json(d)
    s.save(tmp_path / "scores")
    loaded = Scores.load(tmp_path / "scores")
    for other in (back, loaded):
        for name, arr in s.arrays().items():
            np.testing.assert_array_equal(arr, other.arrays()[name])
        assert other.meta["probes"] == 4
    assert loaded.tokens.dtype.kind == "i"


# ------------------------------------------------------------------------- calibration


def test_tiny_vlm_calibration_labels_only_answers(tiny_vlm):
    model, processor, _ = tiny_vlm
    data = C.calibration_batches(model, processor, n_batches=2, batch_size=3, seed=4)
    assert len(data.batches) == 2 and "train_stream(seed=4)" in data.description
    b = data.batches[0]
    assert b["input_ids"].shape[0] == 6 and b["pixel_values"].shape[0] == 6
    labelled = b["labels"] != C.IGNORE
    assert (labelled.sum(1) == 2).all()  # the one-word answer and <eos>
    answers = processor.tokenizer.convert_ids_to_tokens(b["labels"][labelled][::2].tolist())
    assert set(answers) <= {"yes", "no"}
    other = C.calibration_batches(model, processor, n_batches=2, batch_size=3, seed=5)
    assert other.description != data.description
    assert not torch.equal(other.batches[0]["pixel_values"], b["pixel_values"])


def test_text_calibration_builtin_file_and_tokenizer(olmoe, tmp_path):
    model, _ = olmoe
    data = C.calibration_batches(model, None, n_batches=2, batch_size=3, seed=0)
    ids = data.batches[0]["input_ids"]
    assert ids.shape == (3, 64) and int(ids.max()) < 128  # capped at max_position_embeddings
    assert "builtin" in data.description and "bytes%128" in data.description
    text = tmp_path / "notes.txt"
    text.write_text("a small local text " * 50)
    from_file = C.calibration_batches(model, None, 1, 2, seed=0, text_file=text, seq_len=16)
    assert "notes.txt" in from_file.description and from_file.batches[0]["input_ids"].shape == (
        2, 16)
    tok = tiny.build_tokenizer()  # 181 ids: more than this model's 128 embedding rows
    with pytest.raises(MopeqError, match="does not belong to this model"):
        C.calibration_batches(model, tok, 1, 2, seed=0, seq_len=8)
    wide = copy.deepcopy(model)
    wide.resize_token_embeddings(len(tok))
    tokenized = C.calibration_batches(wide, tok, 1, 2, seed=0, seq_len=8)
    assert f"tokenizer=TokenizersBackend(,{len(tok)})" in tokenized.description
    assert torch.equal(tokenized.batches[0]["labels"], tokenized.batches[0]["input_ids"])


def test_vlm_calibration_through_a_processor(olmoe):
    class StubProcessor:
        image_token_id = 7

        def apply_chat_template(self, chat, tokenize=False):
            return f"<img> {chat[0]['content'][1]['text']} => {chat[1]['content'][0]['text']}"

        def __call__(self, images, text, return_tensors, padding):
            rows = [[7, 7] + [3 + len(w) % 20 for w in t.split()] for t in text]
            width = max(map(len, rows))
            ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            return {"input_ids": ids, "attention_mask": mask,
                    "pixel_values": torch.zeros(len(images), 3, 8, 8)}

    loaded = type("Loaded", (), {"model": olmoe[0], "processor": StubProcessor(), "kind": "vlm"})
    data = C.calibration_batches(loaded, None, n_batches=1, batch_size=2, seed=0)
    b = data.batches[0]
    assert b["input_ids"].shape[0] == 4 and data.description.startswith("vlm:")
    assert (b["labels"][:, :2] == C.IGNORE).all()  # image tokens
    assert (b["labels"][b["attention_mask"] == 0] == C.IGNORE).all()
    with pytest.raises(ValueError, match="processor"):
        C.calibration_batches(type("L", (), {"model": olmoe[0], "processor": None,
                                             "kind": "vlm"})(), None, 1, 1)
