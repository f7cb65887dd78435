"""Native MolmoE on tiny hub-layout checkpoints: load, reference logits, crops, every stage."""

import json

import numpy as np
import pytest
import torch

from mopeq.model.archs.molmoe import MolmoeForConditionalGeneration
from mopeq.model.archs.molmoe_processing import CropSettings, image_inputs, select_tiling
from mopeq.model.loading import load_model
from mopeq.model.moe import discover
from tests.helpers import molmoe as molmoe_fixture


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return molmoe_fixture.write(tmp_path_factory.mktemp("molmoe") / "MolmoE-tiny")


@pytest.fixture(scope="module")
def loaded(folder):
    return load_model(str(folder))


def test_hub_layout_loads_natively_despite_auto_map(folder, loaded):
    assert "auto_map" in json.loads((folder / "config.json").read_text())
    assert isinstance(loaded.model, MolmoeForConditionalGeneration)
    assert loaded.kind == "vlm"
    layout = discover(loaded.model)
    assert (layout.num_moe_layers, layout.num_experts, layout.top_k) == (2, 8, 2)
    vision = sum(p.numel() for n, p in loaded.model.named_parameters()
                 if n.startswith(("vision_tower.", "multi_modal_projector.")))
    params = layout.params()
    assert params["vision"] == vision > 0
    assert params["total"] == sum(p.numel() for p in loaded.model.parameters())
    wrong = [t.name for t in layout.tensors if t.name.startswith(("vision_tower", "multi_modal"))
             and t.component != "vision"]
    assert not wrong


def _reference_olmoe(folder):
    """transformers' plain OlmoeForCausalLM holding the hub tensors (mapped here, by hand)."""
    from safetensors.torch import load_file
    from transformers import OlmoeConfig, OlmoeForCausalLM

    cfg = json.loads((folder / "config.json").read_text())
    hub = load_file(str(folder / "model.safetensors"))
    d, e = cfg["d_model"], cfg["moe_num_experts"]
    emb = torch.cat([hub["model.transformer.wte.embedding"],
                     hub["model.transformer.wte.new_embedding"]])
    model = OlmoeForCausalLM(OlmoeConfig(
        vocab_size=emb.shape[0], hidden_size=d, intermediate_size=d // 2,
        num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
        num_experts=e, num_experts_per_tok=cfg["moe_top_k"], norm_topk_prob=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg["rope_theta"]})).eval()
    sd = {"model.embed_tokens.weight": emb,
          "model.norm.weight": hub["model.transformer.ln_f.weight"],
          "lm_head.weight": torch.cat([hub["lm_head.weight"], torch.zeros(8, d)])}
    for i in range(cfg["n_layers"]):
        src, dst = f"model.transformer.blocks.{i}.", f"model.layers.{i}."
        q, k, v = hub[src + "attn.att_proj.weight"].chunk(3)
        sd.update({dst + "self_attn.q_proj.weight": q, dst + "self_attn.k_proj.weight": k,
                   dst + "self_attn.v_proj.weight": v,
                   dst + "self_attn.o_proj.weight": hub[src + "attn.attn_out.weight"],
                   dst + "self_attn.q_norm.weight": hub[src + "attn.q_norm.weight"],
                   dst + "self_attn.k_norm.weight": hub[src + "attn.k_norm.weight"],
                   dst + "input_layernorm.weight": hub[src + "attn.attn_norm.weight"],
                   dst + "post_attention_layernorm.weight": hub[src + "mlp.ff_norm.weight"],
                   dst + "mlp.gate.weight": hub[src + "mlp.gate.weight"]})
        ex = src + "mlp.experts.{}.{}_proj.weight"
        sd[dst + "mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([hub[ex.format(j, "gate")], hub[ex.format(j, "up")]]) for j in range(e)])
        sd[dst + "mlp.experts.down_proj"] = torch.stack([hub[ex.format(j, "down")]
                                                         for j in range(e)])
    model.load_state_dict(sd, strict=True)
    return model, cfg["embedding_size"]


def test_text_logits_equal_plain_olmoe_on_the_same_weights(folder, loaded):
    ref, rows = _reference_olmoe(folder)
    ids = torch.tensor([loaded.processor.tokenizer.encode(" User: Is there a dog? Assistant:")])
    with torch.no_grad():
        want = ref(input_ids=ids).logits[..., :rows]
        got = loaded.model(input_ids=ids).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("hw, tiling", [((336, 336), (1, 1)), ((672, 672), (3, 3)),
                                        ((1000, 500), (4, 2)), ((5000, 5000), (3, 3)),
                                        ((200, 1200), (1, 5))])
def test_crop_choices_on_known_sizes(hw, tiling):
    # MolmoE's settings: 336 px crops, 14 px patches, 4-patch margins -> 224 px windows
    assert select_tiling(hw[0] - 112, hw[1] - 112, 224, 12) == tiling


def test_tokens_and_indices_of_one_image():
    s = CropSettings()
    ids = {"<im_start>": 1, "<im_end>": 2, "<im_patch>": 3, "<im_col>": 4, "<|image|>": 5}
    out = image_inputs(np.zeros((500, 700, 3), np.uint8), s, ids)
    rows, cols = select_tiling(500 - 112, 700 - 112, 224, 12)
    assert out["images"].shape == (rows * cols + 1, 576, 588)
    tokens, idx = out["tokens"], out["image_input_idx"]
    patch_at = np.flatnonzero(tokens == 3)
    valid = idx[idx >= 0]
    assert sorted(valid.tolist()) == patch_at.tolist()  # each <im_patch> gets exactly one feature
    assert (tokens == 4).sum() == 12 + (rows * 16 + 8) // 2  # one <im_col> per row
    assert out["image_masks"].shape == (rows * cols + 1, 576)
    assert (out["image_masks"][-1] == -1).all()


def test_batched_answers_equal_single_answers(loaded):
    adapter = loaded.processor.mme_adapter(loaded.model)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (60, 90, 3), dtype=np.uint8),
              rng.integers(0, 255, (120, 40, 3), dtype=np.uint8)]
    qs = ["Is the square red? Please answer yes or no.", "Is there a cat?"]
    texts, probs = adapter.answer(images, qs)
    for k in range(2):
        t, p = adapter.answer(images[k:k + 1], qs[k:k + 1])
        assert t[0] == texts[k]
        np.testing.assert_allclose(p[0], probs[k], atol=1e-5)


