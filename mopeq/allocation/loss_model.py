"""The budget allocator's loss model: predicted loss of every expert at every width.

Two models (``loss_table``):

- the method's own errors, when the scores carry them (``Scores.errors`` of ``measured``,
  ``block_error``, ``block_fisher``): ε_e(b) is used as it is;
- otherwise HAWQ-V2's product ``max(score_e, 0) x ||Q_b(W_e) - W_e||^2`` with the RTN weight
  errors of ``mopeq.allocation.qerror.quant_errors``.
"""

from __future__ import annotations

import numpy as np

from mopeq.core.errors import MopeqError
from mopeq.core.memory import bit_set


def _as_array(scores) -> np.ndarray:
    return np.asarray(getattr(scores, "scores", scores), dtype=float)


def _errors_array(errors, shape: tuple[int, int], bits: tuple[int, ...]) -> np.ndarray:
    if errors is None:
        raise MopeqError("method 'budget' needs errors=quant_errors(model, layout, bits) "
                         "(an [L, E, len(bits)] array)")
    e = np.asarray(errors, dtype=float)
    if e.shape != (*shape, len(bits)):
        raise MopeqError(f"errors have shape {e.shape}, expected {(*shape, len(bits))} "
                         f"(MoE layers x experts x bits {bits})")
    if not np.isfinite(e).all() or (e < 0).any():
        raise MopeqError("errors must be finite and >= 0")
    return e


def method_errors(scores, bits: tuple[int, ...]) -> np.ndarray | None:
    """The scores' own ε_e(b) [L, E, len(bits)] for ``bits``, or None if they carry none.

    Raises:
        MopeqError: if the scores' errors do not cover every width of ``bits``.
    """
    errors = getattr(scores, "errors", None)
    if errors is None:
        return None
    have = list(getattr(scores, "error_bits", None) or [])
    missing = [b for b in bit_set(bits) if b not in have]
    if missing:
        raise MopeqError(f"the {getattr(scores, 'method', '')} scores hold errors for widths "
                         f"{have}, not {missing}: recompute them with ProfileConfig(bits=...)")
    return np.asarray(errors, dtype=float)[..., [have.index(b) for b in bit_set(bits)]]


def loss_table(scores, errors: np.ndarray | None, bits: tuple[int, ...]) -> tuple[np.ndarray, str]:
    """Predicted loss [L, E, B] of every expert at every width, and which model gave it."""
    own = method_errors(scores, bits)
    if own is not None:
        return _errors_array(own, own.shape[:2], bit_set(bits)), "method errors"
    s = _as_array(scores)
    return np.clip(s, 0, None)[..., None] * _errors_array(errors, s.shape, bits), \
        "score x RTN error"


