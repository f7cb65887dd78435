"""DeepSeek-VL2's ``config.json`` and the transformers configs built from it.

The hub config nests ``vision_config`` (timm-style SigLIP keys), ``projector_config`` and
``language_config`` (the authors' ``DeepseekV2Config`` keys). Keys missing from a hub file take the
authors' defaults, which differ from transformers' (e.g. ``norm_topk_prob``,
``routed_scaling_factor``).
The language model maps to:

- ``use_mla: false`` (tiny): ``DeepseekV2ForCausalLM`` with plain multi-head attention layers;
- softmax routing (``greedy`` / ``group_limited_greedy``, small): ``DeepseekV2ForCausalLM``;
- ``topk_method: noaux_tc`` with ``scoring_func: sigmoid`` (base): ``DeepseekV3ForCausalLM``, whose
  router adds ``e_score_correction_bias`` for the choice and weights by the plain sigmoid scores.
"""

from __future__ import annotations

import copy
import json

from mopeq.core.errors import MopeqError

# The authors' DeepseekV2Config defaults for the keys that matter here (their configuration file).
LANGUAGE_DEFAULTS = {
    "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008,
    "moe_intermediate_size": 1407, "num_hidden_layers": 30, "num_attention_heads": 32,
    "num_key_value_heads": 32, "n_shared_experts": None, "n_routed_experts": None,
    "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": 1536,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "greedy",
    "n_group": None, "topk_group": None, "num_experts_per_tok": None, "moe_layer_freq": 1,
    "first_k_dense_replace": 0, "norm_topk_prob": False, "scoring_func": "softmax",
    "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
    "bos_token_id": 100000, "eos_token_id": 100001, "pad_token_id": None,
    "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None,
    "attention_bias": False, "use_mla": True,
}
VISION_DEFAULTS = {"image_size": 384, "patch_size": 16, "width": 1024, "layers": 24, "heads": 16,
                   "mlp_ratio": 4, "global_pool": "map", "ignore_head": True, "class_token": False}
PROJECTOR_DEFAULTS = {"projector_type": "downsample_mlp_gelu", "input_dim": 1152, "n_embed": 2048,
                      "depth": 2, "mlp_ratio": 1, "downsample_ratio": 2, "token_pooling": False}
TOP_DEFAULTS = {"tile_tag": "2D", "global_view_pos": "head", "candidate_resolutions": [[384, 384]]}
# keys passed to transformers' DeepSeek configs unchanged
_SHARED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "n_shared_experts", "n_routed_experts", "routed_scaling_factor",
                "num_experts_per_tok", "first_k_dense_replace", "norm_topk_prob", "hidden_act",
                "max_position_embeddings", "rms_norm_eps", "bos_token_id", "eos_token_id",
                "pad_token_id", "tie_word_embeddings", "attention_bias", "n_group", "topk_group")


class DeepseekVL2Config:
    """The model's configuration: the hub ``config.json`` and the configs derived from it.

    Attributes:
        raw: the hub config as read (written back unchanged by ``to_dict``).
        language_config: transformers ``DeepseekV2Config`` or ``DeepseekV3Config``.
        vision_config: transformers ``SiglipVisionConfig``.
        projector: the projector settings (authors' defaults filled in).
        tile_tag, global_view_pos, candidate_resolutions: image-token layout settings.
    """

    model_type = "deepseek_vl_v2"

    def __init__(self, raw: dict):
        self.raw = copy.deepcopy(raw)
        top = {**TOP_DEFAULTS, **raw}
        if top["tile_tag"] != "2D":
            raise MopeqError(f"tile_tag {top['tile_tag']!r} is not supported (the released "
                             "DeepSeek-VL2 checkpoints use '2D')")
        self.tile_tag, self.global_view_pos = top["tile_tag"], top["global_view_pos"]
        self.candidate_resolutions = [tuple(r) for r in top["candidate_resolutions"]]
        self.projector = {**PROJECTOR_DEFAULTS, **raw.get("projector_config", {})}
        if self.projector["projector_type"] != "downsample_mlp_gelu" or self.projector[
                "token_pooling"]:
            raise MopeqError("only the 'downsample_mlp_gelu' projector of the released "
                             f"checkpoints is supported, got {self.projector}")
        self.vision_config = siglip_config(raw.get("vision_config", {}))
        self.language_config = language_config(raw.get("language_config", {}))

    @property
    def use_mla(self) -> bool:
        """Multi-head latent attention (small, base) or plain multi-head attention (tiny)."""
        return bool(getattr(self.language_config, "use_mla", True))

    def to_dict(self) -> dict:
        """The hub config (what ``config.json`` holds)."""
        return copy.deepcopy(self.raw)

    def to_json_string(self, use_diff: bool = False) -> str:
        """JSON of ``to_dict`` (sorted keys, so it fingerprints stably)."""
        del use_diff  # there is no default config to diff against
        return json.dumps(self.raw, sort_keys=True)


