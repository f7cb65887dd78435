"""Per-expert quantization error ||Q_b(W) - W||^2 by round-to-nearest (auto-round's RTN).

The budget allocator predicts an expert's loss at b bits as ``score x error(b)`` (HAWQ-V2).
Errors come from the weights alone and are cached by model fingerprint.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mopeq.core import cache
from mopeq.core import defaults as D
from mopeq.core.errors import MopeqError
from mopeq.core.layout import MoELayout
from mopeq.core.memory import FP_BITS, LayoutArrays, bit_set, quantizable

QUANT_ERRORS_VERSION = 1


def rtn(weight, bits: int, group_size: int = D.GROUP_SIZE, sym: bool = D.SYM):
    """Round-to-nearest quantize-dequantize of a 2-D [out, in] weight, as auto-round's int RTN.

    Groups run along the input dim (``group_size=-1``: one per row); scales are fp16. ``sym``
    follows ``int_sym`` (signed range, the larger-magnitude extreme maps to -2**(b-1)); else
    ``int_asym`` (unsigned range with a zero point). Computed in float32; bit-exact with
    auto-round 0.16 ``quant_tensor_sym`` / ``quant_tensor_asym`` on float32 weights.
    """
    import torch

    w = weight.detach().float()
    g = w.shape[1] if group_size == -1 else group_size
    if w.dim() != 2 or w.shape[1] % g:
        raise MopeqError(f"rtn needs a 2-D weight whose in_features divide by {g}, "
                         f"got {tuple(w.shape)}")
    x = w.reshape(-1, g)
    wmin, wmax = torch.aminmax(x, dim=-1)
    wmin, wmax = wmin.clamp(max=0), wmax.clamp(min=0)
    if sym:
        maxq = 2 ** (bits - 1)
        scale = (torch.where(wmax < -wmin, -wmin, -wmax) / maxq).half()
        scale = torch.where(scale < 0, scale.clamp(max=-1e-5), scale.clamp(min=1e-5))
        scale = scale.float()[:, None]
        q = (x / scale).round().clamp(-maxq, maxq - 1)
        return (q * scale).reshape(w.shape)
    maxq = 2**bits - 1
    scale = ((wmax - wmin) / maxq).half().clamp(min=1e-5).float()[:, None]
    zp = (-wmin[:, None] / scale).round()
    q = ((x / scale).round() + zp).clamp(0, maxq)
    return (scale * (q - zp)).reshape(w.shape)


def quant_errors(model, layout: MoELayout, bits: tuple[int, ...] = D.BITS,
                 group_size: int = D.GROUP_SIZE, sym: bool = D.SYM, fingerprint: str | None = None,
                 on_progress: Callable[[float, str], None] | None = None) -> np.ndarray:
    """[L, E, B] ``||Q_b(W) - W||_F^2`` summed over each expert's gate/up/down (sorted ``bits``).

    A projection that stays 16-bit because of its shape (``mopeq.core.memory.quantizable``) and a
    width of 16 add 0. Cached through ``mopeq.core.cache`` when ``fingerprint`` is given.
    """
    bits = bit_set(bits)
    key = None
    if fingerprint is not None:
        key = cache.make_key("quant_errors", {"fingerprint": fingerprint, "bits": list(bits),
                                              "group_size": group_size, "sym": sym},
                             QUANT_ERRORS_VERSION)
        hit = cache.load("quant_errors", key)
        if hit is not None and hit.arrays.get("errors") is not None:
            return hit.arrays["errors"]
    errors = _compute_errors(model, layout, bits, group_size, sym, on_progress)
    if key is not None:
        cache.save("quant_errors", key, {"bits": list(bits), "group_size": group_size,
                                         "sym": sym}, {"errors": errors})
    return errors


def _compute_errors(model, layout: MoELayout, bits: tuple[int, ...], group_size: int, sym: bool,
                    on_progress: Callable[[float, str], None] | None) -> np.ndarray:
    import torch

    from mopeq.model.moe import expert_weights

    shape = LayoutArrays.of(layout).shape
    errors = np.zeros((*shape, len(bits)))
    with torch.no_grad():
        for row in range(shape[0]):
            for e in range(shape[1]):
                for w in expert_weights(model, layout, row, e).values():
                    if not quantizable(w.shape[0], w.shape[1], group_size):
                        continue
                    for j, b in enumerate(bits):
                        if b < FP_BITS:
                            errors[row, e, j] += float(((rtn(w, b, group_size, sym)
                                                         - w.float()) ** 2).sum())
            if on_progress is not None:
                on_progress((row + 1) / shape[0], f"quantization errors: layer {row + 1}")
    return errors
