"""Tiny DeepSeek-VL2 checkpoints in the hub layout (tiny / small / base structure), offline.

The configs keep the released files' keys and structure (DeepSeek-VL2-Tiny: plain multi-head
attention, 64 experts top-6, softmax; -Small: MLA, 64 experts; base: MLA with a q LoRA, 72
experts, sigmoid routing with ``e_score_correction_bias``, ``noaux_tc``), sizes cut down:
2 decoder layers (layer 0 dense), hidden 64, expert FFN 32, a 2-layer SigLIP of width 32 on
70-px tiles (a 5 x 5 patch grid: odd, as the real 27 x 27, so the projector pads).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

TILE, PATCH = 70, 14
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image>",
            "<|ref|>", "<|/ref|>", "<|det|>", "<|/det|>", "<|grounding|>", "<|User|>",
            "<|Assistant|>"]
CORPUS = ("Yes No yes no Is there a red circle in the image? Please answer yes or no. "
          "Is the square blue? Are there two triangles? What colour is the car? "
          "Answer the question using a single word or phrase.") * 20


def candidate_resolutions(tile: int = TILE, max_tiles: int = 4) -> list[list[int]]:
    """The paper's rule (m x n tiles, mn <= max_tiles; the released configs use 9)."""
    return [[m * tile, n * tile] for m in range(1, max_tiles + 1)
            for n in range(1, max_tiles + 1) if m * n <= max_tiles]


LANGUAGE = {
    "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
    "bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1, "hidden_size": 64,
    "intermediate_size": 128, "moe_intermediate_size": 32, "max_position_embeddings": 1024,
    "n_group": 1, "topk_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
    "num_attention_heads": 4, "num_key_value_heads": 4, "num_experts_per_tok": 6,
    "num_hidden_layers": 2, "lm_head": True, "rm_head": False, "topk_method": "greedy",
    "torch_dtype": "bfloat16", "vocab_size": 512,
}
STRUCTURES = {
    "tiny": {"use_mla": False, "kv_lora_rank": None, "q_lora_rank": None, "qk_nope_head_dim": 0,
             "qk_rope_head_dim": 0, "v_head_dim": 0},
    "small": {"kv_lora_rank": 32, "q_lora_rank": None, "qk_nope_head_dim": 16,
              "qk_rope_head_dim": 8, "v_head_dim": 16},
    "base": {"kv_lora_rank": 32, "q_lora_rank": 48, "qk_nope_head_dim": 16,
             "qk_rope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 72,
             "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
             "routed_scaling_factor": 2.0},
}


def hub_config(structure: str) -> dict:
    """A cut-down ``config.json`` of the named structure, in the hub's key layout."""
    return {
        "architectures": ["DeepseekVLV2ForCausalLM"], "model_type": "deepseek_vl_v2",
        "candidate_resolutions": candidate_resolutions(), "global_view_pos": "head",
        "tile_tag": "2D", "torch_dtype": "bfloat16",
        "language_config": {**copy.deepcopy(LANGUAGE), **STRUCTURES[structure]},
        "projector_config": {"model_type": "mlp_projector", "input_dim": 32, "n_embed": 64,
                             "depth": 2, "mlp_ratio": 1, "downsample_ratio": 2,
                             "projector_type": "downsample_mlp_gelu"},
        "vision_config": {"model_type": "vision", "model_name": "siglip_so400m_patch14_384",
                          "image_size": TILE, "patch_size": PATCH, "width": 32, "layers": 2,
                          "heads": 2, "mlp_ratio": 3.7362},
    }


def build_tokenizer():
    """A byte-level BPE tokenizer with DeepSeek-VL2's special tokens (ids 0 and 1: BOS, EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIALS[0],
                                   eos_token=SPECIALS[1], pad_token=SPECIALS[2])


def new_model(structure: str, seed: int = 0):
    """A random-weight model and processor of the named structure (float32)."""
    from mopeq.model.archs.deepseek_vl2.config import DeepseekVL2Config
    from mopeq.model.archs.deepseek_vl2.loading import init_buffers
    from mopeq.model.archs.deepseek_vl2.model import DeepseekVL2ForCausalLM
    from mopeq.model.archs.deepseek_vl2.processing import DeepseekVL2Processor

    torch.manual_seed(seed)
    model = DeepseekVL2ForCausalLM(DeepseekVL2Config(hub_config(structure))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "experts" in name or name.endswith("gate.weight"):
                p.normal_(0, 0.2)  # spread the routing so top-6 choices are not ties
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buf.copy_(torch.randn(buf.shape) * 0.1)  # a bias that changes the choice
    init_buffers(model)
    c = hub_config(structure)
    processor = DeepseekVL2Processor(build_tokenizer(), c["candidate_resolutions"], PATCH,
                                     c["projector_config"]["downsample_ratio"])
    return model, processor


def write_checkpoint(structure: str, folder: str | Path, seed: int = 0) -> Path:
    """Write a hub-layout folder (bf16 weights) of the named structure."""
    from mopeq.model.archs.deepseek_vl2.loading import save_hub_layout

    model, processor = new_model(structure, seed)
    return save_hub_layout(model, processor, folder)
