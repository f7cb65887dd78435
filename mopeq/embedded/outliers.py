"""Outlier channels at the experts' inputs, as a real LLM has them, by an exact rescale.

A real LLM's MLP inputs carry channels whose scale differs by orders of magnitude (the
outlier features of LLM.int8(), the "massive activations"); that is a large part of why
round-to-nearest at 2-3 bits hurts it: a group's scale is set by its largest weights, and the
error on a small-weight column is multiplied by that column's large activation. A tiny model
trained for 45 minutes has no such channels, and RTN barely touches it.

``spread_channels`` gives it outlier channels without changing what it computes. In MoE layer
``l``, input channel ``k`` of the experts is multiplied by ``2**u_k`` in the post-attention
RMSNorm gain and divided by the same in the router's and every routed expert's input columns
(``u_k`` drawn uniformly from the layer's exponent set, seeded; the sets cycle over the
layers, so layers can differ as a real model's do). Powers of two are exact in bf16, so the saved
16-bit model answers exactly as before; only how its weights quantize changes. It is the
inverse of SmoothQuant/AWQ's migration, and those methods would undo it, as they help a real
model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mopeq.core.errors import MopeqError


def _moe_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder layers whose post-attention norm feeds only a router and routed experts."""
    layers = [m for m in model.modules()
              if hasattr(m, "post_attention_layernorm") and hasattr(getattr(m, "mlp", None), "gate")
              and hasattr(m.mlp, "experts")]
    if not layers:
        raise MopeqError("no OLMoE-style MoE layer (post-attention norm, router, experts) found")
    for layer in layers:
        others = [name for name, child in layer.mlp.named_children()
                  if name not in ("gate", "experts") and any(True for _ in child.parameters())]
        if others:  # e.g. DeepSeek's shared experts read the normed input too
            raise MopeqError(f"the MoE block also feeds {others} from the post-attention norm: "
                             "the rescale would change what the model computes")
    return layers


def check(model: nn.Module) -> None:
    """Raise ``MopeqError`` unless ``spread_channels`` can rescale ``model`` exactly."""
    _moe_layers(model)


def draw_exponents(num_layers: int, hidden: int, exponents: Sequence[Sequence[int]],
                   seed: int) -> torch.Tensor:
    """The per-layer, per-channel exponents ``u`` (``[layers, hidden]``).

    Layer ``l`` draws each channel's exponent uniformly from ``exponents[l % len(exponents)]``.
    """
    if not exponents or any(not row or any(int(u) != u for u in row) for row in exponents):
        raise MopeqError("exponents must be non-empty sets of whole numbers per layer (powers "
                         f"of two stay exact in bf16): {exponents}")
    g = torch.Generator().manual_seed(seed)
    rows = []
    for layer in range(num_layers):
        options = torch.tensor([float(u) for u in exponents[layer % len(exponents)]])
        rows.append(options[torch.randint(0, len(options), (hidden,), generator=g)])
    return torch.stack(rows)


@torch.no_grad()
def spread_channels(model: nn.Module, exponents: Sequence[Sequence[int]],
                    seed: int, undo: bool = False) -> torch.Tensor:
    """Move a power-of-two gain per channel from the experts' inputs into the norm, in place.

    Returns the exponents applied (``[layers, hidden]``). ``undo`` moves the same draw's gains
    back (exactly: the trained weights again). The experts' fused ``gate_up_proj`` is
    ``[experts, 2 x ffn, hidden]`` (transformers 5's OLMoE layout).
    """
    layers = _moe_layers(model)
    hidden = layers[0].post_attention_layernorm.weight.numel()
    u = draw_exponents(len(layers), hidden, exponents, seed)
    for layer, row in zip(layers, u, strict=True):
        gain = (2.0 ** (-row if undo else row)).to(layer.post_attention_layernorm.weight.dtype)
        experts = layer.mlp.experts
        if experts.gate_up_proj.shape[-1] != hidden:
            raise MopeqError(f"experts' gate_up_proj {tuple(experts.gate_up_proj.shape)} does "
                             f"not end in the hidden size {hidden}")
        layer.post_attention_layernorm.weight.mul_(gain)
        layer.mlp.gate.weight.div_(gain)
        experts.gate_up_proj.div_(gain)
    return u


def apply_to(model: nn.Module, exponents: Sequence[Sequence[int]], seed: int) -> bool:
    """Spread a tiny VLM's channels once; record it in ``config.channel_gains``.

    Returns False (and changes nothing) when ``exponents`` is empty or the model's config says
    its channels were spread already (a resumed run must not apply it twice).
    """
    if not exponents or getattr(model.config, "channel_gains", None):
        return False
    spread_channels(model.language_model, exponents, seed)
    model.config.channel_gains = {"exponents": [list(row) for row in exponents], "seed": seed}
    return True
