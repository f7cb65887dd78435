"""Per-expert quantization with auto-round: names, bits applied, export, recipe, bad input."""

import json

import numpy as np
import pytest
import torch

from mopeq.embedded import synthetic, tiny
from mopeq.evaluation.adapters import TinyVLMAdapter
from mopeq.evaluation.evaluate import evaluate_samples
from mopeq.model.loading import fingerprint_model, load_model
from mopeq.model.moe import discover
from mopeq.quantize.autoround import QuantConfig, check_bitmap, layer_config, quantize
from mopeq.quantize.export import export
from mopeq.quantize.snippets import gptq_dynamic
from tests.helpers import list_moe_from_fused, tiny_lm

CFG = QuantConfig(group_size=32)


def mixed_bits(layout):
    pattern = np.array([2, 3, 4, 16, 8, 2, 3, 4])
    return np.stack([np.roll(pattern, r) for r in range(layout.num_moe_layers)])


@pytest.fixture(scope="module")
def tiny_vlm():
    model, processor = tiny.new_model(
        tiny.TinyRecipe(hidden_size=64, expert_ffn=64, num_experts=8, language_model="deepseek_v2"))
    return model, processor, discover(model)


@pytest.fixture(scope="module")
def quantized_vlm(tiny_vlm):
    model, processor, layout = tiny_vlm
    bits = mixed_bits(layout)
    return quantize(model, layout, bits, CFG, tokenizer=processor.tokenizer), bits


def test_layer_config_covers_every_expert_and_nothing_else(tiny_vlm):
    model, _, layout = tiny_vlm
    cfg = layer_config(layout, mixed_bits(layout), CFG, prefix="language_model.")
    experts = {n for n in cfg if ".experts." in n}
    assert len(experts) == 3 * layout.num_moe_layers * layout.num_experts
    assert experts == {e.modules[p].removeprefix("language_model.")
                       for e in layout.experts for p in ("gate", "up", "down")}
    assert not any(n.startswith(("vision_tower", "projector")) for n in cfg)
    assert cfg["model.layers.1.mlp.experts.3.down_proj"]["bits"] == 16
    assert cfg["model.layers.1.mlp.experts.0.gate_proj"]["bits"] == 2
    assert cfg["model.layers.0.self_attn.q_proj"]["bits"] == CFG.base_bits
    assert cfg["model.layers.1.mlp.shared_experts.up_proj"]["bits"] == CFG.base_bits
    assert cfg["lm_head"]["bits"] == 16  # stays 16-bit
    assert cfg["model.layers.0.self_attn.kv_a_proj_with_mqa"]["bits"] == 16  # 48 rows: unpackable


def test_bits_applied_equal_bits_requested_fused(quantized_vlm, tiny_vlm):
    result, bits = quantized_vlm
    _, _, layout = tiny_vlm
    assert result.levels_ok
    root = result.model.language_model
    for info in layout.experts[::5]:
        b = bits[layout.moe_layers.index(info.layer), info.expert]
        w = root.get_submodule(info.modules["gate"].removeprefix("language_model.")).weight
        groups = w.detach().float().reshape(-1, 32)
        levels = max(len(torch.unique(g)) for g in groups)
        if b < 16:
            assert levels <= 2**b
        assert levels > 2 ** min(b - 1, 4)  # really used the bits (random weights span them)


def test_baseline_is_not_modified(tiny_vlm, quantized_vlm):
    model, _, layout = tiny_vlm
    assert model.language_model.model.layers[1].mlp.experts.gate_up_proj.dim() == 3
    assert quantized_vlm[0].model is not model


def test_module_list_experts_get_their_bits():
    model = list_moe_from_fused(tiny_lm("olmoe"))
    layout = discover(model)
    bits = mixed_bits(layout)
    tok = tiny.build_tokenizer()
    result = quantize(model, layout, bits, CFG, tokenizer=tok)
    assert result.levels_ok
    w = result.model.get_submodule(layout.expert(0, 0).modules["up"]).weight
    assert max(len(torch.unique(g)) for g in w.detach().reshape(-1, 32)) <= 4  # 2 bits


def test_export_reloads_generates_and_keeps_bits(quantized_vlm, tiny_vlm, tmp_path):
    model, processor, layout = tiny_vlm
    result, bits = quantized_vlm
    out = export(result, layout, tmp_path / "q", source="test", fingerprint="f" * 64,
                 bitmap_json={"bits": bits.tolist(), "method": "test"}, processor=processor)
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["modules"] == result.layer_config
    assert recipe["allocation"]["bits"] == bits.tolist()
    assert recipe["deployable_fused"] is False
    assert not (out / "llama_cpp_tensor_types.txt").exists()
    qcfg = json.loads((out / "language_model" / "config.json").read_text())["quantization_config"]
    assert qcfg["extra_config"]["model.layers.1.mlp.experts.0.gate_proj"]["bits"] == 2
    loaded = load_model(str(out))
    samples = synthetic.eval_split(2)
    a = evaluate_samples(TinyVLMAdapter(result.model, processor), samples)
    b = evaluate_samples(TinyVLMAdapter(loaded.model, processor), samples)
    pa = np.array([r["probs"] for r in a.records])
    pb = np.array([r["probs"] for r in b.records])
    np.testing.assert_allclose(pa, pb, atol=2e-2)


