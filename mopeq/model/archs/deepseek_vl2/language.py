"""DeepSeek-VL2's language model for each released structure, from transformers classes.

- small (MLA, softmax routing): ``DeepseekV2ForCausalLM`` as is;
- base (MLA, sigmoid routing with ``e_score_correction_bias``): ``DeepseekV3ForCausalLM``;
- tiny (plain multi-head attention): ``DeepseekV2ForCausalLM`` whose attention layers are
  transformers' ``LlamaAttention`` (q/k/v/o projections, rotate-half rotary over the whole head),
  which is what the authors' code runs when ``use_mla`` is false.

The experts are transformers' fused, differentiable expert tensors, so gradients reach them
(the authors' inference path runs its experts under ``torch.no_grad``).
"""

from __future__ import annotations

import torch
from transformers import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention


class MultiHeadAttention(LlamaAttention):
    """``LlamaAttention`` fed by DeepseekV2's rotary embedding (complex ``freqs_cis``).

    DeepseekV2's model computes ``freqs_cis = exp(i * position * inv_freq)`` once per forward;
    the rotate-half form needs ``cos``/``sin`` over the full head: ``cat(re, re)``, ``cat(im, im)``.
    """

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                **kwargs):
        """Attention of one layer (same arguments as DeepseekV2's attention)."""
        cos = torch.cat([position_embeddings.real] * 2, -1).to(hidden_states.dtype)
        sin = torch.cat([position_embeddings.imag] * 2, -1).to(hidden_states.dtype)
        return super().forward(hidden_states, position_embeddings=(cos, sin),
                               attention_mask=attention_mask, cache=cache, **kwargs)


class DeepseekV2MHAForCausalLM(DeepseekV2ForCausalLM):
    """DeepseekV2 with plain multi-head attention (DeepSeek-VL2-Tiny's language model)."""

    def __init__(self, config):
        super().__init__(config)
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = MultiHeadAttention(config, i)


def lm_class(config) -> type:
    """The causal-LM class for a language config made by ``config.language_config``."""
    if config.model_type == "deepseek_v3":
        return DeepseekV3ForCausalLM
    if not getattr(config, "use_mla", True):
        return DeepseekV2MHAForCausalLM
    return DeepseekV2ForCausalLM


def build_lm(config) -> torch.nn.Module:
    """A language model with this config (weights as the class initialises them)."""
    return lm_class(config)(config)
