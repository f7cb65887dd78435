"""Tiny MolmoE checkpoints written in the hub's layout (allenai/MolmoE-1B-0924), offline.

Names, shapes and config keys follow the authors' published ``config.json`` and modeling code,
cut down (d_model 64, 2 layers, 8 experts top-2, a 3-layer ViT on 56 px crops of 7 px patches).
The tensors are written here from the authors' shapes, independently of mopeq's key mapping, so
a wrong mapping fails the tests. The tokenizer is a small byte-level BPE with the same special
tokens (``<|endoftext|>`` as EOS/BOS, ``<|padding|>``, ``<im_start>`` ... ``<|image|>``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

EXTRA = ["<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>"]
CORPUS = ["Is there a red square in the image? Please answer yes or no.", "Yes", "No", "yes",
          "no", " User: Assistant:", "How many circles are there? Is the blue one on the left?"]

VISION = {"attention_dropout": 0.0, "fsdp_wrap": False, "image_default_input_size": [56, 56],
          "image_dropout_rate": 0.0, "image_emb_dim": 32, "image_head_dim": 16,
          "image_mlp_activations": "quick_gelu", "image_mlp_dim": 64, "image_model_type": "openai",
          "image_norm_eps": 1e-05, "image_num_heads": 2, "image_num_key_value_heads": 2,
          "image_num_layers": 3, "image_num_pos": 65, "image_patch_size": 7,
          "image_pos_patch_size": 7, "initializer_range": 0.02, "residual_dropout": 0.0,
          "resize_mode": "default"}

CONFIG = {  # the hub config.json's keys, values cut down
    "auto_map": {"AutoConfig": "config_molmoe.MolmoConfig",
                 "AutoModelForCausalLM": "modeling_molmoe.MolmoForCausalLM"},
    "activation_type": "swiglu", "additional_vocab_size": 8, "architectures": ["OLMoForCausalLM"],
    "attention_dropout": 0.0, "attention_layer_norm": True,
    "attention_layer_norm_with_affine": True,
    "attention_type": "sdpa", "bias_for_layer_norm": False, "block_type": "moe", "clip_qkv": None,
    "d_model": 64, "embedding_dropout": 0.0, "float32_attention": True, "head_dim": None,
    "image_padding_embed": "pad_and_partial_pad", "image_pooling_2d": "attention-meanq",
    "image_pooling_h": 2, "image_pooling_w": 2, "image_projector": "mlp", "include_bias": False,
    "layer_norm_eps": 1e-05, "layer_norm_type": "rms", "layer_norm_with_affine": True,
    "max_crops": 4, "max_position_embeddings": 1024, "max_sequence_length": 512,
    "message_formatting": "role", "mlp_hidden_size": None, "mlp_ratio": 1, "model_type": "molmo",
    "moe_num_experts": 8, "moe_top_k": 2, "n_heads": 4, "n_kv_heads": None, "n_layers": 2,
    "norm_after": False, "normalize_input_embeds": False, "overlap_margins": [2, 2],
    "pad_token_id": 1, "qkv_bias": False, "residual_dropout": 0.1, "rope": True,
    "rope_full_precision": True, "rope_impl": "llama", "rope_theta": 10000.0,
    "scale_logits": False, "use_cache": True, "use_cls_feature": False, "use_position_ids": True,
    "vision_backbone": VISION, "vit_layers": [-2, -3], "weight_tying": False,
    "transformers_version": "4.45.0.dev0",
}
PREPROCESSOR = {"auto_map": {
                    "AutoImageProcessor": "image_preprocessing_molmo.MolmoImageProcessor",
                    "AutoProcessor": "preprocessing_molmo.MolmoProcessor"},
                "base_image_input_size": [56, 56], "do_normalize": True,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_padding_mask": True,
                "image_patch_size": 7, "image_processor_type": "MolmoImageProcessor",
                "image_std": [0.26862954, 0.26130258, 0.27577711], "image_token_length_h": 4,
                "image_token_length_w": 4, "max_crops": 4, "overlap_margins": [2, 2],
                "processor_class": "MolmoProcessor"}


def tokenizer():
    """A byte-level BPE with MolmoE's special tokens (trained on a few fixed lines)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|padding|>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|padding|>")
    fast.add_special_tokens({"additional_special_tokens": EXTRA})
    return fast


