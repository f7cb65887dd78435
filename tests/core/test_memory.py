import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mopeq.core.errors import MopeqError
from mopeq.core.layout import (
    MoELayout,
    bitmap_array,
    deployable_fused,
)
from mopeq.core.memory import (
    BREAKDOWN,
    LayoutArrays,
    MemoryConfig,
    estimate,
    expert_cost_table,
    fixed_bits,
    quantizable,
    storage_bits,
)
from mopeq.model.moe import discover
from tests.helpers import synthetic_layout, tiny_lm


def reference_bits(layout: MoELayout, bits: np.ndarray, cfg: MemoryConfig) -> int:
    """Scalar re-implementation of the storage rules, one tensor at a time."""
    def one(out, inp, b):
        g = inp if cfg.group_size == -1 else cfg.group_size
        ok = out % 32 == 0 and inp % 32 == 0 and inp % g == 0 and b < 16
        return out * inp * b + out * math.ceil(inp / g) * (16 + b) if ok else out * inp * 16

    total = 0
    for e in layout.experts:
        row = layout.moe_layers.index(e.layer)
        total += sum(one(o, i, int(bits[row, e.expert])) for o, i in e.shapes.values())
    for t in layout.tensors:
        if t.linear and t.component in ("attention", "dense_mlp", "shared_experts", "other"):
            total += one(t.shape[0], t.shape[1], cfg.base_bits)
        else:
            total += t.numel * 16
    return total


def test_bits_per_weight_follow_the_auto_round_convention():
    for b, g in ((2, 128), (3, 64), (4, 32), (8, 128)):
        per_weight = storage_bits(256, 1024, b, g) / (256 * 1024)
        assert per_weight == pytest.approx(b + (16 + b) / g)
    assert storage_bits(256, 1024, 16, 128) == 256 * 1024 * 16
    assert storage_bits(256, 1024, 4, -1) == 256 * 1024 * 4 + 256 * 20  # one group per row


def test_unquantizable_shapes_stay_16_bit():
    assert not quantizable(64, 96, 128)  # in not divisible by the group size
    assert not quantizable(24, 128, 128)  # auto-round: a dim not a multiple of 32
    assert quantizable(64, 256, 128)
    assert storage_bits(64, 96, 2, 128) == 64 * 96 * 16
    np.testing.assert_array_equal(quantizable(np.array([64, 24]), np.array([128, 128]), 64),
                                  [True, False])


def test_estimate_matches_a_scalar_reference_on_a_synthetic_layout():
    layout = synthetic_layout()
    bits = np.array([[2, 3, 4, 16], [4, 4, 2, 3]])
    for cfg in (MemoryConfig(group_size=32), MemoryConfig(group_size=64, base_bits=8),
                MemoryConfig(group_size=-1, base_bits=16)):
        est = estimate(layout, bits, cfg)
        ref = reference_bits(layout, bits, cfg)
        assert est.total_bytes == math.ceil(ref / 8)
        assert est.bf16_bytes == 2 * layout.params()["total"]
        assert est.ratio == pytest.approx(est.bf16_bytes / est.total_bytes)
        assert est.gb == pytest.approx(est.total_bytes / 1e9)
        assert est.gib == pytest.approx(est.total_bytes / 2**30)
        assert sum(est.breakdown.values()) == pytest.approx(est.total_bytes, abs=len(BREAKDOWN))


def test_components_take_their_documented_widths():
    layout = synthetic_layout()
    est = estimate(layout, np.full((2, 4), 4), MemoryConfig(group_size=32, base_bits=4))
    b = est.breakdown
    assert b["vision"] == 64 * 64 * 2  # vision tower stays 16-bit
    assert b["router"] == 4 * 64 * 2  # router stays 16-bit even though it is a linear
    assert b["embeddings_lm_head"] == 2 * 256 * 64 * 2
    assert b["shared_experts"] == (64 * 64 * 4 + 64 * 2 * 20) // 8  # base bits, group 32
    assert b["attention"] == (64 * 64 * 4 + 64 * 2 * 20) // 8 + 96 * 16 * 2  # kv_b: in=16
    assert b["other"] == (64 * 128 * 4 + 64 * 4 * 20) // 8 + 64 * 2  # other linear + a norm
    assert est.kept_16bit == 1 and est.kept_16bit_params == 96 * 16
    assert set(b) == set(BREAKDOWN)


def test_average_bits_count_scales_and_zero_points():
    layout = synthetic_layout(tensors=())
    est = estimate(layout, np.full((2, 4), 4), MemoryConfig(group_size=32))
    assert est.avg_bits_quantized == pytest.approx(4 + 20 / 32)
    assert est.avg_bits_all == pytest.approx(4 + 20 / 32)
    half = estimate(layout, np.array([[4] * 4, [16] * 4]), MemoryConfig(group_size=32))
    assert half.avg_bits_quantized == pytest.approx(4 + 20 / 32)
    assert half.avg_bits_all == pytest.approx((4 + 20 / 32 + 16) / 2)
    assert half.quantized_params * 2 == half.total_params


def test_by_layer_moves_only_with_that_layer():
    layout = synthetic_layout()
    cfg = MemoryConfig(group_size=32)
    low = estimate(layout, np.full((2, 4), 2), cfg)
    up = estimate(layout, np.array([[2] * 4, [4] * 4]), cfg)
    assert up.by_layer[0] == low.by_layer[0] and up.by_layer[1] > low.by_layer[1]
    assert sum(up.by_layer) == up.breakdown["routed_experts"]
    assert up.total_bytes - low.total_bytes == up.by_layer[1] - low.by_layer[1]


