"""Load MolmoE checkpoints without remote code: the hub layout by key mapping, and mopeq exports.

The hub folder (``allenai/MolmoE-1B-0924``) holds an OLMo-style ``config.json`` (``d_model``,
``n_heads``, ``moe_num_experts``, a ``vision_backbone`` dict, ``auto_map`` pointing at the
authors' code) and safetensors with the authors' names:

- ``model.transformer.wte.{embedding,new_embedding}``, ``model.transformer.ln_f.weight``,
  ``lm_head.weight``;
- ``model.transformer.blocks.{i}.attn.{att_proj,attn_out,attn_norm,q_norm,k_norm}.weight``
  (``att_proj`` is q, k and v stacked);
- ``model.transformer.blocks.{i}.mlp.{gate,ff_norm}.weight`` and
  ``...mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight``;
- ``model.vision_backbone.image_vit.{class_embedding,positional_embedding,patch_embedding,
  pre_ln,transformer.resblocks.{k}.{attention.w[qkvo],feed_forward.w[12],attention_norm,
  ffn_norm}}``, ``model.vision_backbone.{image_pooling_2d.w[qkvo],image_projector.w[123],
  pad_embed}``.

``HUB_RULES`` maps them onto ``MolmoeForConditionalGeneration``. Variants of the authors'
config that this implementation does not reproduce are refused with the setting named.
"""

# ruff: noqa: E501 - the key-mapping table keeps one rule per line
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from transformers import CLIPVisionConfig, OlmoeConfig

from mopeq.core.errors import MopeqError
from mopeq.model.archs.molmoe import MolmoeConfig, MolmoeForConditionalGeneration, build

EXTRA_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")
# (setting, value the native implementation reproduces); absent keys take the authors' defaults
REQUIRED = (("block_type", "moe"), ("rope", True), ("rope_impl", "llama"), ("norm_after", False),
            ("attention_layer_norm", True), ("layer_norm_type", "rms"), ("include_bias", False),
            ("qkv_bias", False), ("clip_qkv", None), ("weight_tying", False),
            ("image_pooling_2d", "attention-meanq"), ("image_projector", "mlp"),
            ("use_cls_feature", False), ("activation_type", "swiglu"), ("scale_logits", False),
            ("normalize_input_embeds", False), ("use_position_ids", True),
            ("final_logit_softcapping", None), ("head_dim", None))
LM = "language_model.model."
VT = "vision_tower."
HUB_RULES = (  # (authors' name pattern, mopeq name template); {0} is the first group
    (r"model\.transformer\.ln_f\.weight", LM + "norm.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.attn\.attn_out\.weight", LM + "layers.{0}.self_attn.o_proj.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.attn\.attn_norm\.weight", LM + "layers.{0}.input_layernorm.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.attn\.(q_norm|k_norm)\.weight", LM + "layers.{0}.self_attn.{1}.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.mlp\.ff_norm\.weight", LM + "layers.{0}.post_attention_layernorm.weight"),
    (r"model\.transformer\.blocks\.(\d+)\.mlp\.gate\.weight", LM + "layers.{0}.mlp.gate.weight"),
    (r"model\.vision_backbone\.image_vit\.class_embedding", VT + "embeddings.class_embedding"),
    (r"model\.vision_backbone\.image_vit\.positional_embedding", VT + "embeddings.position_embedding.weight"),
    (r"model\.vision_backbone\.image_vit\.pre_ln\.(weight|bias)", VT + "pre_layrnorm.{0}"),
    (r"model\.vision_backbone\.image_vit\.transformer\.resblocks\.(\d+)\.attention\.w([qkv])\.(weight|bias)", VT + "encoder.layers.{0}.self_attn.{1}_proj.{2}"),
    (r"model\.vision_backbone\.image_vit\.transformer\.resblocks\.(\d+)\.attention\.wo\.(weight|bias)", VT + "encoder.layers.{0}.self_attn.out_proj.{1}"),
    (r"model\.vision_backbone\.image_vit\.transformer\.resblocks\.(\d+)\.feed_forward\.w([12])\.(weight|bias)", VT + "encoder.layers.{0}.mlp.fc{1}.{2}"),
    (r"model\.vision_backbone\.image_vit\.transformer\.resblocks\.(\d+)\.attention_norm\.(weight|bias)", VT + "encoder.layers.{0}.layer_norm1.{1}"),
    (r"model\.vision_backbone\.image_vit\.transformer\.resblocks\.(\d+)\.ffn_norm\.(weight|bias)", VT + "encoder.layers.{0}.layer_norm2.{1}"),
    (r"model\.vision_backbone\.(image_pooling_2d\.w[qkvo]\.(?:weight|bias))", "multi_modal_projector.{0}"),
    (r"model\.vision_backbone\.(image_projector\.w[123]\.weight)", "multi_modal_projector.{0}"),
    (r"model\.vision_backbone\.pad_embed", "multi_modal_projector.pad_embed"),
)


