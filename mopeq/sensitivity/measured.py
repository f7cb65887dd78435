"""``measured``: the ground-truth sensitivity, one expert RTN-quantized at a time.

For every MoE layer l, routed expert e and candidate width b, the expert alone is quantized with
the export's quantizer (``sensitivity.expert_quant``: RTN at ``config.group_size`` / ``config.sym``)
and the calibration data is run. Recorded, over the labelled next-token positions of all
batches (token-weighted means):

- ``errors[l, e, b]`` = KL(p_16bit || p_quantized) of the model's next-token distribution (for
  the embedded VLM the labels are the answer tokens: the answer KL). This is ε_e(b), the error
  the budget allocator adds up (``mopeq.allocation.allocate``, no score x error product);
- ``extras["loss_increase"][l, e, b]`` = CE(quantized) - CE(16 bit) of the labels (can be < 0).

``scores`` is the KL at the lowest candidate width. The per-projection parts split it by the
projections' share of the expert's weights (projections are not quantized separately). The
weights are restored exactly after every pass. Experts that no calibration token reaches are
not run: quantizing them cannot change the output, so their error is exactly 0.

Cost: (active experts x widths) forward passes over the calibration data. ``measured_cost``
times one pass and returns the estimate; ``profile`` reports it through ``on_progress`` before
the first pass and refuses (``CostTooHigh``) when it exceeds ``config.max_cost_s``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from mopeq.core.errors import MopeqError
from mopeq.sensitivity.calibration import IGNORE, eval_kernels, model_inputs, route_counts
from mopeq.sensitivity.expert_quant import expert_quantized


class CostTooHigh(MopeqError):
    """The estimated cost of ``measured`` exceeds ``ProfileConfig.max_cost_s``."""


@dataclass(frozen=True)
class CostEstimate:
    """Forward passes over the calibration data and the time they are expected to take."""

    passes: int
    seconds_per_pass: float

    @property
    def seconds(self) -> float:
        """Estimated wall time of all passes."""
        return self.passes * self.seconds_per_pass

    def message(self) -> str:
        """One line for a progress report."""
        return (f"measured: {self.passes} forward passes x {self.seconds_per_pass:.3g} s "
                f"= about {self.seconds:.0f} s")


def _dtype(model, layout) -> torch.dtype:
    return next(model.get_submodule(layout.blocks[0].experts_path).parameters()).dtype


def _labelled_logp(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities [N, V] at the labelled next-token positions, and the labels [N]."""
    logits = model(**model_inputs(batch), use_cache=False).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    keep = labels != IGNORE
    logits = logits[keep].to(torch.promote_types(logits.dtype, torch.float32))
    return logits.log_softmax(-1), labels[keep]


def _reference(model, data) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [_labelled_logp(model, b) for b in data.batches]


def _compare(model, data, ref) -> tuple[float, float]:
    """Token-weighted mean KL(ref || model) and mean CE change over the calibration data."""
    kl = dce = 0.0
    n = sum(len(labels) for _, labels in ref)
    for batch, (logp0, labels) in zip(data.batches, ref, strict=True):
        logp, _ = _labelled_logp(model, batch)
        kl += float((logp0.exp() * (logp0 - logp)).sum(-1).sum(dtype=torch.float64))
        rows = torch.arange(len(labels))
        dce += float((logp0[rows, labels] - logp[rows, labels]).sum(dtype=torch.float64))
    return max(kl / max(n, 1), 0.0), dce / max(n, 1)


def _active(model, layout, data) -> np.ndarray:
    return route_counts(model, layout, data.batches)[0]


def _timed_reference(model, data):
    start = time.perf_counter()
    ref = _reference(model, data)
    return ref, time.perf_counter() - start


def measured_cost(model, layout, config, data) -> CostEstimate:
    """The estimated cost of ``measured`` (runs the routing pass and one timed pass).

    Args:
        model: the model.
        layout: its MoE layout.
        config: a ``ProfileConfig`` (its ``bits``).
        data: the calibration data.
    """
    with torch.no_grad(), eval_kernels(model, _dtype(model, layout)):
        tokens = _active(model, layout, data)
        _, seconds = _timed_reference(model, data)
    return CostEstimate(int((tokens > 0).sum()) * len(config.bits), seconds)


def _measured(model, layout, config, data, progress) -> dict:
    bits = config.bits
    L, E = layout.num_moe_layers, layout.num_experts
    kl, dce = np.zeros((L, E, len(bits))), np.zeros((L, E, len(bits)))
    with torch.no_grad(), eval_kernels(model, _dtype(model, layout)):
        tokens = _active(model, layout, data)
        ref, seconds = _timed_reference(model, data)
        cost = CostEstimate(int((tokens > 0).sum()) * len(bits), seconds)
        progress(0.0, cost.message())
        if config.max_cost_s is not None and cost.seconds > config.max_cost_s:
            raise CostTooHigh(f"{cost.message()}, over max_cost_s={config.max_cost_s}; raise "
                              "max_cost_s (None: no limit) to confirm, or use block_error")
        done = 0
        for row, e in zip(*np.nonzero(tokens > 0), strict=True):
            for j, b in enumerate(bits):
                with expert_quantized(model, layout, int(row), int(e), b, config.group_size,
                                      config.sym):
                    kl[row, e, j], dce[row, e, j] = _compare(model, data, ref)
                done += 1
                progress(done / max(cost.passes, 1), f"measured: layer {row} expert {e} {b}-bit")
    return _result(kl, dce, tokens, layout, cost)


def _result(kl, dce, tokens, layout, cost: CostEstimate) -> dict:
    from mopeq.sensitivity.estimators import _numel, _split

    numel = _numel(layout)
    share = numel / np.maximum(numel.sum(-1, keepdims=True), 1)
    scores = kl[..., 0]
    return {"scores": scores, "parts": _split(scores[..., None] * share), "tokens": tokens,
            "errors": kl, "extras": {"loss_increase": dce},
            "meta": {"score_unit": "answer KL at the lowest width",
                     "error_unit": "KL(p_16bit || p_quantized) per labelled token",
                     "passes": cost.passes, "seconds_per_pass": round(cost.seconds_per_pass, 4),
                     "estimated_s": round(cost.seconds, 2)}}
