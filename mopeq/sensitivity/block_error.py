"""MoE block output error of each expert quantized alone: ``block_error`` and ``block_fisher``.

What ``block_error`` measures. For MoE layer l, routed expert e and candidate width b::

    ε_e(b) = Σ_{calibration tokens t routed to e}  g_e(x_t)² ‖E_e^{Q_b}(x_t) − E_e(x_t)‖²

where ``x_t`` is the expert's input, ``g_e(x_t)`` the routing weight that multiplies its output,
``E_e`` the expert and ``Q_b`` the export's RTN quantizer (``sensitivity.expert_quant``). Quantizing
expert e alone changes the block's output on exactly the tokens routed to it, by
``Δ_t = g_e (E_e^q − E_e)(x_t)``, so ε_e(b) is the exact squared change of that layer's output
summed over the (non-padding) calibration tokens. It does not follow the change through later
layers, and it weighs every token and direction alike.

What ``block_fisher`` measures: the same exact Δ, weighted by the curvature of the answer
distribution at the layer output (Gauss-Newton / Fisher, so it cannot go negative)::

    ε_e(b) = 1/(2N) · mean_s Σ_sequences ( Σ_{t in the sequence} ∇_{y_t} log p(ŷ_s) · Δ_t )²

with ``ŷ_s`` answers sampled from the model itself at the N labelled positions (``fisher_samples``
samples, seeded), ``y_t`` the MoE layer's output at token t. Its expectation over the samples is
the second-order (Fisher) approximation of the KL to the 16-bit model that ``measured`` computes,
per labelled token, for a change at this layer alone.

How. One forward pass with hooks records, per MoE layer, each expert's inputs and routing
weights: from the fused experts module's own arguments ``(hidden, top_k_index, top_k_weights)``;
for Llama4's pre-scaled sorted input ``[E * tokens, H]`` the rows of expert e with weight 1; for
an ``nn.ModuleList`` the router's input and its (weights, indices), or softmax-top-k of its
logits (renormalised when the config sets ``norm_topk_prob``). ``block_fisher`` adds one backward
per sample to the layer outputs (no weight gradients, so it also works when the expert path runs
under ``torch.no_grad``). Then, one MoE layer at a time, each expert is evaluated on its tokens
at 16 bits and quantized at every width: widths x (tokens x top-k) expert evaluations.

``errors`` is ε [L, E, widths]; ``scores`` is ε at the lowest width; the parts split it by the
projections' weight share.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from mopeq.core.errors import MopeqError
from mopeq.core.layout import MoEBlock, MoELayout
from mopeq.model.moe import expert_weights, text_config
from mopeq.sensitivity.calibration import (
    IGNORE,
    _token_mask,
    eval_kernels,
    model_inputs,
    router_module,
)
from mopeq.sensitivity.expert_quant import expert_quantized


class _Recorder:
    """Per (MoE layer, expert): input rows, routing weights, row and sequence ids (CPU)."""

    def __init__(self, layout: MoELayout):
        def grid():
            return [[[] for _ in range(layout.num_experts)] for _ in layout.blocks]
        self.inputs, self.weights, self.rows, self.seqs = grid(), grid(), grid(), grid()
        self.grads: list[list[torch.Tensor]] = [[] for _ in layout.blocks]  # [samples, rows, H]
        self.mask: torch.Tensor | None = None
        self.row_offset = self.seq_offset = self.seq_len = 0

    def _ids(self, n: int) -> torch.Tensor:
        r = torch.arange(n)
        return r[self.mask] if self.mask is not None and self.mask.numel() == n else r

    def _append(self, row: int, e: int, x, w, r) -> None:
        self.inputs[row][e].append(x.detach().cpu())
        self.weights[row][e].append(w.detach().cpu())
        self.rows[row][e].append(r + self.row_offset)
        self.seqs[row][e].append(r // max(self.seq_len, 1) + self.seq_offset)

    def add(self, row: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> None:
        """Rows ``x`` [T, H] with their top-k indices and weights [T, k]."""
        r = self._ids(x.shape[0])
        x, idx, w = x[r], idx[r], w[r]
        for e in torch.unique(idx).tolist():
            if 0 <= e < len(self.inputs[row]):
                tok, pos = torch.nonzero(idx == e, as_tuple=True)
                self._append(row, e, x[tok], w[tok, pos], r[tok])

    def add_sorted(self, row: int, x: torch.Tensor) -> None:
        """Llama4: ``x`` [E * T, H], rows of expert e already scaled by its router score."""
        per = x.reshape(len(self.inputs[row]), -1, x.shape[-1])
        r = self._ids(per.shape[1])
        for e in range(per.shape[0]):
            rows = per[e][r]
            keep = rows.abs().amax(-1) > 0  # unrouted tokens have a zero score
            self._append(row, e, rows[keep], torch.ones(int(keep.sum()), dtype=rows.dtype),
                         r[keep])

    def get(self, row: int, e: int) -> dict | None:
        """Expert e of MoE layer ``row``: x, g, global rows, sequence ids (None if no tokens)."""
        if not self.inputs[row][e]:
            return None
        cat = lambda lists: torch.cat(lists[row][e])  # noqa: E731
        out = {"x": cat(self.inputs), "g": cat(self.weights), "rows": cat(self.rows),
               "seqs": cat(self.seqs)}
        return out if len(out["x"]) else None

    def n_tokens(self, row: int, e: int) -> int:
        """Token assignments recorded for expert e of MoE layer ``row``."""
        return sum(len(c) for c in self.weights[row][e])


def routing(output, top_k: int | None, norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k weights, top-k indices) [T, k] from a router's output (tuple or logits)."""
    if isinstance(output, tuple):
        ints = [t for t in output if torch.is_tensor(t) and not t.is_floating_point()]
        if ints:
            idx = ints[-1].reshape(-1, ints[-1].shape[-1])
            floats = [t for t in output if torch.is_tensor(t) and t.is_floating_point()
                      and t.numel() == idx.numel()]
            if floats:
                return floats[-1].reshape(idx.shape), idx
        output = output[0]
    if top_k is None:
        raise MopeqError("router returns logits but the layout has no top_k")
    probs = output.reshape(-1, output.shape[-1]).float().softmax(-1)
    w, idx = probs.topk(top_k, dim=-1)
    if norm:
        w = w / w.sum(-1, keepdim=True)
    return w.to(output.dtype), idx


