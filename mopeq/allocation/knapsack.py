"""Multiple-choice knapsack for the budget allocator: one option (bit width) per expert.

Minimise the summed loss of the chosen options subject to a capacity (bits of storage). Exact
by dynamic programming over capacity units for small problems; otherwise a greedy walk along
each item's lower convex hull, which is optimal for the LP relaxation, so its lower bound and
the gap to it are reported with every answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mopeq.core.errors import MopeqError

SOLVERS = ("auto", "dp", "greedy")
DP_MAX_CELLS = 2_000_000  # items x capacity units under which "auto" solves exactly ...
DP_MAX_ITEMS = 2048  # ... when there are no more experts than this (one numpy pass per item)


@dataclass(frozen=True)
class _Steps:
    """Upgrade steps along each item's lower convex hull, sorted by efficiency (best first)."""

    item: np.ndarray
    frm: np.ndarray
    to: np.ndarray
    dcost: np.ndarray
    dgain: np.ndarray
    level: np.ndarray


def _hull_steps(costs: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, _Steps]:
    """Start options (cheapest, least loss) and all hull steps (gift wrapping from the left)."""
    rows = np.arange(len(costs))
    start = np.argmin(np.where(costs == costs.min(1, keepdims=True), losses, np.inf), 1)
    cur, parts = start.copy(), []
    for level in range(costs.shape[1] - 1):
        dc = costs - costs[rows, cur][:, None]
        dg = losses[rows, cur][:, None] - losses
        eff = np.where((dc > 0) & (dg > 0), dg / np.maximum(dc, 1), -np.inf)
        nxt = eff.argmax(1)
        ok = eff[rows, nxt] > -np.inf
        if not ok.any():
            break
        i, j = rows[ok], nxt[ok]
        parts.append((i, cur[ok], j, dc[i, j], dg[i, j], np.full(len(i), level)))
        cur = np.where(ok, nxt, cur)
    cols = [np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, dtype)
            for k, dtype in enumerate((int, int, int, np.int64, float, int))]
    order = np.lexsort((cols[5], -(cols[4] / np.maximum(cols[3], 1))))
    return start, _Steps(*(c[order] for c in cols))


def _apply(pick: np.ndarray, steps: _Steps, k: int) -> None:
    for level in np.unique(steps.level[:k]):  # an item's later levels overwrite earlier ones
        m = steps.level[:k] == level
        pick[steps.item[:k][m]] = steps.to[:k][m]


def _mckp_greedy(costs: np.ndarray, losses: np.ndarray, capacity: int) -> tuple[np.ndarray, dict]:
    """Convex-hull greedy for the multiple-choice knapsack, with the LP lower bound.

    Any prefix of the efficiency-sorted hull steps is optimal at its own cost; after the first
    step that does not fit, later steps that still fit are added. The LP relaxation (prefix plus
    the fitting fraction of that step) bounds the optimum from below.
    """
    start, st = _hull_steps(costs, losses)
    pick = start.copy()
    rows = np.arange(len(costs))
    room = capacity - int(costs[rows, start].sum())
    cum = np.cumsum(st.dcost)
    k = int(np.searchsorted(cum, room, side="right"))
    _apply(pick, st, k)
    room -= int(cum[k - 1]) if k else 0
    loss = float(losses[rows, start].sum() - st.dgain[:k].sum())
    lower = loss - (room / st.dcost[k] * st.dgain[k] if k < len(cum) else 0.0)
    for idx in (k + 1 + np.nonzero(st.dcost[k + 1:] <= room)[0]).tolist():
        if st.dcost[idx] <= room and pick[st.item[idx]] == st.frm[idx]:
            pick[st.item[idx]] = st.to[idx]
            room -= int(st.dcost[idx])
            loss -= float(st.dgain[idx])
    return pick, {"solver": "greedy", "lower_bound": float(lower),
                  "gap_bound": float(max(loss - lower, 0.0))}


def _dp_units(costs: np.ndarray, capacity: int) -> tuple[np.ndarray, int]:
    """Extra cost over each item's cheapest option in units of their gcd, and the capacity."""
    extra = costs - costs.min(1, keepdims=True)
    unit = int(np.gcd.reduce(extra[extra > 0])) if (extra > 0).any() else 1
    room = capacity - int(costs.min(1).sum())
    return extra // unit, int(min(room // unit, int((extra // unit).max(1).sum())))


def _mckp_dp(units: np.ndarray, losses: np.ndarray, cap: int) -> tuple[np.ndarray, dict]:
    """Exact multiple-choice knapsack by dynamic programming over capacity units."""
    n, b = units.shape
    dp, choice = np.zeros(cap + 1), np.zeros((n, cap + 1), np.int8)
    for i in range(n):
        best = np.full(cap + 1, np.inf)
        for j in range(b):
            w = int(units[i, j])
            if w > cap:
                continue
            cand = dp[: cap + 1 - w] + losses[i, j]
            better = np.nonzero(cand < best[w:])[0] + w
            best[better] = cand[better - w]
            choice[i, better] = j
        dp = best
    pick, c = np.empty(n, int), cap
    for i in range(n - 1, -1, -1):
        pick[i] = choice[i, c]
        c -= int(units[i, pick[i]])
    loss = float(losses[np.arange(n), pick].sum())
    return pick, {"solver": "dp", "lower_bound": loss, "gap_bound": 0.0}


def solve_mckp(costs: np.ndarray, losses: np.ndarray, capacity: int,
               solver: str = "auto") -> tuple[np.ndarray, dict]:
    """Pick one option per item (rows) minimising total loss with total cost <= capacity.

    Args:
        costs: [N, B] integer costs.
        losses: [N, B] losses.
        capacity: the cost budget.
        solver: ``dp`` (exact), ``greedy`` (hull greedy, ``gap_bound`` certifies how far from
            optimal it can be) or ``auto`` (``dp`` when items x capacity units <= DP_MAX_CELLS
            and items <= DP_MAX_ITEMS).

    Returns:
        Option index per item, and {solver, lower_bound, gap_bound}.

    Raises:
        MopeqError: if even the cheapest options exceed the capacity.
    """
    costs = np.asarray(costs, dtype=np.int64)
    if int(costs.min(1).sum()) > capacity:
        raise MopeqError(f"infeasible: the cheapest choice costs {int(costs.min(1).sum())} "
                         f"> capacity {capacity}")
    units, cap = _dp_units(costs, capacity)
    cells = len(costs) * (cap + 1)
    if solver == "dp" and cells > 50 * DP_MAX_CELLS:
        raise MopeqError(f"solver 'dp' would need {cells:.3g} cells; use 'greedy' or 'auto'")
    if solver == "dp" or (solver == "auto" and cells <= DP_MAX_CELLS
                          and len(costs) <= DP_MAX_ITEMS):
        return _mckp_dp(units, losses, cap)
    return _mckp_greedy(costs, losses, capacity)