def is_hub_molmoe(config: dict) -> bool:
    """A MolmoE (MoE) hub config, as opposed to the dense Molmo-7B/72B that share ``molmo``."""
    return bool(config.get("moe_num_experts")) and "vision_backbone" in config


def config_from_hub(hub: dict, special_tokens: dict | None = None) -> MolmoeConfig:
    """Translate the authors' OLMo-style ``config.json`` into a ``MolmoeConfig``.

    Raises:
        MopeqError: for a setting this implementation does not reproduce.
    """
    bad = [f"{k}={hub[k]!r} (supported: {v!r})" for k, v in REQUIRED if k in hub and hub[k] != v]
    vb = hub["vision_backbone"]
    if vb.get("image_mlp_activations", "quick_gelu") != "quick_gelu":
        bad.append(f"vision image_mlp_activations={vb['image_mlp_activations']!r}")
    if vb.get("image_model_type", "openai") != "openai":
        bad.append(f"vision image_model_type={vb['image_model_type']!r}")
    if vb["image_head_dim"] * vb["image_num_heads"] != vb["image_emb_dim"]:
        bad.append("vision image_head_dim * image_num_heads != image_emb_dim")
    if hub.get("image_padding_embed") not in (None, "pad_and_partial_pad"):
        bad.append(f"image_padding_embed={hub['image_padding_embed']!r}")
    if bad:
        raise MopeqError("this MolmoE variant is not supported natively: " + "; ".join(bad))
    d, heads = hub["d_model"], hub["n_heads"]
    hidden = hub.get("mlp_hidden_size") or hub.get("mlp_ratio", 4) * d
    emb = hub.get("embedding_size") or hub["vocab_size"]
    text = OlmoeConfig(
        vocab_size=emb + (hub.get("additional_vocab_size") or 0), hidden_size=d,
        intermediate_size=hidden // 2, num_hidden_layers=hub["n_layers"],
        num_attention_heads=heads, num_key_value_heads=hub.get("n_kv_heads") or heads,
        max_position_embeddings=hub.get("max_position_embeddings") or hub["max_sequence_length"],
        rms_norm_eps=hub.get("layer_norm_eps") or 1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": float(hub.get("rope_theta", 1e4))},
        num_experts=hub["moe_num_experts"], num_experts_per_tok=hub["moe_top_k"],
        norm_topk_prob=False, tie_word_embeddings=False, router_aux_loss_coef=0.0,
        pad_token_id=hub.get("pad_token_id", 1), eos_token_id=hub.get("eos_token_id", 50279),
        bos_token_id=None)
    size = vb["image_default_input_size"]
    vision = CLIPVisionConfig(
        hidden_size=vb["image_emb_dim"], intermediate_size=vb["image_mlp_dim"],
        num_hidden_layers=vb["image_num_layers"], num_attention_heads=vb["image_num_heads"],
        image_size=size[0], patch_size=vb["image_patch_size"], hidden_act="quick_gelu",
        layer_norm_eps=vb.get("image_norm_eps", 1e-5), num_channels=3)
    if vb["image_num_pos"] != (size[0] // vb["image_patch_size"]) ** 2 + 1 or size[0] != size[1]:
        raise MopeqError("this MolmoE variant is not supported natively: non-square crops or a "
                         "position table that does not match the crop size")
    return MolmoeConfig(text_config=text, vision_config=vision, embedding_size=emb,
                        vit_layers=tuple(hub.get("vit_layers") or (-1,)),
                        pool_heads=vb["image_num_heads"], pool_head_dim=vb["image_head_dim"],
                        projector_hidden=hidden // 2,
                        pad_embed=hub.get("image_padding_embed") == "pad_and_partial_pad",
                        special_tokens=special_tokens or {})


def special_token_ids(tokenizer) -> dict[str, int]:
    """Ids of Molmo's image tokens, as the authors' processor finds them (one token each).

    Raises:
        MopeqError: when the tokenizer does not hold them as single tokens.
    """
    ids = tokenizer.encode("".join(EXTRA_TOKENS), add_special_tokens=False)
    if len(ids) != len(EXTRA_TOKENS):
        raise MopeqError(f"the tokenizer does not encode Molmo's image tokens {EXTRA_TOKENS} as "
                         "single tokens: is this MolmoE's tokenizer?")
    return dict(zip(EXTRA_TOKENS, ids, strict=True))


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MopeqError(f"{path} has no .safetensors weights")
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def map_hub_state(hub: dict[str, torch.Tensor], config: MolmoeConfig) -> dict[str, torch.Tensor]:
    """The authors' state dict -> ``MolmoeForConditionalGeneration`` names and layouts.

    Raises:
        MopeqError: naming unmapped or missing checkpoint tensors.
    """
    hub = dict(hub)
    out = {}
    text = config.text_config
    out["language_model.model.embed_tokens.weight"] = torch.cat(
        [hub.pop("model.transformer.wte.embedding"),
         hub.pop("model.transformer.wte.new_embedding", torch.zeros(0, text.hidden_size))])
    head = hub.pop("lm_head.weight")
    out["language_model.lm_head.weight"] = torch.cat(  # zero rows: cut off again in forward
        [head, head.new_zeros(text.vocab_size - head.shape[0], head.shape[1])])
    patch = hub.pop("model.vision_backbone.image_vit.patch_embedding.weight")
    p = config.vision_config.patch_size
    out[VT + "embeddings.patch_embedding.weight"] = patch.view(
        patch.shape[0], p, p, 3).permute(0, 3, 1, 2).contiguous()  # (dy, dx, c) -> conv layout
    head_dim = text.hidden_size // text.num_attention_heads
    for i in range(text.num_hidden_layers):
        pre = f"model.transformer.blocks.{i}."
        qkv = hub.pop(pre + "attn.att_proj.weight")
        kv = text.num_key_value_heads * head_dim
        for name, part in zip("qkv", qkv.split([text.hidden_size, kv, kv]), strict=True):
            out[f"{LM}layers.{i}.self_attn.{name}_proj.weight"] = part
        experts = [[hub.pop(f"{pre}mlp.experts.{e}.{n}_proj.weight") for e in
                    range(text.num_experts)] for n in ("gate", "up", "down")]
        out[f"{LM}layers.{i}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([g, u]) for g, u in zip(experts[0], experts[1], strict=True)])
        out[f"{LM}layers.{i}.mlp.experts.down_proj"] = torch.stack(experts[2])
    for name in list(hub):
        for pattern, template in HUB_RULES:
            m = re.fullmatch(pattern, name)
            if m:
                out[template.format(*m.groups())] = hub.pop(name)
                break
    if hub:
        raise MopeqError(f"{len(hub)} checkpoint tensors have no place in MolmoE, e.g. "
                         f"{sorted(hub)[:3]}")
    return out


def load_hub(path: str | Path, dtype: torch.dtype = torch.float32,
             special_tokens: dict | None = None) -> MolmoeForConditionalGeneration:
    """Build the model from a hub-layout folder (config.json + safetensors), no remote code."""
    path = Path(path)
    config = config_from_hub(json.loads((path / "config.json").read_text()), special_tokens)
    state = map_hub_state(_safetensors(path), config)
    return _assign(build(config, "meta"), state, dtype)


def load_export(path: str | Path, dtype: torch.dtype = torch.float32
                ) -> MolmoeForConditionalGeneration:
    """Reload a mopeq export: auto-round language model + 16-bit rest (``rest.safetensors``)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    config = MolmoeConfig(**{k: v for k, v in raw.items() if k not in ("model_type",)})
    model = build(config, "meta")
    lm = AutoModelForCausalLM.from_pretrained(path / raw["quantized_language_model"],
                                              device_map="cpu")
    rest = load_file(str(path / "rest.safetensors"))
    model = _assign(model, rest, dtype, skip_prefix="language_model.")
    model.language_model = lm.eval()
    return model


def _assign(model: MolmoeForConditionalGeneration, state: dict, dtype,
            skip_prefix: str | None = None) -> MolmoeForConditionalGeneration:
    """Load by assignment onto a meta-device model; rebuild non-persistent buffers."""
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if skip_prefix:
        missing = [k for k in missing if not k.startswith(skip_prefix)]
    if missing or unexpected:
        raise MopeqError(f"checkpoint does not match MolmoE: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    from transformers.models.olmoe.modeling_olmoe import OlmoeRotaryEmbedding

    # Non-persistent buffers are not in checkpoints: on 5.x they would stay uninitialised.
    if not skip_prefix:
        model.language_model.model.rotary_emb = OlmoeRotaryEmbedding(model.config.text_config)
    emb = model.vision_tower.embeddings
    emb.position_ids = torch.arange(emb.num_positions).expand((1, -1))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta and not (skip_prefix and n.startswith(skip_prefix))]
    if left:
        raise MopeqError(f"MolmoE tensors left uninitialised after loading: {left[:4]}")
    return model.eval()


def supports(config: dict) -> bool:
    """Whether a ``config.json`` (as a dict) is a MolmoE this module loads."""
    return is_hub_molmoe(config) or config.get("quantized_language_model") is not None \
        and "text_config" in config


def load(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, processor) from a hub-layout MolmoE folder or a mopeq export of one."""
    from mopeq.model.archs.molmoe_processing import MolmoeProcessor

    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    processor = MolmoeProcessor.from_folder(path)
    if raw.get("quantized_language_model"):
        return load_export(path, dtype), processor
    return load_hub(path, dtype, special_tokens=processor.special), processor


def meta_model(path: str | Path) -> MolmoeForConditionalGeneration:
    """The model on the meta device from ``config.json`` alone (layouts of any size)."""
    return build(config_from_hub(json.loads((Path(path) / "config.json").read_text())), "meta")