def _fused_hook(rec: _Recorder, row: int):
    def hook(_module, args, kwargs):
        values = list(args) + list(kwargs.values())
        x = values[0]
        if len(values) == 1:
            rec.add_sorted(row, x)
            return
        idx = next(v for v in values[1:] if torch.is_tensor(v) and not v.is_floating_point())
        w = next(v for v in values[1:] if torch.is_tensor(v) and v.is_floating_point()
                 and v.shape == idx.shape)
        flat = x.reshape(-1, x.shape[-1])
        rec.add(row, flat, idx.reshape(flat.shape[0], -1), w.reshape(flat.shape[0], -1))
    return hook


def _router_hook(rec: _Recorder, row: int, top_k, norm: bool):
    def hook(_module, args, output):
        w, idx = routing(output, top_k, norm)
        rec.add(row, args[0].reshape(-1, args[0].shape[-1]), idx, w)
    return hook


def _output_hook(outputs: list, row: int):
    """Keep the block output (made a graph leaf when nothing upstream requires grad)."""
    def hook(_module, _args, output):
        y = output[0] if isinstance(output, tuple) else output
        if not y.requires_grad:
            y = y.detach().requires_grad_()
        y.retain_grad()
        outputs[row] = y
        return (y, *output[1:]) if isinstance(output, tuple) else y
    return hook


def _install(model: nn.Module, layout: MoELayout, rec: _Recorder, outputs: list | None) -> list:
    norm = bool(getattr(text_config(getattr(model, "config", None)), "norm_topk_prob", False))
    handles = []
    for row, block in enumerate(layout.blocks):
        if block.fused:
            experts = model.get_submodule(block.experts_path)
            handles.append(experts.register_forward_pre_hook(_fused_hook(rec, row),
                                                             with_kwargs=True))
        else:
            handles.append(router_module(model, block).register_forward_hook(
                _router_hook(rec, row, layout.top_k, norm)))
        if outputs is not None:
            block_module = model.get_submodule(block.path)
            handles.append(block_module.register_forward_hook(_output_hook(outputs, row)))
    return handles


@contextmanager
def _frozen(model: nn.Module):
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


def _sampled_loglik(logits: torch.Tensor, labels: torch.Tensor, gen) -> torch.Tensor:
    """Sum of log p(ŷ) at the labelled positions, ŷ drawn from the model (detached)."""
    keep = labels[:, 1:] != IGNORE
    logp = logits[:, :-1][keep].float().log_softmax(-1)
    draw = torch.multinomial(logp.detach().exp(), 1, generator=gen)[:, 0]
    return logp[torch.arange(len(draw)), draw].sum()


def _fisher_grads(rec, outputs, logits, batch, samples: int, gen) -> None:
    for s in range(samples):
        for y in outputs:
            y.grad = None
        _sampled_loglik(logits, batch["labels"], gen).backward(retain_graph=s < samples - 1)
        for row, y in enumerate(outputs):
            g = torch.zeros_like(y) if y.grad is None else y.grad
            g = g.detach().reshape(-1, g.shape[-1]).cpu()
            if s == 0:
                rec.grads[row].append(torch.empty(samples, *g.shape, dtype=g.dtype))
            rec.grads[row][-1][s] = g


