"""DeepSeek-VL2's vision side: SigLIP tower, 2x2-downsampling MLP projector, weight names.

The checkpoint stores the tower under timm's ``VisionTransformer`` names
(``vision.blocks.{i}.attn.qkv`` fused, ``vision.pos_embed`` [1, N, D], an ``attn_pool`` head
the model never runs); transformers'
``SiglipVisionModel`` holds the same weights under its own names, with q/k/v split.
``timm_to_siglip`` and ``siglip_to_timm`` convert one naming to the other, exactly invertibly.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from mopeq.core.errors import MopeqError

# timm suffix -> SigLIP suffix, inside one block (``blocks.{i}.`` -> ``encoder.layers.{i}.``)
_BLOCK = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
          "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
# whole-name prefixes outside the blocks
_TOP = {"patch_embed.proj": "embeddings.patch_embedding", "norm": "post_layernorm",
        "attn_pool.proj": "head.attention.out_proj", "attn_pool.norm": "head.layernorm",
        "attn_pool.mlp.fc1": "head.mlp.fc1", "attn_pool.mlp.fc2": "head.mlp.fc2"}
_QKV = ("q_proj", "k_proj", "v_proj")


class Projector(nn.Module):
    """``downsample_mlp_gelu``: concatenate each 2x2 patch neighbourhood, then an MLP.

    A side of odd length is zero-padded at the bottom/right first (27 x 27 -> 14 x 14).
    Channels are concatenated in ``F.unfold`` order (channel-major, then row, then column).
    """

    def __init__(self, p: dict):
        super().__init__()
        self.ratio = p["downsample_ratio"]
        width = p["n_embed"] * p["mlp_ratio"]
        layers: list[nn.Module] = [nn.Linear(p["input_dim"] * self.ratio ** 2, width)]
        for _ in range(1, p["depth"] - 1):
            layers += [nn.GELU(), nn.Linear(width, width)]
        layers += [nn.GELU(), nn.Linear(width, p["n_embed"])]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[n, side*side, c] -> [n, ceil(side/r)**2, n_embed]."""
        n, hw, c = x.shape
        side = math.isqrt(hw)
        pad = (-side) % self.ratio
        x = F.pad(x.reshape(n, side, side, c), (0, 0, 0, pad, 0, pad))
        x = F.unfold(x.permute(0, 3, 1, 2), kernel_size=self.ratio, stride=self.ratio)
        return self.layers(x.transpose(1, 2))


def tokens_per_side(image_size: int, patch_size: int, ratio: int) -> int:
    """Image tokens per tile side after downsampling (14 for 384 px, patch 14, ratio 2)."""
    return math.ceil((image_size // patch_size) / ratio)


# ------------------------------------------------------------------------ weight names


def timm_to_siglip(timm: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Timm ``VisionTransformer`` tensors (names without ``vision.``) -> SiglipVisionModel's.

    Raises:
        MopeqError: naming a tensor that has no place in the SigLIP tower.
    """
    out, pool = {}, {}
    for name, t in timm.items():
        if name == "pos_embed":
            out["embeddings.position_embedding.weight"] = t.reshape(t.shape[-2], t.shape[-1])
        elif name == "attn_pool.latent":
            out["head.probe"] = t
        elif m := re.fullmatch(r"attn_pool\.(q|kv)\.(weight|bias)", name):
            pool[m.groups()] = t
        elif m := re.fullmatch(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", name):
            for proj, part in zip(_QKV, t.chunk(3, 0), strict=True):
                out[f"encoder.layers.{m[1]}.self_attn.{proj}.{m[2]}"] = part
        else:
            out[_rename(name, _TOP, _BLOCK)] = t
    for kind in ("weight", "bias"):
        if ("q", kind) in pool:
            out[f"head.attention.in_proj_{kind}"] = torch.cat([pool["q", kind],
                                                               pool["kv", kind]])
    return out


def siglip_to_timm(siglip: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``timm_to_siglip``."""
    top, block = {v: k for k, v in _TOP.items()}, {v: k for k, v in _BLOCK.items()}
    out, qkv = {}, {}
    for full, t in siglip.items():
        name = full.removeprefix("vision_model.")  # older transformers nest the tower
        if name == "embeddings.position_embedding.weight":
            out["pos_embed"] = t.unsqueeze(0)
        elif name == "head.probe":
            out["attn_pool.latent"] = t
        elif m := re.fullmatch(r"head\.attention\.in_proj_(weight|bias)", name):
            q, kv = t.split([t.shape[0] // 3, 2 * t.shape[0] // 3])
            out[f"attn_pool.q.{m[1]}"], out[f"attn_pool.kv.{m[1]}"] = q, kv
        elif m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.(\w_proj)\.(weight|bias)",
                               name):
            qkv.setdefault((m[1], m[3]), {})[m[2]] = t
        elif name != "embeddings.position_ids":
            out[_rename(name, top, block, inverse=True)] = t
    for (layer, kind), parts in qkv.items():
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[p] for p in _QKV])
    return out


def _rename(name: str, top: dict, block: dict, inverse: bool = False) -> str:
    stem, _, leaf = name.rpartition(".")
    pattern = r"encoder\.layers\.(\d+)\.(.+)" if inverse else r"blocks\.(\d+)\.(.+)"
    if m := re.fullmatch(pattern, stem):
        if m[2] in block:
            head = "blocks" if inverse else "encoder.layers"
            return f"{head}.{m[1]}.{block[m[2]]}.{leaf}"
    elif stem in top:
        return f"{top[stem]}.{leaf}"
    raise MopeqError(f"vision tensor {name!r} has no counterpart: not a DeepSeek-VL2 SigLIP "
                   "checkpoint, or a layout mopeq.model.archs.deepseek_vl2.vision does not know")
