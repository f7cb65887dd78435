"""Speed of ``memory.estimate`` and k-means allocation at DeepSeek-V3 scale (no weights).

    python benchmarks/bench_allocate_memory.py [--repeats 15] [--threads 1]

Builds the DeepSeek-V3 layout from its config on the meta device (61 decoder layers, the first
3 dense: 58 MoE layers x 256 routed experts + 1 shared) and times, as medians over
``--repeats`` runs after one warm-up call:

- ``estimate`` (goal < 5 ms) against a baseline measured in the same process: the same
  arithmetic as a plain Python loop over every expert projection and tensor;
- ``allocate`` k-means, model-wise, C=3, n_init=10 (goal < 100 ms) against scikit-learn's
  ``KMeans`` with the same C, n_init and random_state on the same scores (the paper's tool),
  both on ``--threads`` BLAS/OpenMP threads.

Other allocation steps the app runs on every change are listed for scale, and the Pareto
frontier at the embedded model's size. Scores and errors are synthetic (seeded).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout
from mopeq.allocation.allocate import AllocConfig, allocate  # noqa: E402
from mopeq.allocation.bitmap import snap_per_layer  # noqa: E402
from mopeq.allocation.budget import pareto  # noqa: E402
from mopeq.core.layout import MoELayout  # noqa: E402
from mopeq.core.memory import MemoryConfig, estimate  # noqa: E402
from mopeq.model.moe import discover, layout_from_config  # noqa: E402


def v3_layout() -> MoELayout:
    from transformers import DeepseekV3Config

    config = DeepseekV3Config(hidden_size=7168, intermediate_size=18432,
                              moe_intermediate_size=2048, n_routed_experts=256,
                              n_shared_experts=1, num_hidden_layers=61, first_k_dense_replace=3,
                              num_experts_per_tok=8, vocab_size=129280)
    return layout_from_config(config)


def tiny_layout() -> MoELayout:
    from mopeq.embedded import tiny

    model, _ = tiny.new_model(tiny.TinyRecipe())
    return discover(model)


def median_ms(fn, repeats: int) -> float:
    fn()  # warm-up: memoised layout arrays, lazy imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def naive_estimate(layout: MoELayout, bits: np.ndarray, cfg: MemoryConfig) -> int:
    """The baseline: the same storage rules, one projection / tensor at a time."""
    def one(out: int, inp: int, b: int) -> int:
        ok = out % 32 == 0 and inp % 32 == 0 and inp % cfg.group_size == 0 and b < 16
        return out * inp * b + out * math.ceil(inp / cfg.group_size) * (16 + b) if ok \
            else out * inp * 16

    rows = {layer: r for r, layer in enumerate(layout.moe_layers)}
    total = sum(one(o, i, int(bits[rows[e.layer], e.expert]))
                for e in layout.experts for o, i in e.shapes.values())
    for t in layout.tensors:
        base = t.linear and t.component in ("attention", "dense_mlp", "shared_experts", "other")
        total += one(t.shape[0], t.shape[1], cfg.base_bits) if base else t.numel * 16
    return -(-total // 8)


def synthetic_inputs(shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = rng.lognormal(size=shape)
    errors = rng.uniform(0.5, 2.0, size=(*shape, 1)) * 4.0 ** -np.array([2, 3, 4])
    return scores, errors


def sklearn_kmeans(scores: np.ndarray, threads: int):
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    def run():
        with threadpool_limits(threads):
            return KMeans(3, n_init=10, random_state=0).fit(scores.reshape(-1, 1))
    return run


def row(name: str, ms: float, base: float | None = None, base_name: str = "",
        goal: float | None = None) -> None:
    text = f"{name:<34} median {ms:9.3f} ms"
    if base is not None:
        text += f"   (baseline {base_name} {base:9.3f} ms, ratio {ms / base:.4f})"
    if goal is not None:
        text += f"   goal < {goal:g} ms: {'met' if ms < goal else 'MISSED'}"
    print(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    start = time.perf_counter()
    layout = v3_layout()
    print(f"DeepSeek-V3 layout from config: {layout.num_moe_layers} MoE layers x "
          f"{layout.num_experts} routed experts ({len(layout.experts)} experts, "
          f"{layout.params()['total'] / 1e9:.1f} B params), built in "
          f"{time.perf_counter() - start:.2f} s; repeats={args.repeats}, threads={args.threads}")
    scores, errors = synthetic_inputs((layout.num_moe_layers, layout.num_experts))
    cfg, mem = AllocConfig(), MemoryConfig()
    bitmap = allocate(scores, layout, cfg)
    est = estimate(layout, bitmap, mem)
    assert naive_estimate(layout, bitmap.bits, mem) == est.total_bytes
    print(f"k-means map: avg {bitmap.avg_bits:.3f} bits -> {est.gb:.1f} GB "
          f"({est.ratio:.2f}x smaller than bf16 {est.bf16_bytes / 1e9:.1f} GB)\n")

    row("estimate", median_ms(lambda: estimate(layout, bitmap, mem), args.repeats),
        median_ms(lambda: naive_estimate(layout, bitmap.bits, mem), max(3, args.repeats // 5)),
        "python loop", goal=5)
    row("allocate kmeans, model-wise", median_ms(lambda: allocate(scores, layout, cfg),
                                                 args.repeats),
        median_ms(sklearn_kmeans(scores, args.threads), args.repeats), "sklearn KMeans",
        goal=100)
    layer_cfg = AllocConfig(scope="layer")
    row("allocate kmeans, layer-wise", median_ms(lambda: allocate(scores, layout, layer_cfg),
                                                 args.repeats))
    budget = AllocConfig(method="budget", target_bits=3.0)
    row("allocate budget 3.0 bits (greedy)",
        median_ms(lambda: allocate(scores, layout, budget, errors=errors), args.repeats))
    row("pareto, 64 points", median_ms(lambda: pareto(scores, errors, layout, (2, 3, 4), mem),
                                       args.repeats))
    row("snap_per_layer (mean)", median_ms(lambda: snap_per_layer(bitmap, layout),
                                           args.repeats))
    small = tiny_layout()
    s_scores, s_errors = synthetic_inputs((small.num_moe_layers, small.num_experts))
    row(f"pareto, embedded {small.num_moe_layers}x{small.num_experts}",
        median_ms(lambda: pareto(s_scores, s_errors, small, (2, 3, 4), mem), args.repeats))


if __name__ == "__main__":
    main()