def _run_batch(model, rec, outputs, batch, samples: int, gen) -> int:
    rec.mask = _token_mask(batch).reshape(-1)
    rec.seq_len = batch["input_ids"].shape[1]
    out = model(**model_inputs(batch), use_cache=False)
    if samples:
        _fisher_grads(rec, outputs, out.logits, batch, samples, gen)
    rec.row_offset += batch["input_ids"].numel()
    rec.seq_offset += batch["input_ids"].shape[0]
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def record(model: nn.Module, layout: MoELayout, batches: list[dict], fisher_samples: int = 0,
           seed: int = 0) -> tuple[_Recorder, int]:
    """One pass recording every expert's inputs and routing weights (and layer-output grads).

    Returns the recorder and the number of labelled positions.
    """
    rec = _Recorder(layout)
    outputs = [None] * layout.num_moe_layers if fisher_samples else None
    handles = _install(model, layout, rec, outputs)
    dtype = next(model.get_submodule(layout.blocks[0].experts_path).parameters()).dtype
    gen, labelled = torch.Generator().manual_seed(seed), 0
    try:
        with _frozen(model), eval_kernels(model, dtype), torch.set_grad_enabled(
                bool(fisher_samples)):
            for batch in batches:
                labelled += _run_batch(model, rec, outputs, batch, fisher_samples, gen)
    finally:
        for h in handles:
            h.remove()
    for row in range(len(rec.grads)):
        rec.grads[row] = torch.cat(rec.grads[row], 1) if rec.grads[row] else []
    return rec, labelled


def expert_function(model: nn.Module, layout: MoELayout, row: int, e: int):
    """The expert as a function of its input rows (reads the weights at call time).

    Fused experts: ``down(act(gate x) * up x)`` with the experts module's ``act_fn`` (SiLU
    when it has none); a ModuleList expert: its own ``forward``.
    """
    block: MoEBlock = layout.blocks[row]
    experts = model.get_submodule(block.experts_path)
    if not block.fused:
        return experts[e]
    act = getattr(experts, "act_fn", None) or nn.functional.silu

    def run(x: torch.Tensor) -> torch.Tensor:
        w = expert_weights(model, layout, row, e)
        return (act(x @ w["gate"].t()) * (x @ w["up"].t())) @ w["down"].t()
    return run


def _error(delta: torch.Tensor, rec_e: dict, grads, n_labelled: int) -> float:
    """Squared output change (no grads) or its Fisher-weighted form (grads [S, rows, H])."""
    if grads is None or not len(grads):
        return float((delta ** 2).sum())
    proj = (grads[:, rec_e["rows"]].to(torch.float64) * delta).sum(-1)  # [S, n]
    seqs = torch.unique(rec_e["seqs"], return_inverse=True)[1]
    per_seq = torch.zeros(proj.shape[0], int(seqs.max()) + 1, dtype=torch.float64)
    per_seq.index_add_(1, seqs, proj)
    return float((per_seq ** 2).sum(1).mean()) / (2 * max(n_labelled, 1))


def layer_errors(model, layout, rec: _Recorder, row: int, config, n_labelled: int = 0):
    """ε [E, widths] of one MoE layer (experts without tokens: 0)."""
    out = np.zeros((layout.num_experts, len(config.bits)))
    dtype = next(model.get_submodule(layout.blocks[row].experts_path).parameters()).dtype
    with torch.no_grad():
        for e in range(layout.blocks[row].num_experts):
            rec_e = rec.get(row, e)
            if rec_e is None:
                continue
            x, g = rec_e["x"].to(dtype), rec_e["g"].to(torch.float64)[:, None]
            fn = expert_function(model, layout, row, e)
            ref = fn(x)
            for j, b in enumerate(config.bits):
                with expert_quantized(model, layout, row, e, b, config.group_size, config.sym):
                    delta = g * (fn(x) - ref).to(torch.float64)
                out[e, j] = _error(delta, rec_e, rec.grads[row], n_labelled)
    return out


def _estimate(model, layout, config, data, progress, samples: int, name: str) -> dict:
    from mopeq.sensitivity.estimators import _numel, _split

    rec, labelled = record(model, layout, data.batches, samples, config.seed)
    progress(0.2, f"{name}: expert inputs recorded")
    errors = np.zeros((layout.num_moe_layers, layout.num_experts, len(config.bits)))
    for row in range(layout.num_moe_layers):
        errors[row] = layer_errors(model, layout, rec, row, config, labelled)
        progress(0.2 + 0.8 * (row + 1) / layout.num_moe_layers,
                 f"{name}: layer {layout.blocks[row].layer}")
    tokens = np.array([[rec.n_tokens(r, e) for e in range(layout.num_experts)]
                       for r in range(layout.num_moe_layers)], dtype=np.int64)
    numel = _numel(layout)
    share = numel / np.maximum(numel.sum(-1, keepdims=True), 1)
    scores = errors[..., 0]
    unit = ("Fisher-weighted layer-output change (approx. KL per labelled token)" if samples
            else "squared change of the MoE layer output")
    return {"scores": scores, "parts": _split(scores[..., None] * share), "tokens": tokens,
            "errors": errors, "meta": {"score_unit": f"{unit}, lowest width",
                                       "error_unit": unit, "fisher_samples": samples or None}}


def _block_error(model, layout, config, data, progress) -> dict:
    return _estimate(model, layout, config, data, progress, 0, "block_error")


def _block_fisher(model, layout, config, data, progress) -> dict:
    return _estimate(model, layout, config, data, progress, config.fisher_samples,
                     "block_fisher")
