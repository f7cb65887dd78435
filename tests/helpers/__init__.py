"""Shared test builders: tiny random-weight MoE models from configs (2 layers, 8 experts,
hidden 64), hand-built layouts, and (submodules) MolmoE / DeepSeek-VL2 hub-layout checkpoints."""

from __future__ import annotations

import torch
import transformers as T
from torch import nn

from mopeq.core.layout import ExpertInfo, MoEBlock, MoELayout, TensorInfo

COMMON = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=128, max_position_embeddings=64,
              pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="eager")

CONFIGS = {
    "olmoe": lambda: (T.OlmoeForCausalLM,
                      T.OlmoeConfig(**COMMON, num_experts=8, num_experts_per_tok=2)),
    "deepseek_v2": lambda: (T.DeepseekV2ForCausalLM, T.DeepseekV2Config(
        **COMMON, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16)),
    "qwen2_moe": lambda: (T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig(
        **COMMON, moe_intermediate_size=32, shared_expert_intermediate_size=64, num_experts=8,
        num_experts_per_tok=2)),
    "qwen3_moe": lambda: (T.Qwen3MoeForCausalLM, T.Qwen3MoeConfig(
        **COMMON, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, head_dim=16)),
    "mixtral": lambda: (T.MixtralForCausalLM,
                        T.MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2)),
}
LM_ARCHS = tuple(CONFIGS)


def tiny_lm(name: str, seed: int = 0) -> nn.Module:
    """A tiny random-weight MoE causal LM of the named architecture."""
    cls, config = CONFIGS[name]()
    torch.manual_seed(seed)
    return cls(config).eval()


class ListExpert(nn.Module):
    """One expert as remote-code models keep it (DeepSeek-VL2, MolmoE)."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class ListMoE(nn.Module):
    """A top-k MoE block whose experts are an nn.ModuleList."""

    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(ListExpert(hidden, inter) for _ in range(num_experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        probs = self.gate(flat).softmax(-1)
        w, idx = probs.topk(self.top_k, -1)
        out = torch.zeros_like(flat)
        for k in range(self.top_k):
            for e, expert in enumerate(self.experts):
                sel = idx[:, k] == e
                if sel.any():
                    out[sel] += w[sel, k, None] * expert(flat[sel])
        return out.view_as(x)


def list_moe_from_fused(model: nn.Module) -> nn.Module:
    """Replace each fused ``mlp`` of an OLMoE/Mixtral-style model by an equal ``ListMoE``."""
    for layer in model.model.layers:
        fused = layer.mlp
        e, two_i, h = fused.experts.gate_up_proj.shape
        block = ListMoE(h, two_i // 2, e, fused.gate.top_k)
        block.gate.weight.data.copy_(fused.gate.weight.data)
        for j, ex in enumerate(block.experts):
            gu = fused.experts.gate_up_proj.data[j]
            ex.gate_proj.weight.data.copy_(gu[: two_i // 2])
            ex.up_proj.weight.data.copy_(gu[two_i // 2 :])
            ex.down_proj.weight.data.copy_(fused.experts.down_proj.data[j])
        layer.mlp = block
    return model


def _vision(**extra):
    return dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                patch_size=8, spatial_merge_size=2, temporal_patch_size=2, **extra)


VLM_CONFIGS = {
    "qwen3_vl_moe": lambda: (T.Qwen3VLMoeForConditionalGeneration, T.Qwen3VLMoeConfig(
        text_config=dict(COMMON, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                         head_dim=16, rope_scaling={"rope_type": "default",
                                                    "mrope_section": [2, 3, 3]}),
        vision_config=_vision(deepstack_visual_indexes=[0]))),
    "glm4v_moe": lambda: (T.Glm4vMoeForConditionalGeneration, T.Glm4vMoeConfig(
        text_config=dict(COMMON, moe_intermediate_size=32, n_routed_experts=8,
                         n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                         head_dim=16),
        vision_config=_vision())),
}
# Aria and Llama4 keep fused experts transposed: [E, H, 2I] and [E, I, H].
TRANSPOSED_CONFIGS = {
    "llama4_text": lambda: (T.Llama4ForCausalLM, T.Llama4TextConfig(
        **{**COMMON, "intermediate_size": 32}, intermediate_size_mlp=128, head_dim=16,
        num_local_experts=8, num_experts_per_tok=1, interleave_moe_layer_step=1)),
    "aria_text": lambda: (T.AriaTextForCausalLM, T.AriaTextConfig(
        **{**COMMON, "intermediate_size": 32}, moe_num_experts=8, moe_topk=2,
        moe_num_shared_experts=1)),
}
ALL_CONFIGS = {**CONFIGS, **VLM_CONFIGS, **TRANSPOSED_CONFIGS}


def tiny_model(name: str, seed: int = 0) -> nn.Module:
    """A tiny random-weight model of any architecture in ``ALL_CONFIGS``."""
    cls, config = ALL_CONFIGS[name]()
    torch.manual_seed(seed)
    return cls(config).eval()


# ----------------------------------------------------------- hand-built layouts (no model)

EXTRA_TENSORS = (
    TensorInfo("model.embed_tokens.weight", (256, 64), "embeddings", False),
    TensorInfo("model.layers.0.self_attn.q_proj.weight", (64, 64), "attention", True),
    TensorInfo("model.layers.0.self_attn.kv_b_proj.weight", (96, 16), "attention", True),
    TensorInfo("model.layers.0.mlp.gate.weight", (4, 64), "router", True),
    TensorInfo("model.layers.0.mlp.shared_experts.up_proj.weight", (64, 64), "shared_experts",
               True),
    TensorInfo("model.layers.0.input_layernorm.weight", (64,), "norm", False),
    TensorInfo("visual.proj.weight", (64, 64), "vision", True),
    TensorInfo("mtp.proj.weight", (64, 128), "other", True),
    TensorInfo("lm_head.weight", (256, 64), "lm_head", True),
)


def synthetic_layout(layers: int = 2, experts: int = 4, hidden: int = 64, inter: int = 32,
                     tensors: tuple[TensorInfo, ...] = EXTRA_TENSORS) -> MoELayout:
    """A hand-built layout (no model): every expert [inter x hidden] gate/up, [hidden x inter]."""
    shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
    blocks = tuple(MoEBlock(layer=r, path=f"model.layers.{r}.mlp",
                            experts_path=f"model.layers.{r}.mlp.experts", router_path=None,
                            shared_path=None, fused=True, transposed=False, num_experts=experts)
                   for r in range(layers))
    ex = tuple(ExpertInfo(r, e, {p: f"model.layers.{r}.mlp.experts.{e}.{p}_proj" for p in shapes},
                          dict(shapes)) for r in range(layers) for e in range(experts))
    return MoELayout("synthetic", blocks, ex, tensors, top_k=2)
