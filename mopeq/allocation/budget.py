"""Budget allocation: per-expert bits minimising the predicted loss under a memory target.

The predicted loss is ``sum_e score_e * err_e(b_e)`` (HAWQ-V2 style; ``err`` from
``quant_errors``) under a target in average bits or GB; an exact dynamic programme when it is
small, else the convex-hull greedy with a certified gap (``knapsack``). When the scores carry
the method's own per-width errors (``Scores.errors``; ``mopeq.core.methods`` ``provides_errors``),
the predicted loss is ``sum_e eps_e(b_e)`` with those errors directly (``meta["loss_model"]``
says which was used; ``pareto`` and ``predicted_loss`` follow).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from mopeq.allocation.bitmap import AllocInputs, BitMap, new_map, scores_array
from mopeq.allocation.knapsack import _hull_steps, solve_mckp
from mopeq.allocation.loss_model import loss_table
from mopeq.core import defaults as D
from mopeq.core.errors import MopeqError
from mopeq.core.layout import MoELayout
from mopeq.core.memory import (
    FP_BITS,
    LayoutArrays,
    MemoryConfig,
    bit_set,
    expert_cost_table,
    fixed_bits,
)

if TYPE_CHECKING:
    from mopeq.allocation.allocate import AllocConfig


def _budget_costs(layout: MoELayout, config: AllocConfig) -> tuple[np.ndarray, int, str]:
    """Per-expert costs [L, E, B], the capacity, and the target as text."""
    bits = np.asarray(config.bits)
    if config.target_bits is not None:
        numel = LayoutArrays.of(layout).expert_numel
        if config.target_bits < bits[0] - 1e-9:
            raise MopeqError(f"target_bits={config.target_bits} is below the minimum "
                             f"achievable {bits[0]} (every expert at {bits[0]} bits)")
        cap = math.floor(config.target_bits * int(numel.sum()) + 1e-6)
        return numel[..., None] * bits, cap, f"{config.target_bits} average bits"
    costs = expert_cost_table(layout, config.bits, config.memory)
    fixed = fixed_bits(layout, config.memory)
    cap = math.floor(config.target_gb * 1e9 + 1e-3) * 8 - fixed  # 1e-3: float slack
    least = int(costs.min(-1).sum())
    if least > cap:
        raise MopeqError(f"target_gb={config.target_gb} is below the minimum achievable "
                         f"{math.ceil((least + fixed) / 8) / 1e9:.4g} GB (every expert at "
                         f"{bits[0]} bits, the rest at base {config.memory.base_bits} bits)")
    return costs, cap, f"{config.target_gb} GB"


def budget_map(inputs: AllocInputs, layout: MoELayout, config: AllocConfig) -> BitMap:
    """Bits minimising the predicted loss within the config's target."""
    s = inputs.s
    scores = s if inputs.scores is None else inputs.scores
    losses, model = loss_table(scores, inputs.errors, config.bits)
    costs, cap, target = _budget_costs(layout, config)
    b = len(config.bits)
    pick, info = solve_mckp(costs.reshape(-1, b), losses.reshape(-1, b), cap, config.solver)
    bits = np.asarray(config.bits)[pick].reshape(s.shape)
    meta = {"target": target, "predicted_loss": float(losses.reshape(-1, b)[
        np.arange(pick.size), pick].sum()), "negative_scores_clipped": int((s < 0).sum()),
        "loss_model": model, **info}
    return new_map(bits, layout, "budget", config, meta=meta)


def predicted_loss(bitmap: BitMap, scores, errors: np.ndarray | None,
                   bits: tuple[int, ...]) -> float:
    """``sum_e max(score_e, 0) * err_e(bits_e)``; experts kept at 16 bits count 0.

    With scores that carry their own errors (``method_errors``): ``sum_e eps_e(bits_e)``.

    Raises:
        MopeqError: if the map uses a width below 16 that ``bits`` does not hold.
    """
    bits = bit_set(bits)
    lookup = np.full(FP_BITS + 1, -1)
    lookup[list(bits)] = np.arange(len(bits))
    idx = lookup[bitmap.bits]
    if ((idx < 0) & (bitmap.bits < FP_BITS)).any():
        raise MopeqError(f"the map uses widths {sorted(set(bitmap.bits.ravel()) - set(bits))} "
                         f"that errors for {bits} do not cover")
    table, _ = loss_table(scores, errors, bits)
    loss = np.take_along_axis(table, np.maximum(idx, 0)[..., None], -1)[..., 0]
    return float(np.where(idx < 0, 0.0, loss).sum())


def pareto(scores, errors: np.ndarray, layout: MoELayout, bits: tuple[int, ...] = D.BITS,
           mem_config: MemoryConfig | None = None, n_points: int = 64) -> list[dict]:
    """The memory / predicted-loss frontier of per-expert allocations, cheapest first.

    Points are prefixes of the convex-hull greedy: each is optimal at its own memory, so
    ``allocate`` with ``method="budget", target_gb=point["gb"]`` reproduces it. About
    ``n_points`` points, evenly spaced in memory.

    Returns:
        Dicts with ``bytes``, ``gb``, ``gib``, ``avg_bits`` (routed experts, numel-weighted) and
        ``predicted_loss``.
    """
    mem, bits = mem_config or MemoryConfig(), bit_set(bits)
    scores_array(scores, layout)  # validates the shape
    b = len(bits)
    losses = loss_table(scores, errors, bits)[0].reshape(-1, b)
    costs = expert_cost_table(layout, bits, mem).reshape(-1, b)
    numel = LayoutArrays.of(layout).expert_numel.reshape(-1)
    nominal = numel[:, None] * np.asarray(bits)
    start, st = _hull_steps(costs, losses)
    rows = np.arange(len(costs))

    def path(table, delta):
        return table[rows, start].sum() + np.concatenate([[0], np.cumsum(delta)])

    cost = path(costs, st.dcost) + fixed_bits(layout, mem)
    loss = path(losses, -st.dgain)
    nb = path(nominal, nominal[st.item, st.to] - nominal[st.item, st.frm])
    want = np.linspace(cost[0], cost[-1], max(int(n_points), 2))
    idx = np.unique(np.searchsorted(cost, want, side="right") - 1)
    total = int(numel.sum())
    return [{"bytes": -(-int(cost[i]) // 8), "gb": int(-(-int(cost[i]) // 8)) / 1e9,
             "gib": int(-(-int(cost[i]) // 8)) / 2**30, "avg_bits": float(nb[i] / total),
             "predicted_loss": float(loss[i])} for i in idx]