def hub_tensors(config: dict, n_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors under the authors' names and shapes (see ``model.archs.molmoe_weights``)."""
    g = torch.Generator().manual_seed(seed)
    d, e = config["d_model"], config["moe_num_experts"]
    inter = (config["mlp_hidden_size"] or config["mlp_ratio"] * d) // 2
    vb = config["vision_backbone"]
    w, p, cat = vb["image_emb_dim"], vb["image_patch_size"], vb["image_emb_dim"] * 2
    emb = config["embedding_size"]
    t: dict[str, tuple] = {
        "lm_head.weight": (emb, d), "model.transformer.wte.embedding": (emb, d),
        "model.transformer.wte.new_embedding": (config["additional_vocab_size"], d),
        "model.transformer.ln_f.weight": (d,),
        "model.vision_backbone.image_vit.class_embedding": (w,),
        "model.vision_backbone.image_vit.positional_embedding": (vb["image_num_pos"], w),
        "model.vision_backbone.image_vit.patch_embedding.weight": (w, p * p * 3),
        "model.vision_backbone.image_vit.pre_ln.weight": (w,),
        "model.vision_backbone.image_vit.pre_ln.bias": (w,),
        "model.vision_backbone.pad_embed": (2, cat),
    }
    for n in ("wq", "wk", "wv"):
        t[f"model.vision_backbone.image_pooling_2d.{n}.weight"] = (w, cat)
        t[f"model.vision_backbone.image_pooling_2d.{n}.bias"] = (w,)
    t["model.vision_backbone.image_pooling_2d.wo.weight"] = (w, w)
    t["model.vision_backbone.image_pooling_2d.wo.bias"] = (w,)
    t["model.vision_backbone.image_projector.w1.weight"] = (inter, w)
    t["model.vision_backbone.image_projector.w3.weight"] = (inter, w)
    t["model.vision_backbone.image_projector.w2.weight"] = (d, inter)
    for k in range(vb["image_num_layers"]):
        pre = f"model.vision_backbone.image_vit.transformer.resblocks.{k}."
        for n in ("wq", "wk", "wv", "wo"):
            t[pre + f"attention.{n}.weight"], t[pre + f"attention.{n}.bias"] = (w, w), (w,)
        mlp = vb["image_mlp_dim"]
        t[pre + "feed_forward.w1.weight"], t[pre + "feed_forward.w1.bias"] = (mlp, w), (mlp,)
        t[pre + "feed_forward.w2.weight"], t[pre + "feed_forward.w2.bias"] = (w, mlp), (w,)
        for n in ("attention_norm", "ffn_norm"):
            t[pre + n + ".weight"], t[pre + n + ".bias"] = (w,), (w,)
    for i in range(config["n_layers"]):
        pre = f"model.transformer.blocks.{i}."
        t[pre + "attn.att_proj.weight"] = (3 * d, d)
        t[pre + "attn.attn_out.weight"] = (d, d)
        for n in ("attn_norm", "q_norm", "k_norm"):
            t[pre + f"attn.{n}.weight"] = (d,)
        t[pre + "mlp.gate.weight"] = (e, d)
        t[pre + "mlp.ff_norm.weight"] = (d,)
        for j in range(e):
            t[pre + f"mlp.experts.{j}.gate_proj.weight"] = (inter, d)
            t[pre + f"mlp.experts.{j}.up_proj.weight"] = (inter, d)
            t[pre + f"mlp.experts.{j}.down_proj.weight"] = (d, inter)
    out = {}
    for name, shape in t.items():
        norm = name.endswith(("norm.weight", "pre_ln.weight")) or name.endswith("_norm.weight")
        x = torch.randn(shape, generator=g) * (0.1 if len(shape) > 1 else 0.05)
        out[name] = (1 + x) if norm else x
    return out


def write(folder: str | Path, seed: int = 0, overrides: dict | None = None) -> Path:
    """A MolmoE-layout folder: config.json, model.safetensors, tokenizer, preprocessor files."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    config = {**CONFIG, **(overrides or {})}
    config["vocab_size"] = len(tok)
    config["embedding_size"] = -(-len(tok) // 32) * 32
    config["eos_token_id"] = tok.eos_token_id
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file(hub_tensors(config, len(tok), seed), str(folder / "model.safetensors"))
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
    (folder / "processor_config.json").write_text(json.dumps(
        {"auto_map": {"AutoProcessor": "preprocessing_molmo.MolmoProcessor"},
         "processor_class": "MolmoProcessor"}, indent=2))
    return folder
