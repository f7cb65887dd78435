"""The per-expert estimators behind ``mopeq.sensitivity.profile.profile``.

Each takes ``(model, layout, config, data, progress)`` and returns raw per-(MoE layer, expert)
arrays that ``profile`` turns into ``Scores``. Expert tensors are read in one canonical
[experts, out, in] view per projection whatever the storage (fused, transposed fused, or an
``nn.ModuleList`` of linears), so every layout gets identical probes and identical numbers.
``block_error`` and ``measured`` live in modules of their own; ``mopeq.core.methods`` rows name
each method's estimator.

The gradient methods check that the loss reaches the experts: a model whose expert path runs
under ``torch.no_grad`` (DeepSeek-VL2's remote-code ``moe_infer`` at inference) raises
``NoExpertGradient`` naming the cause instead of autograd's "element 0 of tensors does not
require grad".
"""

from __future__ import annotations

import math

import numpy as np
import torch

from mopeq.core.errors import MopeqError
from mopeq.core.layout import PROJECTIONS, MoELayout
from mopeq.model.moe import block_params, canonical, from_canonical
from mopeq.sensitivity.calibration import batch_loss, expert_grad_mode, route_counts

_CHUNK = 2**22  # elements of one frobenius probe batch (memory bound)

# --------------------------------------------------------------------------- expert tensors


def _numel(layout: MoELayout) -> np.ndarray:
    """Weights per projection [L, E, 3] (layouts have E experts in every MoE layer)."""
    return np.array([[e.shapes[p][0] * e.shapes[p][1] for p in PROJECTIONS]
                     for e in layout.experts], dtype=np.float64).reshape(
        layout.num_moe_layers, layout.num_experts, 3)


def _expert_params(model, layout) -> tuple[list[int], list[torch.Tensor]]:
    """Parameters per block (counts) and all expert parameters, flat."""
    per_block = [block_params(model, b) for b in layout.blocks]
    return [len(ps) for ps in per_block], [p for ps in per_block for p in ps]


def _split(per_proj: np.ndarray) -> dict[str, np.ndarray]:
    return {p: per_proj[..., i] for i, p in enumerate(PROJECTIONS)}


# --------------------------------------------------------------------------- frobenius


def _frobenius(model, layout, config, _data, progress) -> dict:
    """Per projection ``Tr(H)/n`` of ``||W||_F``: Hutchinson (unit Gaussian probes) or exact."""
    L, E = layout.num_moe_layers, layout.num_experts
    mean, var = np.zeros((L, E, 3)), np.zeros((L, E, 3))
    gen = torch.Generator().manual_seed(config.seed)
    probes = config.probes_for("frobenius")
    for row, block in enumerate(layout.blocks):
        with torch.no_grad():
            parts = canonical(block, block_params(model, block))
        for j, p in enumerate(PROJECTIONS):
            w = parts[p].detach().reshape(block.num_experts, -1).double()
            if config.closed_form:
                n = w.shape[1]
                mean[row, :block.num_experts, j] = ((n - 1) / (n * w.norm(dim=1))).numpy()
            else:
                m, v = _norm_hutchinson(w, probes, gen)
                mean[row, :block.num_experts, j], var[row, :block.num_experts, j] = m, v
        progress((row + 1) / L, f"frobenius: layer {block.layer}")
    stderr = None if config.closed_form else np.sqrt(var.sum(-1) / probes)
    return {"scores": mean.sum(-1), "parts": _split(mean), "stderr": stderr,
            "meta": {"probes": None if config.closed_form else probes,
                     "form": "closed" if config.closed_form else "hutchinson"}}