def siglip_config(vision: dict):
    """Transformers ``SiglipVisionConfig`` for the timm-style ``vision_config``.

    The authors' ViT: LayerNorm eps 1e-6, tanh-GELU, fused-qkv attention with biases,
    MLP width ``int(width * mlp_ratio)``, no class token, final LayerNorm, and an unused
    attention-pool head (kept so that every checkpoint tensor has a place).
    """
    from transformers import SiglipVisionConfig

    v = {**VISION_DEFAULTS, **vision}
    if v["class_token"] or v["global_pool"] != "map" or not v["ignore_head"]:
        raise MopeqError(f"unsupported vision_config {vision}: the released checkpoints use no "
                         "class token and an ignored 'map' head")
    return SiglipVisionConfig(
        hidden_size=v["width"], intermediate_size=int(v["width"] * v["mlp_ratio"]),
        num_hidden_layers=v["layers"], num_attention_heads=v["heads"], image_size=v["image_size"],
        patch_size=v["patch_size"], hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
        vision_use_head=True)


def language_config(language: dict):
    """Transformers config of the language model (see the module docstring for the mapping).

    Raises:
        MopeqError: for routing or layer patterns that transformers' classes cannot express.
    """
    from transformers import DeepseekV2Config, DeepseekV3Config

    c = {**LANGUAGE_DEFAULTS, **language}
    _check_language(c)
    common = {k: c[k] for k in _SHARED_KEYS}
    common["rope_theta"] = c["rope_theta"]
    if c["rope_scaling"] is not None:
        scaling = dict(c["rope_scaling"])
        common["rope_scaling"] = {"rope_type": scaling.pop("type", "default"), **scaling}
    common.update(_attention_dims(c))
    if c["topk_method"] == "noaux_tc":
        return DeepseekV3Config(**common, rope_interleave=True, use_mla=True,
                                topk_method="noaux_tc", scoring_func="sigmoid")
    return DeepseekV2Config(**common, topk_method=c["topk_method"], use_mla=bool(c["use_mla"]),
                            scoring_func="softmax")


def _check_language(c: dict) -> None:
    problems = []
    if c["moe_layer_freq"] != 1:
        problems.append(f"moe_layer_freq={c['moe_layer_freq']} (transformers: every layer "
                        "after first_k_dense_replace is MoE)")
    if not c["n_routed_experts"] or not c["n_shared_experts"]:
        problems.append("n_routed_experts and n_shared_experts must be set")
    sigmoid = c["scoring_func"] == "sigmoid"
    if c["topk_method"] == "noaux_tc":
        if not sigmoid:
            problems.append("noaux_tc routing with softmax scores")
        if c["n_group"] != c["topk_group"]:  # the authors mask dropped groups with 0, V3 with -inf
            problems.append("noaux_tc with n_group != topk_group")
    elif sigmoid or c["topk_method"] not in ("greedy", "group_limited_greedy"):
        problems.append(f"topk_method={c['topk_method']!r} with scoring_func="
                        f"{c['scoring_func']!r}")
    if problems:
        raise MopeqError("unsupported DeepSeek-VL2 language_config: " + "; ".join(problems))


def _attention_dims(c: dict) -> dict:
    """MLA dims as given; for plain multi-head attention, the dims the MHA layers need.

    transformers' DeepSeek configs only describe MLA: an MHA model gets MLA-shaped placeholders
    (replaced by MHA layers when the model is built) and ``qk_rope_head_dim`` = the head size,
    so the model's rotary embedding covers the whole head, as in the authors' MHA layers.
    """
    if c["use_mla"]:
        return {k: c[k] for k in ("q_lora_rank", "kv_lora_rank", "qk_rope_head_dim",
                                  "qk_nope_head_dim", "v_head_dim")}
    head = c["hidden_size"] // c["num_attention_heads"]
    return {"q_lora_rank": None, "kv_lora_rank": head, "qk_rope_head_dim": head,
            "qk_nope_head_dim": 0, "v_head_dim": head}