def test_per_layer_map_gets_llama_cpp_lines(tiny_vlm, tmp_path):
    model, processor, layout = tiny_vlm
    bits = np.array([[2] * 8, [3] * 8, [4] * 8])
    result = quantize(model, layout, bits, CFG, tokenizer=processor.tokenizer)
    out = export(result, layout, tmp_path / "snap", source="t", fingerprint="0",
                 bitmap_json={"bits": bits.tolist()}, processor=processor)
    lines = (out / "llama_cpp_tensor_types.txt").read_text()
    assert "--tensor-type blk.1.ffn_gate_exps=q2_K" in lines
    assert "--tensor-type blk.3.ffn_down_exps=q4_K" in lines


def test_gptq_dynamic_rules():
    mods = {"a.experts.0.up_proj": {"bits": 4, "group_size": 32},
            "a.experts.1.up_proj": {"bits": 2, "group_size": 32},
            "lm_head": {"bits": 16, "group_size": 32}}
    rules = gptq_dynamic(mods)
    assert rules == {r"+:a\.experts\.1\.up_proj$": {"bits": 2, "group_size": 32},
                     r"-:lm_head$": {}}


def test_bad_bitmaps_are_clear_errors(tiny_vlm):
    _, _, layout = tiny_vlm
    with pytest.raises(ValueError, match="another model"):
        check_bitmap(layout, np.full((2, 8), 4))
    with pytest.raises(ValueError, match="unsupported bit widths \\[5\\]"):
        check_bitmap(layout, np.full((3, 8), 5))
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantConfig(group_size=48)


def test_failed_export_leaves_nothing(quantized_vlm, tiny_vlm, tmp_path):
    _, processor, layout = tiny_vlm
    result, bits = quantized_vlm
    with pytest.raises(KeyError):
        export(result, layout, tmp_path / "bad", source="t", fingerprint="0",
               bitmap_json={"no_bits": 1}, processor=processor)
    assert not (tmp_path / "bad").exists()
    assert list(tmp_path.iterdir()) == []


def test_fingerprint_of_quantized_differs(tiny_vlm, quantized_vlm):
    assert fingerprint_model(quantized_vlm[0].model) != fingerprint_model(tiny_vlm[0])


def test_memory_estimate_matches_exported_checkpoint(quantized_vlm, tiny_vlm, tmp_path):
    """The estimate of the quantized linears equals their packed size on disk within 1 %."""
    from safetensors import safe_open

    from mopeq.core.memory import MemoryConfig, estimate

    _, processor, layout = tiny_vlm
    result, bits = quantized_vlm
    out = export(result, layout, tmp_path / "m", source="t", fingerprint="0",
                 bitmap_json={"bits": bits.tolist()}, processor=processor)
    est = estimate(layout, bits, MemoryConfig(group_size=32, base_bits=CFG.base_bits))
    on_disk = {}
    with safe_open(str(out / "language_model" / "model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            on_disk[key] = t.numel() * t.element_size()
    packed = sum(n for k, n in on_disk.items() if k.rsplit(".", 1)[-1] in ("qweight", "qzeros",
                                                                              "scales"))
    quantized_modules = {k.rsplit(".", 1)[0] for k in on_disk if k.endswith(".qweight")}
    assert quantized_modules == {n for n, c in result.layer_config.items() if c["bits"] < 16}
    expected_bits = sum(
        est_bits for name, est_bits in _quantized_bits(layout, result.layer_config).items())
    assert abs(packed - expected_bits / 8) / packed < 0.01
    # and the whole estimate agrees with everything stored (16-bit parts of the VLM included)
    rest = (out / "rest.safetensors").stat().st_size
    total = sum(on_disk.values()) + rest
    assert abs(est.total_bytes - total) / total < 0.01


def _quantized_bits(layout, cfg):
    from mopeq.core.memory import storage_bits

    shapes = {e.modules[p].removeprefix("language_model."): e.shapes[p]
              for e in layout.experts for p in e.shapes}
    shapes.update({t.name.removeprefix("language_model.").removesuffix(".weight"): t.shape
                   for t in layout.tensors if t.linear})
    return {n: int(storage_bits(*shapes[n], c["bits"], c["group_size"]))
            for n, c in cfg.items() if c["bits"] < 16}


def test_autoscheme_peer_meets_the_average_bits(tiny_vlm):
    """auto-round's AutoScheme, offline, on local calibration texts, at an expert average."""
    from mopeq.model.loading import LoadedModel
    from mopeq.quantize.autoround import autoscheme
    from mopeq.workflow.workspace import calibration_texts

    model, processor, layout = tiny_vlm
    loaded = LoadedModel(model, processor, "f", "t", "tiny_vlm")
    bits, result = autoscheme(model, layout, 3.0, CFG, processor, calibration_texts(loaded, 8))
    assert bits.shape == (layout.num_moe_layers, layout.num_experts)
    assert set(np.unique(bits)) <= {2, 3, 4}
    assert 2.0 <= bits.mean() <= 4.0
    assert result.model is not model
    name = layout.expert(0, 0).modules["gate"].removeprefix("language_model.")
    w = result.model.language_model.get_submodule(name).weight.detach()
    assert max(len(torch.unique(g)) for g in w.reshape(-1, 32)) <= 2 ** int(bits[0, 0])