def _norm_hutchinson(w: torch.Tensor, probes: int, gen) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance over probes of ``v^T H v`` of ``||w_e||`` for each row ``w_e``.

    The proxy loss ``sum_e ||w_e||`` is separable, so one HVP gives every row's estimate; rows
    are processed in chunks of at most ``_CHUNK`` elements.
    """
    est = torch.empty(probes, w.shape[0], dtype=w.dtype)
    rows = max(1, _CHUNK // w.shape[1])
    for start in range(0, w.shape[0], rows):
        x = w[start:start + rows].clone().requires_grad_(True)
        with torch.enable_grad():
            g = torch.autograd.grad(x.norm(dim=1).sum(), x, create_graph=True)[0]
            for i in range(probes):
                v = torch.randn(x.shape, generator=gen).to(x.dtype)  # fp32 draws: 3x faster
                v /= v.norm(dim=1, keepdim=True)
                hv = torch.autograd.grad(g, x, grad_outputs=v, retain_graph=True)[0]
                est[i, start:start + rows] = (v * hv).sum(1)
    return est.mean(0).numpy(), est.var(0).numpy()


# --------------------------------------------------------------------------- gradients


class NoExpertGradient(MopeqError):
    """The calibration loss does not depend on the expert weights through autograd."""


def _no_grad_message(where: str) -> str:
    return (f"no gradient reaches the routed experts ({where}): the model computes its expert "
            "path under torch.no_grad (as DeepSeek-VL2's remote-code moe_infer does at "
            "inference), so hessian and fisher cannot differentiate the loss w.r.t. the expert "
            "weights. Use a forward-only method (block_error, measured) or a data-free one "
            "(frobenius), or load an implementation whose experts run with autograd")


def _grads(loss, params, layout, counts, create_graph: bool = False) -> tuple:
    """Gradients of the loss w.r.t. params; zeros for unused ones (unrouted ModuleList experts).

    Raises:
        NoExpertGradient: when the loss has no graph, or a whole MoE block got no gradient.
    """
    if not loss.requires_grad:
        raise NoExpertGradient(_no_grad_message("the loss does not require grad"))
    grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    start = 0
    for block, n in zip(layout.blocks, counts, strict=True):
        if all(g is None for g in grads[start:start + n]):
            raise NoExpertGradient(_no_grad_message(f"none reaches {block.experts_path}"))
        start += n
    return tuple(torch.zeros_like(p) if g is None else g
                 for g, p in zip(grads, params, strict=True))


def _hvp(g, params, flat) -> tuple:
    """Hessian-vector product from the first gradient ``g`` (entries without a graph add 0)."""
    live = [i for i, t in enumerate(g) if t.requires_grad]
    hv = torch.autograd.grad([g[i] for i in live], params, grad_outputs=[flat[i] for i in live],
                             retain_graph=True, allow_unused=True)
    return tuple(torch.zeros_like(p) if h is None else h for h, p in zip(hv, params, strict=True))


# --------------------------------------------------------------------------- data-aware


def _routing(model, layout, data, progress, share: float) -> np.ndarray:
    n = len(data.batches)
    return route_counts(model, layout, data.batches,
                        lambda k: progress(share * (k + 1) / n, "routing"))[0]


def _rademacher(blocks, shapes, gen, dtype) -> tuple[list, list[torch.Tensor]]:
    """One probe: canonical per-block parts and the flat list aligned with the parameters."""
    canon = [{p: torch.randint(0, 2, s, generator=gen).to(dtype).mul_(2).sub_(1)
              for p, s in shape.items()} for shape in shapes]
    flat = [t for block, c in zip(blocks, canon, strict=True) for t in from_canonical(block, c)]
    return canon, flat


def _slice_dots(layout, counts, canon_v, hv: list[torch.Tensor]) -> np.ndarray:
    """Per (layer, expert, projection) ``v . Hv`` of one probe; ``hv . hv`` without ``v``."""
    out = np.zeros((layout.num_moe_layers, layout.num_experts, 3))
    start = 0
    for row, (block, n) in enumerate(zip(layout.blocks, counts, strict=True)):
        parts = canonical(block, hv[start:start + n])
        start += n
        for j, p in enumerate(PROJECTIONS):
            v = parts[p] if canon_v is None else canon_v[row][p]
            out[row, :block.num_experts, j] = (v * parts[p]).sum((1, 2), dtype=torch.float64)
    return out


def _stop_index(dots: list[np.ndarray], tol: float, floor: int) -> int | None:
    """PyHessian's stopping rule, or None if it never fires.

    The first probe count >= ``floor`` at which the running mean of the total trace changed by
    less than ``tol`` relative to the previous running mean.
    """
    totals = np.cumsum([d.sum() for d in dots]) / np.arange(1, len(dots) + 1)
    for i in range(max(floor, 2), len(dots) + 1):
        if abs(totals[i - 1] - totals[i - 2]) / (abs(totals[i - 2]) + 1e-6) < tol:
            return i
    return None


def _hessian(model, layout, config, data, progress) -> dict:
    """Hutchinson traces of every expert from one HVP per probe (and calibration batch)."""
    tokens = _routing(model, layout, data, progress, 0.05)
    blocks, (counts, params) = list(layout.blocks), _expert_params(model, layout)
    shapes = [{p: t.shape for p, t in canonical(b, block_params(model, b)).items()}
              for b in blocks]
    cap = config.probes_for("hessian")
    floor, gen, dots, kept = min(config.min_probes, cap), torch.Generator(), [], {}
    gen.manual_seed(config.seed)
    weight = 1.0 / len(data.batches)
    stop = None
    with expert_grad_mode(model, params):
        while len(dots) < cap and stop is None:
            probes = [_rademacher(blocks, shapes, gen, params[0].dtype)
                      for _ in range(min(config.probes_per_pass, cap - len(dots)))]
            acc = [np.zeros((layout.num_moe_layers, layout.num_experts, 3)) for _ in probes]
            for k, batch in enumerate(data.batches):
                g = kept.get(k) or _first_grad(model, batch, params, config.loss, layout,
                                               counts)
                if len(data.batches) == 1:
                    kept[k] = g  # one batch: its graph serves every probe
                for a, (canon, flat) in zip(acc, probes, strict=True):
                    hv = _hvp(g, params, flat)
                    a += weight * _slice_dots(layout, counts, canon, hv)
            dots += acc
            stop = _stop_index(dots, config.tol, floor)
            progress(0.05 + 0.95 * len(dots) / cap, f"hessian: {len(dots)} probes")
    dots = np.stack(dots[:stop] if stop else dots)  # [P, L, E, 3]
    return _trace_result(dots, layout, tokens, converged=stop is not None, cap=cap)


def _first_grad(model, batch, params, loss, layout, counts) -> tuple[torch.Tensor, ...]:
    return _grads(batch_loss(model, batch, loss), params, layout, counts, create_graph=True)


def _trace_result(dots: np.ndarray, layout, tokens, converged: bool, cap: int) -> dict:
    n = _numel(layout).sum(-1)
    parts, total = dots.mean(0), dots.sum(-1)
    stderr = total.std(0, ddof=1) / math.sqrt(len(dots)) / n
    return {"scores": parts.sum(-1) / n, "parts": _split(parts / n[..., None]),
            "stderr": stderr, "trace_raw": parts.sum(-1), "tokens": tokens,
            "meta": {"probes": len(dots), "probe_cap": cap, "converged": converged,
                     "score_unit": "Tr(H_e)/n_e"}}


def _fisher(model, layout, config, data, progress) -> dict:
    """Empirical Fisher trace: mean over batches of the squared per-batch gradient."""
    tokens = _routing(model, layout, data, progress, 0.3)
    counts, params = _expert_params(model, layout)
    acc = np.zeros((layout.num_moe_layers, layout.num_experts, 3))
    with expert_grad_mode(model, params):
        for k, batch in enumerate(data.batches):
            grads = _grads(batch_loss(model, batch, config.loss), params, layout, counts)
            acc += _slice_dots(layout, counts, None, grads)
            progress(0.3 + 0.7 * (k + 1) / len(data.batches), f"fisher: batch {k + 1}")
    acc /= len(data.batches)
    n = _numel(layout).sum(-1)
    return {"scores": acc.sum(-1) / n, "parts": _split(acc / n[..., None]),
            "trace_raw": acc.sum(-1), "tokens": tokens, "meta": {"score_unit": "Tr(F_e)/n_e"}}


def _frequency(model, layout, _config, data, progress) -> dict:
    """Top-k assignments per expert; parts split each count by projection weight share."""
    tokens = _routing(model, layout, data, progress, 1.0)
    numel = _numel(layout)
    share = numel / np.maximum(numel.sum(-1, keepdims=True), 1)
    counts = tokens.astype(np.float64)
    return {"scores": counts, "parts": _split(counts[..., None] * share), "tokens": tokens,
            "meta": {"score_unit": "top-k assignments"}}