def test_unsupported_variant_is_refused_by_name(tmp_path):
    folder = molmoe_fixture.write(tmp_path / "m", overrides={"clip_qkv": 8.0})
    with pytest.raises(ValueError, match="clip_qkv"):
        load_model(str(folder))


def test_every_stage_through_the_cli(folder, tmp_path, capsys):
    from mopeq.cli import main
    from mopeq.core import methods

    model = str(folder)
    assert main(["inspect", "--model", model, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_type"] == "molmo" and info["num_experts"] == 8
    for method in methods.NAMES:  # every sensitivity method
        out = tmp_path / f"{method}.json"
        assert main(["profile", "--model", model, "--method", method, "--probes", "4",
                     "--group-size", "32", "--out", str(out), "--json"]) == 0
        scores = np.array(json.loads(out.read_text())["scores"], dtype=float)
        assert scores.shape == (2, 8) and np.isfinite(scores).all() and (scores != 0).any()
    capsys.readouterr()
    bitmap = tmp_path / "bits.json"
    assert main(["allocate", "--model", model, "--scores", str(tmp_path / "hessian.json"),
                 "--group-size", "32", "--out", str(bitmap), "--json"]) == 0
    capsys.readouterr()
    assert main(["memory", "--model", model, "--bitmap", str(bitmap), "--group-size", "32",
                 "--json"]) == 0
    mem = json.loads(capsys.readouterr().out)
    assert mem["breakdown"]["vision"] > 0
    out = tmp_path / "q"
    assert main(["quantize", "--model", model, "--bitmap", str(bitmap), "--group-size", "32",
                 "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    assert (out / "preprocessor_config.json").exists() and (out / "tokenizer.json").exists()
    assert main(["evaluate", "--model", str(out), "--pairs", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_pairs"] == 2 and 0 <= result["score"] <= 400


def test_vision_stays_16_bit_in_the_estimate_and_the_quantization(loaded):
    from mopeq.core.memory import MemoryConfig, estimate
    from mopeq.quantize.autoround import QuantConfig, layer_config, quantize

    layout = discover(loaded.model)
    bits = np.full((2, 8), 2)
    est = estimate(layout, bits, MemoryConfig(group_size=32))
    stored = {t.dtype for t in layout.tensors if t.component == "vision"}
    assert len(stored) == 1  # as the checkpoint's files hold it, at full width
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[stored.pop()]
    assert est.breakdown["vision"] == width * layout.params()["vision"]
    cfg = layer_config(layout, bits, QuantConfig(group_size=32), "language_model.")
    assert not [n for n in cfg if "vision" in n or "projector" in n]
    result = quantize(loaded.model, layout, bits, QuantConfig(group_size=32),
                      tokenizer=loaded.processor)
    assert result.levels_ok
    before = dict(loaded.model.named_parameters())
    for n, p in result.model.named_parameters():
        if n.startswith(("vision_tower.", "multi_modal_projector.")):
            torch.testing.assert_close(p, before[n])  # untouched


def test_reloading_an_export_leaves_later_olmoe_loads_intact(loaded, tmp_path):
    """auto-round's loader strips the expert-fusing conversions of ``olmoe`` process-wide."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    from mopeq.quantize.autoround import QuantConfig, quantize
    from mopeq.quantize.export import export

    def embedded_state():
        return {k: v.clone() for k, v in load_model("embedded").model.state_dict().items()}

    before = embedded_state()
    rules = repr(get_checkpoint_conversion_mapping("olmoe"))
    layout = discover(loaded.model)
    bits = np.full((2, 8), 4)
    result = quantize(loaded.model, layout, bits, QuantConfig(group_size=32),
                      tokenizer=loaded.processor)
    out = export(result, layout, tmp_path / "q", source="t", fingerprint="0",
                 bitmap_json={"bits": bits.tolist()}, processor=loaded.processor)
    assert load_model(str(out)).path == out
    after = embedded_state()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed  # the fused experts were left freshly initialised before the fix
    assert repr(get_checkpoint_conversion_mapping("olmoe")) == rules
