"""MoE discovery across architectures, the expert accessor, names after auto-round unfusing."""

import pytest
import torch
from torch import nn

from mopeq.model.moe import NotMoEError, discover, expert_weights, layout_from_config
from tests.helpers import ALL_CONFIGS, TRANSPOSED_CONFIGS, list_moe_from_fused, tiny_model

EXPECTED = {  # (MoE layers, experts, top-k, shared experts) from the configs in tests/helpers
    "olmoe": (2, 8, 2, 0), "deepseek_v2": (1, 8, 2, 1), "qwen2_moe": (2, 8, 2, 1),
    "qwen3_moe": (2, 8, 2, 0), "mixtral": (2, 8, 2, 0), "qwen3_vl_moe": (2, 8, 2, 0),
    "glm4v_moe": (1, 8, 2, 1), "llama4_text": (2, 8, 1, 1), "aria_text": (2, 8, 2, 1),
}


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_counts_match_config(name):
    model = tiny_model(name)
    layout = discover(model)
    assert (layout.num_moe_layers, layout.num_experts, layout.top_k,
            layout.num_shared_experts) == EXPECTED[name]
    assert len(layout.experts) == layout.num_moe_layers * layout.num_experts
    params = layout.params()
    assert params["total"] == sum(p.numel() for p in model.parameters())
    fused = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert params["routed_experts"] == fused
    if name in ("qwen3_vl_moe", "glm4v_moe"):
        assert params["vision"] > 0
    if EXPECTED[name][3]:
        assert params["shared_experts"] > 0


@pytest.mark.parametrize("name", list(ALL_CONFIGS))
def test_accessor_matches_forward_math(name):
    """The three matrices reproduce the expert's output: down(silu(gate x) * up x)."""
    model = tiny_model(name)
    layout = discover(model)
    row, e = layout.num_moe_layers - 1, 3
    w = expert_weights(model, layout, row, e)
    info = layout.expert(row, e)
    assert {p: tuple(t.shape) for p, t in w.items()} == info.shapes
    block = model.get_submodule(layout.blocks[row].experts_path)
    gu, dn = block.gate_up_proj[e], block.down_proj[e]
    if name in TRANSPOSED_CONFIGS:
        gu, dn = gu.t(), dn.t()
    torch.testing.assert_close(torch.cat([w["gate"], w["up"]]), gu)
    torch.testing.assert_close(w["down"], dn)
    assert w["gate"].untyped_storage().data_ptr() == block.gate_up_proj.untyped_storage().data_ptr()


def test_module_list_layout_equals_fused():
    fused = tiny_model("olmoe")
    ref = discover(fused)
    ref_w = expert_weights(fused, ref, 1, 5)
    listed = list_moe_from_fused(tiny_model("olmoe"))
    layout = discover(listed)
    assert not layout.blocks[0].fused and ref.blocks[0].fused
    assert [e.modules for e in layout.experts] == [e.modules for e in ref.experts]
    assert layout.params() == ref.params()
    w = expert_weights(listed, layout, 1, 5)
    for p in ("gate", "up", "down"):
        torch.testing.assert_close(w[p], ref_w[p])
        assert w[p] is listed.get_submodule(layout.expert(1, 5).modules[p]).weight


@pytest.mark.parametrize("name", ["olmoe", "deepseek_v2", "qwen2_moe", "mixtral", "qwen3_moe"])
def test_names_match_auto_round_unfusing(name):
    from auto_round.modeling.fused_moe.replace_modules import apply_replacements

    model = tiny_model(name)
    layout = discover(model)
    apply_replacements(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    for e in layout.experts:
        for p, module_name in e.modules.items():
            assert module_name in linears, module_name
            mod = linears[module_name]
            assert (mod.out_features, mod.in_features) == e.shapes[p]
    unfused = {n for n in linears if ".experts." in n}
    assert unfused == {n for e in layout.experts for n in e.modules.values()}


def test_unfused_weights_equal_accessor():
    from auto_round.modeling.fused_moe.replace_modules import apply_replacements

    model = tiny_model("deepseek_v2")
    layout = discover(model)
    before = {p: t.clone() for p, t in expert_weights(model, layout, 0, 2).items()}
    apply_replacements(model)
    for p, t in before.items():
        torch.testing.assert_close(model.get_submodule(layout.expert(0, 2).modules[p]).weight, t)


def test_non_moe_model_raises_clear_error():
    import transformers as T

    model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             num_key_value_heads=2, vocab_size=64))
    with pytest.raises(NotMoEError, match="no MoE layer found.*llama.*ARCHS"):
        discover(model)


def test_layout_from_config_needs_no_weights():
    model = tiny_model("deepseek_v2")
    layout = layout_from_config(model.config)
    assert layout.to_json() == discover(model).to_json()


def test_layout_round_trips_json():
    from mopeq.core.layout import MoELayout

    layout = discover(tiny_model("qwen2_moe"))
    assert MoELayout.loads(layout.dumps()) == layout


def test_embedded_olmoe_architecture_is_found():
    from mopeq.embedded import tiny

    model, _ = tiny.new_model(tiny.TinyRecipe(hidden_size=64, expert_ffn=64))
    layout = discover(model)
    assert layout.moe_layers == [0, 1, 2, 3] and layout.num_shared_experts == 0
    n = tiny.TinyRecipe().num_experts
    name = "language_model.model.layers.1.mlp.experts.1.down_proj"
    assert layout.experts[n + 1].modules["down"] == name
    assert layout.params()["total"] == sum(p.numel() for p in model.parameters())


def test_embedded_deepseek_architecture_is_found():
    from mopeq.embedded import tiny

    model, _ = tiny.new_model(
        tiny.TinyRecipe(hidden_size=64, expert_ffn=64, num_experts=8, language_model="deepseek_v2"))
    layout = discover(model)
    assert layout.model_type == "mopeq_tiny_vlm"
    assert layout.moe_layers == [1, 2, 3] and layout.num_experts == 8 and layout.top_k == 2
    assert layout.experts[0].modules["up"] == "language_model.model.layers.1.mlp.experts.0.up_proj"
    params = layout.params()
    assert params["vision"] > 0 and params["dense_mlp"] > 0 and params["shared_experts"] > 0
    assert params["total"] == sum(p.numel() for p in model.parameters())
