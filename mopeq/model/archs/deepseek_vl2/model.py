"""The DeepSeek-VL2 model: image tiles -> SigLIP -> projector -> tokens spliced into the LM input.

Each image arrives as one global view and ``tw x th`` local tiles (``processing``). Its tokens,
in the authors' "2D" layout with the global view first (``global_view_pos: head``), are

    global: h rows of (w features + image_newline)            -> h * (w + 1)
    view_seperator                                             -> 1
    local:  th*h rows of (tw*w features + image_newline)       -> th*h * (tw*w + 1)

and replace the ``<image>`` placeholder positions (``images_seq_mask``) of the prompt, in order.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mopeq.model.archs.deepseek_vl2.config import DeepseekVL2Config
from mopeq.model.archs.deepseek_vl2.language import build_lm
from mopeq.model.archs.deepseek_vl2.vision import Projector


class DeepseekVL2ForCausalLM(nn.Module):
    """DeepSeek-VL2 from transformers parts (``vision``, ``projector``, ``language_model``)."""

    def __init__(self, config: DeepseekVL2Config):
        super().__init__()
        from transformers import SiglipVisionModel

        self.config = config
        n_embed = config.projector["n_embed"]
        self.vision = SiglipVisionModel(config.vision_config)
        self.projector = Projector(config.projector)
        self.image_newline = nn.Parameter(torch.randn(n_embed) / math.sqrt(n_embed))
        self.view_seperator = nn.Parameter(torch.randn(n_embed) / math.sqrt(n_embed))
        self.language_model = build_lm(config.language_config)

    @property
    def device(self) -> torch.device:
        """Device of the weights."""
        return self.image_newline.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights."""
        return self.image_newline.dtype

    # ------------------------------------------------------------------ embeddings

    def image_features(self, images: torch.Tensor, crops: torch.Tensor) -> list[torch.Tensor]:
        """Token features of every image of every row: ``[row][image] -> [tokens, D]``.

        Args:
            images: [B, max_tiles, 3, S, S] tiles of each row (global view first per image).
            crops: [B, max_images, 2] (width tiles, height tiles) per image; zeros pad.
        """
        counts = [[(int(w), int(h)) for w, h in row if w > 0 and h > 0] for row in crops]
        tiles = [images[b, :sum(1 + w * h for w, h in row)] for b, row in enumerate(counts)]
        flat = torch.cat(tiles).to(self.dtype)
        if flat.shape[0] == 0:
            return [[] for _ in counts]
        feats = self.projector(self.vision(pixel_values=flat).last_hidden_state)
        out, start = [], 0
        for row in counts:
            images_of_row = []
            for w, h in row:
                images_of_row.append(self._layout(feats[start], feats[start + 1:start + 1 + w * h],
                                                  w, h))
                start += 1 + w * h
            out.append(images_of_row)
        return out

    def _layout(self, global_view, local, tw: int, th: int) -> torch.Tensor:
        """One image's token sequence (see the module docstring)."""
        hw, dim = global_view.shape
        side = math.isqrt(hw)
        newline = self.image_newline.to(global_view.dtype)
        g = torch.cat([global_view.view(side, side, dim), newline.expand(side, 1, dim)], 1)
        loc = local.view(th, tw, side, side, dim).permute(0, 2, 1, 3, 4).reshape(
            th * side, tw * side, dim)
        loc = torch.cat([loc, newline.expand(th * side, 1, dim)], 1)
        parts = [g.reshape(-1, dim), self.view_seperator.to(g.dtype)[None], loc.reshape(-1, dim)]
        if self.config.global_view_pos != "head":
            parts = parts[::-1]
        return torch.cat(parts)

    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
              images_seq_mask: torch.Tensor | None = None,
              images_spatial_crop: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with every image's features at its placeholder positions.

        Raises:
            ValueError: when a row's placeholders and its images' token counts disagree.
        """
        embeds = self.language_model.get_input_embeddings()(input_ids)
        if images is None or images_spatial_crop is None or int(images_spatial_crop.sum()) == 0:
            return embeds
        rows = []
        for b, feats in enumerate(self.image_features(images, images_spatial_crop)):
            mask = images_seq_mask[b].bool()
            if not feats:
                rows.append(embeds[b])
                continue
            feats = torch.cat(feats).to(embeds.dtype)
            if int(mask.sum()) != feats.shape[0]:
                raise ValueError(f"row {b}: {int(mask.sum())} image placeholders for "
                                 f"{feats.shape[0]} image tokens; use the model's processor")
            rows.append(embeds[b].masked_scatter(mask[:, None], feats))
        return torch.stack(rows)

    # ------------------------------------------------------------------ running

    def forward(self, input_ids=None, attention_mask=None, images=None, images_seq_mask=None,
                images_spatial_crop=None, inputs_embeds=None, **kwargs):
        """Language-model outputs (``logits``, ``cache``) for a prompt with its images.

        Further keyword arguments (``position_ids``, ``cache``, ``use_cache``, ``labels``,
        ``logits_to_keep``) go to the language model.
        """
        if inputs_embeds is None:
            inputs_embeds = self.embed(input_ids, images, images_seq_mask, images_spatial_crop)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   **kwargs)

    @torch.no_grad()
    def greedy(self, input_ids, attention_mask, images=None, images_seq_mask=None,
               images_spatial_crop=None, max_new_tokens: int = 16,
               eos_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy decoding with the KV cache (left-padded batches).

        Returns:
            The new tokens [B, <= max_new_tokens] (``eos_token_id`` after a row's end) and the
            logits of the first generated position [B, vocab].
        """
        embeds = self.embed(input_ids, images, images_seq_mask, images_spatial_crop)
        mask = attention_mask.long()
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cache, tokens, first = None, [], None
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            out = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos,
                                      cache=cache, use_cache=True, logits_to_keep=1)
            cache, logits = out.cache, out.logits[:, -1]
            first = logits if first is None else first
            nxt = logits.argmax(-1)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            tokens.append(nxt)
            if bool(done.all()):
                break
            embeds = self.language_model.get_input_embeddings()(nxt)[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            pos = pos[:, -1:] + 1
        return torch.stack(tokens, 1), first

    def mme_adapter(self, processor):
        """The adapter ``mopeq.evaluation.evaluate`` asks MME questions through."""
        from mopeq.model.archs.deepseek_vl2.processing import DeepseekVL2Adapter

        return DeepseekVL2Adapter(self, processor)