def test_all_16_bit_equals_bf16():
    layout = discover(tiny_lm("deepseek_v2").to(torch.bfloat16))
    est = estimate(layout, np.full((1, 8), 16), MemoryConfig(base_bits=16))
    assert est.total_bytes == est.bf16_bytes and est.ratio == 1.0


def test_unquantized_tensors_count_at_their_stored_dtype(tmp_path):
    """DeepSeek-V2 keeps its router fp32 in a bf16 model: the estimate counts it at 32 bits."""
    import transformers as T

    tiny_lm("deepseek_v2").save_pretrained(tmp_path)
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    layout = discover(model)
    router = [t for t in layout.tensors if t.component == "router"]
    assert router and all(t.dtype == "float32" for t in router)
    assert {t.dtype for t in layout.tensors if t.component != "router"} == {"bfloat16"}
    est = estimate(layout, np.full((1, 8), 16), MemoryConfig(base_bits=16))
    assert est.total_bytes == est.bf16_bytes + 2 * sum(t.numel for t in router)
    fp32 = estimate(discover(tiny_lm("deepseek_v2")), np.full((1, 8), 16),
                    MemoryConfig(base_bits=16))
    assert fp32.total_bytes == 2 * fp32.bf16_bytes  # an fp32 model is stored in fp32
    assert est.quantized_params == 0 and est.avg_bits_quantized == 16.0


def test_discovered_layout_keeps_non_divisible_experts_16_bit():
    layout = discover(tiny_lm("deepseek_v2").to(torch.bfloat16))  # hidden 64, FFN 32
    numel = sum(e.numel for e in layout.experts)
    est128 = estimate(layout, np.full((1, 8), 2), MemoryConfig(group_size=128))
    assert est128.breakdown["routed_experts"] == 2 * numel
    assert est128.kept_16bit >= 3 * 8
    est32 = estimate(layout, np.full((1, 8), 2), MemoryConfig(group_size=32))
    assert est32.breakdown["routed_experts"] == numel * (2 + 18 / 32) / 8
    assert est32.total_bytes == math.ceil(reference_bits(layout, np.full((1, 8), 2),
                                                         MemoryConfig(group_size=32)) / 8)


def test_cost_table_and_fixed_bits_add_up_to_the_estimate():
    layout = synthetic_layout()
    cfg = MemoryConfig(group_size=32)
    table = expert_cost_table(layout, (2, 3, 4), cfg)
    assert table.shape == (2, 4, 3) and (np.diff(table, axis=-1) > 0).all()
    est = estimate(layout, np.full((2, 4), 3), cfg)
    assert est.total_bytes == math.ceil((table[..., 1].sum() + fixed_bits(layout, cfg)) / 8)


def test_layout_arrays_are_memoised_per_layout_object():
    layout = synthetic_layout()
    assert LayoutArrays.of(layout) is LayoutArrays.of(layout)
    twin = MoELayout.loads(layout.dumps())
    assert LayoutArrays.of(twin) is not LayoutArrays.of(layout)
    np.testing.assert_array_equal(LayoutArrays.of(twin).out, LayoutArrays.of(layout).out)
    with pytest.raises(ValueError):
        LayoutArrays.of(layout).out[0, 0, 0] = 1


def test_bad_inputs_raise_clear_errors():
    layout = synthetic_layout()
    with pytest.raises(MopeqError, match="another model"):
        estimate(layout, np.full((3, 4), 4))
    with pytest.raises(ValueError, match="group_size"):
        MemoryConfig(group_size=0)
    with pytest.raises(ValueError, match="base_bits"):
        MemoryConfig(base_bits=17)


def test_to_json_is_json_ready():
    est = estimate(synthetic_layout(), np.full((2, 4), 3), MemoryConfig(group_size=32))
    d = json.loads(json.dumps(est.to_json()))
    for key in ("total_bytes", "bf16_bytes", "ratio", "avg_bits_quantized", "breakdown",
                "by_layer", "kept_16bit"):
        assert key in d
    assert d["config"]["group_size"] == 32


@pytest.mark.slow
def test_deepseek_v3_scale_numbers():
    import transformers as T

    from mopeq.model.moe import layout_from_config

    cfg = T.DeepseekV3Config(hidden_size=7168, moe_intermediate_size=2048,
                             intermediate_size=18432, n_routed_experts=256, n_shared_experts=1,
                             num_hidden_layers=61, first_k_dense_replace=3, vocab_size=129280)
    layout = layout_from_config(cfg)
    est = estimate(layout, np.full((58, 256), 4), MemoryConfig())
    assert est.total_params == 671_026_404_352
    assert est.avg_bits_experts == pytest.approx(4 + 20 / 128)
    assert 340e9 < est.total_bytes < 360e9


def test_numeric_core_imports_no_torch():
    """The layout, memory, method table and allocation math load without torch."""
    code = ("import sys; import mopeq.core.layout, mopeq.core.memory, mopeq.core.methods, "
            "mopeq.allocation.allocate; print(sorted(m for m in sys.modules "
            "if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]", out.stdout


def test_bitmap_shape_check_and_fused_deployability():
    layout = synthetic_layout()
    shape = (layout.num_moe_layers, layout.num_experts)
    bits = np.full(shape, 4)
    assert bitmap_array(bits, layout) is not None and deployable_fused(bits)
    bits[0, 1] = 2
    assert not deployable_fused(bits)
    with pytest.raises(MopeqError, match="scores has shape"):
        bitmap_array(np.zeros((shape[0], shape[1] + 1)), layout, "scores")
