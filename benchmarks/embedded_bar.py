"""The embedded model against its bar, on the held-out split, with 95 % intervals.

    python benchmarks/embedded_bar.py [--model embedded] [--pairs N] [--seed S]
                                      [--method measured] [--randoms 5]

Part 1, uniform bits: the 16-bit model, then round-to-nearest on the routed experts only
(symmetric, group 128, everything else 16-bit) at 4, 3 and 2 bits. The bar: 16-bit at
70-92 % of the maximum with no category at chance; 4-bit loses <= 2 %, 3-bit 3-12 %,
2-bit >= 15 % of the 16-bit score.

Part 2, allocation: at 2.5 and 3.0 average expert bits, the budget allocation driven by
``--method`` against ``--randoms`` random allocations with exactly the same bits (seeded
permutations of its map). The bar: the allocation beats the mean of the random ones by more
than the paired 95 % interval of the difference (bootstrap over the same images).

``--pairs`` takes a stratified subset (seeded by ``--seed``); default: the whole split.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


def _image_points(result) -> tuple[np.ndarray, np.ndarray]:
    """Per-image MME points (ordered by image) and each image's category."""
    from mopeq.evaluation import stats
    from mopeq.evaluation.evaluate import parse_answer

    keys = [(r["category"], str(r["question_id"]), r.get("question", ""), i)
            for i, r in enumerate(result.records)]
    right = [parse_answer(r["prediction"]) == str(r["answer"]).lower() for r in result.records]
    strata, (correct,) = stats.by_image(keys, right)
    return stats.image_scores(correct), strata


def versus_random(best, randoms) -> dict:
    """Paired interval of ``best - mean(randoms)`` (total score) over the same images."""
    from mopeq.evaluation import stats

    b, strata = _image_points(best)
    r = np.mean([_image_points(x)[0] for x in randoms], axis=0)
    _, (tb, tr) = stats.stratified_means([b, r], strata)
    diff = (tb - tr).sum(0)
    return {"best": best.score, "random_mean": float(np.mean([x.score for x in randoms])),
            "random_sd": float(np.std([x.score for x in randoms], ddof=1)),
            "delta": best.score - float(np.mean([x.score for x in randoms])),
            "delta_ci95": stats.percentile_interval(diff)}


def _ci(interval) -> str:
    return f"[{interval[0]:.0f}, {interval[1]:.0f}]"


def uniform_rows(loaded, layout, base, args) -> None:
    """Print the uniform-bits table (part 1)."""
    from mopeq.evaluation.evaluate import compare, run_evaluation
    from mopeq.quantize.autoround import QuantConfig, quantize

    maximum = 200.0 * len(base.per_category)
    cats = list(base.per_category)
    print(f"| model | score (95 % CI) | % of max | loss vs 16-bit (95 % CI) | McNemar p | "
          f"KL | {' | '.join(cats)} |")
    print("|---" * (len(cats) + 6) + "|")
    print(f"| 16-bit | {base.score:.0f} {_ci(base.score_ci95)} | {100 * base.score / maximum:.1f} "
          f"| — | — | — | " + " | ".join(f"{base.per_category[c]['score']:.0f}" for c in cats)
          + " |")
    config = QuantConfig(group_size=128, base_bits=16)  # routed experts only
    for bits in (4, 3, 2):
        grid = np.full((layout.num_moe_layers, layout.num_experts), bits)
        q = quantize(loaded.model, layout, grid, config, tokenizer=loaded.processor)
        res = run_evaluation(dataclasses.replace(loaded, model=q.model), "synthetic",
                             pairs=args.pairs, seed=args.seed)
        cmp = compare(base, res)
        lo, hi = cmp["score_delta_ci95"]
        loss = (f"{-100 * cmp['score_delta'] / base.score:.1f} % "
                f"[{-100 * hi / base.score:.1f}, {-100 * lo / base.score:.1f}]")
        print(f"| RTN {bits}-bit experts | {res.score:.0f} {_ci(res.score_ci95)} | "
              f"{100 * res.score / maximum:.1f} | {loss} | {cmp['p_value']:.2g} | "
              f"{cmp['kl']:.4f} | " + " | ".join(f"{res.per_category[c]['score']:.0f}"
                                                 for c in cats) + " |")


def allocation_rows(loaded, layout, base, args) -> None:
    """Print the allocation-vs-random table (part 2)."""
    from mopeq.workflow.spec import RunSpec
    from mopeq.workflow.workspace import Workspace

    ws = Workspace(loaded, layout)
    spec = RunSpec(score_method=args.method, base_bits=16, pairs=args.pairs,
                   eval_seed=args.seed)
    scores = ws.profile(spec)
    errors = ws.errors(spec)
    print(f"\n| avg expert bits | budget · {args.method} (95 % CI) | mean of {args.randoms} "
          "random (sd) | difference (paired 95 % CI) | beats random? |")
    print("|---|---|---|---|---|")
    for target in (2.5, 3.0):
        alloc = ws.allocate(spec.replace(alloc_method="budget", target_bits=target), scores,
                            errors=errors)

        def run(a, label):
            return ws.quantize_evaluate(spec, a, label=label).result

        best = run(alloc, f"budget {target}")
        randoms = [run(ws.allocate(spec.replace(alloc_method="random", seed=s), scores,
                                   reference=alloc.bitmap), f"random {s}")
                   for s in range(args.randoms)]
        v = versus_random(best, randoms)
        beats = "yes" if v["delta_ci95"][0] > 0 else "no (within noise)"
        print(f"| {alloc.bitmap.avg_bits:.2f} | {v['best']:.0f} {_ci(best.score_ci95)} | "
              f"{v['random_mean']:.0f} ({v['random_sd']:.0f}) | {v['delta']:+.0f} "
              f"{_ci(v['delta_ci95'])} | {beats} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="embedded")
    p.add_argument("--pairs", type=int, default=None, help="default: the whole held-out split")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified subset")
    p.add_argument("--method", default="measured", help="sensitivity driving the budget")
    p.add_argument("--randoms", type=int, default=5)
    p.add_argument("--skip-allocation", action="store_true")
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from mopeq.evaluation.evaluate import run_evaluation
    from mopeq.model.loading import load_model
    from mopeq.model.moe import discover

    loaded = load_model(args.model)
    layout = discover(loaded.model)
    base = run_evaluation(loaded, "synthetic", pairs=args.pairs, seed=args.seed)
    uniform_rows(loaded, layout, base, args)
    if not args.skip_allocation:
        allocation_rows(loaded, layout, base, args)
    print(f"\n{base.n_pairs} image pairs (subset seed {args.seed}), symmetric RTN, group 128 "
          "(auto-round iters=0), 1 thread")


if __name__ == "__main__":
    main()
