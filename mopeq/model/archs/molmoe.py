"""MolmoE-1B (``allenai/MolmoE-1B-0924``) built from transformers-native parts, no remote code.

Structure (from the authors' published modeling file and config):

- language model: OLMoE, i.e. transformers ``OlmoeForCausalLM`` (q/k RMS norms over the full
  width, softmax top-k routing without renormalisation, SwiGLU experts, rotate-half RoPE);
- vision tower: a CLIP ViT (L/14 at 336 px in the real model, 23 of its 24 layers), i.e.
  transformers ``CLIPVisionModel``; features are the concatenated hidden states of the layers in
  ``vit_layers`` (-2 and -9), class token dropped;
- connector (``multi_modal_projector``): learned embeddings added to padded / partly padded
  patches, 2x2 attention pooling whose query is the mean of the four patches, and a SwiGLU MLP
  into the language model's width;
- token embedding: the base table plus ``additional_vocab_size`` new rows, concatenated; image
  features are *added* to the embeddings of the ``<im_patch>`` tokens at ``image_input_idx``.

The language model's embedding keeps all rows; its ``lm_head`` is padded with zero rows to the
same size and the logits are cut back to ``embedding_size``, as the authors' head has.
Checkpoint key mapping and loading: ``mopeq.model.archs.molmoe_weights``; image processing, prompt
format and the evaluation adapter: ``mopeq.model.archs.molmoe_processing``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, OlmoeConfig, OlmoeForCausalLM
from transformers.configuration_utils import PretrainedConfig

MODEL_TYPE = "molmo"


class MolmoeConfig(PretrainedConfig):
    """mopeq's config of a native MolmoE: OLMoE text config, CLIP vision config, connector.

    Args:
        text_config: the ``OlmoeConfig`` (or its dict); ``vocab_size`` counts every embedding row.
        vision_config: the ``CLIPVisionConfig`` (or its dict).
        embedding_size: rows of the authors' output head (logits are cut to this many).
        vit_layers: vision hidden states concatenated as image features (negative indices).
        pool_heads: attention heads of the 2x2 pooling.
        pool_head_dim: their width.
        projector_hidden: hidden width of the SwiGLU projector.
        pad_embed: whether learned (padding, partial padding) embeddings are added to patches.
        special_tokens: ids of ``<im_start>``, ``<im_end>``, ``<im_patch>``, ``<im_col>``,
            ``<|image|>`` (filled from the tokenizer when loading).
    """

    model_type = MODEL_TYPE

    def __init__(self, text_config=None, vision_config=None, embedding_size: int | None = None,
                 vit_layers=(-2, -9), pool_heads: int = 16, pool_head_dim: int = 64,
                 projector_hidden: int = 1024, pad_embed: bool = True,
                 special_tokens: dict | None = None, **kwargs):
        if isinstance(text_config, dict):
            text_config = OlmoeConfig(**{k: v for k, v in text_config.items()
                                         if k != "model_type"})
        if isinstance(vision_config, dict):
            vision_config = CLIPVisionConfig(**{k: v for k, v in vision_config.items()
                                                if k != "model_type"})
        self.text_config = text_config or OlmoeConfig()
        self.vision_config = vision_config or CLIPVisionConfig()
        self.embedding_size = embedding_size or self.text_config.vocab_size
        self.vit_layers = list(vit_layers)
        self.pool_heads = pool_heads
        self.pool_head_dim = pool_head_dim
        self.projector_hidden = projector_hidden
        self.pad_embed = pad_embed
        self.special_tokens = dict(special_tokens or {})
        super().__init__(**kwargs)

    def to_dict(self) -> dict:
        """JSON-ready dict with the two sub-configs as dicts."""
        out = super().to_dict()
        out["text_config"] = self.text_config.to_dict()
        out["vision_config"] = self.vision_config.to_dict()
        return out


class MolmoePooling(nn.Module):
    """Attention over each 2x2 group of patches, queried by the group's mean (attention-meanq)."""

    def __init__(self, in_dim: int, out_dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        self.wq = nn.Linear(in_dim, heads * head_dim)
        self.wk = nn.Linear(in_dim, heads * head_dim)
        self.wv = nn.Linear(in_dim, heads * head_dim)
        self.wo = nn.Linear(heads * head_dim, out_dim)

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        """[M, 4, C] patch groups -> [M, out_dim]."""
        m = groups.shape[0]

        def split(x):
            return x.view(m, -1, self.heads, self.head_dim).transpose(1, 2).float()

        q = split(self.wq(groups.mean(1, keepdim=True)))
        k, v = split(self.wk(groups)), split(self.wv(groups))
        out = F.scaled_dot_product_attention(q, k, v).to(groups.dtype)  # float32, as the authors
        return self.wo(out.transpose(1, 2).reshape(m, -1))


class MolmoeProjector(nn.Module):
    """SwiGLU MLP from pooled image features to the language model's width."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.w1 = nn.Linear(in_dim, hidden, bias=False)
        self.w3 = nn.Linear(in_dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """SwiGLU: ``w2(silu(w1 x) * w3 x)``."""
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MolmoeConnector(nn.Module):
    """Padding embeddings, 2x2 pooling and projection of the ViT features."""

    def __init__(self, config: MolmoeConfig):
        super().__init__()
        width = config.vision_config.hidden_size
        cat = width * len(config.vit_layers)
        self.pad_embed = nn.Parameter(torch.zeros(2, cat)) if config.pad_embed else None
        self.image_pooling_2d = MolmoePooling(cat, width, config.pool_heads, config.pool_head_dim)
        self.image_projector = MolmoeProjector(width, config.projector_hidden,
                                               config.text_config.hidden_size)

    def forward(self, features: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """[B, T, N, C] patch features (+ [B, T, N] real-pixel fractions) -> [B, T, N/4, D]."""
        b, t, n, c = features.shape
        if self.pad_embed is not None:
            if masks is None:
                raise ValueError("MolmoE needs image_masks (the processor provides them)")
            all_pad = (masks == 0).to(torch.float32)
            partial = ((masks < 1) & (masks != 0)).to(torch.float32)
            features = (features + self.pad_embed[0] * all_pad[..., None]
                        + self.pad_embed[1] * partial[..., None]).to(features.dtype)
        side = int(round(n ** 0.5))
        grid = features.view(b, t, side, side, c)
        if side % 2:  # the authors pad odd grids at the bottom/right to pool 2x2
            grid = F.pad(grid, (0, 0, 0, 1, 0, 1))
            side += 1
        h = side // 2
        groups = grid.view(b, t, h, 2, h, 2, c).permute(0, 1, 2, 4, 3, 5, 6).reshape(-1, 4, c)
        pooled = self.image_pooling_2d(groups).view(b, t, h * h, -1)
        return self.image_projector(pooled)


class MolmoeForConditionalGeneration(nn.Module):
    """MolmoE: CLIP vision tower + connector + OLMoE language model (see the module docstring).

    ``forward`` takes the processor's batch: ``input_ids`` (-1 = padding), ``attention_mask``,
    ``images`` [B, crops, patches, pixels] (-1 = a padding crop), ``image_masks``,
    ``image_input_idx`` [B, crops, tokens per crop] (-1 / -100 = no token).
    """

    def __init__(self, config: MolmoeConfig):
        super().__init__()
        self.config = config
        text = config.text_config
        self.vision_tower = CLIPVisionModel(config.vision_config)
        self.vision_tower.post_layernorm = nn.Identity()  # not part of Molmo (hidden states used)
        self.multi_modal_projector = MolmoeConnector(config)
        self.language_model = OlmoeForCausalLM(text)

    @property
    def device(self) -> torch.device:
        """Where the weights are."""
        return self.language_model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The language model's weight dtype."""
        return self.language_model.lm_head.weight.dtype

    def image_features(self, images: torch.Tensor, masks: torch.Tensor | None) -> torch.Tensor:
        """[B, T, N, p*p*3] patches -> [B, T, N/4, D] features to add to ``<im_patch>`` tokens."""
        b, t, n, d = images.shape
        flat = images.reshape(b * t, n, d).to(self.vision_tower.dtype)
        real = ~(flat == -1).all(dim=(1, 2))  # the batch collator pads with all -1 crops
        hidden = self._vit_hidden_states(self._pixels(flat))
        feats = torch.cat([hidden[i] for i in self.config.vit_layers], -1)[:, 1:]  # no cls
        feats = (feats * real[:, None, None]).view(b, t, n, -1)
        return self.multi_modal_projector(feats, masks)

    def _pixels(self, patches: torch.Tensor) -> torch.Tensor:
        """Patches laid out (rows, cols) x (dy, dx, channel) back to [M, 3, H, W] images."""
        p = self.config.vision_config.patch_size
        side = int(round(patches.shape[1] ** 0.5))
        x = patches.view(-1, side, side, p, p, 3).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(-1, 3, side * p, side * p)

    def _vit_hidden_states(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The output of every ViT layer (the authors' list: no embedding entry)."""
        vt = self.vision_tower
        h = vt.pre_layrnorm(vt.embeddings(pixels))
        out = []
        for layer in vt.encoder.layers:
            h = layer(h, None)
            out.append(h)
        return out

    def embed(self, input_ids: torch.Tensor, images=None, image_masks=None,
              image_input_idx=None) -> torch.Tensor:
        """Token embeddings with the image features added at ``image_input_idx``."""
        x = self.language_model.get_input_embeddings()(input_ids.clamp(min=0))
        if images is None:
            return x
        feats = self.image_features(images, image_masks).to(x.dtype)
        b = x.shape[0]
        idx = image_input_idx.reshape(b, -1)
        feats = feats.reshape(b, idx.shape[1], -1)
        valid = idx >= 0
        rows = torch.arange(b, device=x.device)[:, None].expand_as(idx)
        return x.index_put((rows[valid], idx[valid]), feats[valid], accumulate=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                images: torch.Tensor | None = None, image_masks: torch.Tensor | None = None,
                image_input_idx: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs):
        """Logits over the authors' ``embedding_size`` rows (a ``MoeCausalLMOutputWithPast``)."""
        if attention_mask is None:
            attention_mask = (input_ids != -1).long()
        if position_ids is None:  # positions count real tokens only (left padding is skipped)
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        embeds = self.embed(input_ids, images, image_masks, image_input_idx)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, **kwargs)
        out.logits = out.logits[..., : self.config.embedding_size]
        return out


def build(config: MolmoeConfig,
          device: str | torch.device = "cpu") -> MolmoeForConditionalGeneration:
    """An uninitialised model (``device="meta"`` for loading by assignment)."""
    with torch.device(device):
        model = MolmoeForConditionalGeneration(config)
    return model.eval()
