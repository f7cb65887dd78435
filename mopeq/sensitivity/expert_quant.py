"""Fake-quantize routed experts in place with the export's RTN, and restore them exactly.

The data-aware error methods (``measured``, ``block_error``) and the sensitivity report need the
model as it would be after round-to-nearest export, one expert or one bit map at a time. The
quantizer is ``allocation.qerror.rtn`` (bit-exact with auto-round's RTN); a projection that export
keeps in 16 bits because of its shape (``mopeq.core.memory.quantizable``) or a width of 16 is left
as it is. Weights are written through the views ``model.moe.expert_weights`` returns, so fused,
transposed fused and ``nn.ModuleList`` experts are all handled, and restored from exact copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from mopeq.allocation.qerror import rtn
from mopeq.core import defaults as D
from mopeq.core.layout import MoELayout
from mopeq.core.memory import FP_BITS, quantizable
from mopeq.model.moe import expert_weights


def quantized(weight: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """``weight`` [out, in] after RTN at ``bits`` (unchanged where export keeps it 16-bit)."""
    if bits >= FP_BITS or not quantizable(weight.shape[0], weight.shape[1], group_size):
        return weight.detach().clone()
    return rtn(weight, bits, group_size, sym).to(weight.dtype)


@contextmanager
def experts_quantized(model: nn.Module, layout: MoELayout, targets: dict[tuple[int, int], int],
                      group_size: int = D.GROUP_SIZE, sym: bool = D.SYM) -> Iterator[None]:
    """Within the block, every ``(row, expert) -> bits`` of ``targets`` is RTN-quantized.

    Args:
        model: the model (modified in place, restored on exit, also after an exception).
        layout: its MoE layout.
        targets: (MoE layer position, expert) -> bits.
        group_size: RTN group size along the input dimension (-1: one group per row).
        sym: symmetric (``int_sym``) or asymmetric RTN.
    """
    saved = []
    try:
        with torch.no_grad():
            for (row, expert), bits in targets.items():
                for w in expert_weights(model, layout, row, expert).values():
                    saved.append((w, w.detach().clone()))
                    w.copy_(quantized(w, bits, group_size, sym))
        yield
    finally:
        with torch.no_grad():
            for w, original in reversed(saved):
                w.copy_(original)


def expert_quantized(model: nn.Module, layout: MoELayout, row: int, expert: int, bits: int,
                     group_size: int = D.GROUP_SIZE, sym: bool = D.SYM):
    """``experts_quantized`` for one expert (a context manager)."""
    return experts_quantized(model, layout, {(row, expert): int(bits)}, group_size, sym)


def bitmap_quantized(model: nn.Module, layout: MoELayout, bits: np.ndarray,
                     group_size: int = D.GROUP_SIZE, sym: bool = D.SYM):
    """``experts_quantized`` for a whole [L, E] bit map (16 = kept; a context manager)."""
    bits = np.asarray(bits)
    targets = {(r, e): int(bits[r, e]) for r in range(bits.shape[0]) for e in range(bits.shape[1])
               if bits[r, e] < FP_BITS}
    return experts_quantized(model, layout, targets, group_size, sym)
