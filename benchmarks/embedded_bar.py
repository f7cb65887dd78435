"""The embedded model against its bar, on the full held-out split (120 images per category).

    python benchmarks/embedded_bar.py [--model embedded] [--group-size 128] [--pairs N]

Rows: the 16-bit model, then uniform round-to-nearest on the routed experts only (everything
else stays 16-bit) at 4, 3 and 2 bits, symmetric, the given group size. The bar: 16-bit average
per category >= 170 with no category below 150; 4-bit loses <= 5 points of that average; 2-bit
loses >= 20. Also prints answer-level KL to the 16-bit model and the answer flip rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="embedded")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--pairs", type=int, default=None, help="default: all 600 images")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from mopeq.evaluate import compare, run_evaluation
    from mopeq.models import load_model
    from mopeq.moe import discover
    from mopeq.quantize import QuantConfig, quantize

    loaded = load_model(args.model)
    layout = discover(loaded.model)
    base = run_evaluation(loaded, "synthetic", pairs=args.pairs)
    rows = [("16-bit", base, None)]
    config = QuantConfig(group_size=args.group_size, base_bits=16)  # routed experts only
    for bits in (4, 3, 2):
        grid = np.full((layout.num_moe_layers, layout.num_experts), bits)
        q = quantize(loaded.model, layout, grid, config, tokenizer=loaded.processor)
        res = run_evaluation(dataclasses.replace(loaded, model=q.model), "synthetic",
                             pairs=args.pairs)
        rows.append((f"RTN {bits}-bit experts", res, compare(base, res)))
    cats = list(base.per_category)
    print(f"| model | {' | '.join(cats)} | average | total | delta avg | KL | flips |")
    print("|---" * (len(cats) + 6) + "|")
    avg0 = base.score / len(cats)
    for name, res, cmp in rows:
        avg = res.score / len(cats)
        extra = ("—", "—") if cmp is None else (f"{cmp['kl']:.4f}", f"{cmp['flip_rate']:.3f}")
        print(f"| {name} | " + " | ".join(f"{res.per_category[c]['score']:.1f}" for c in cats)
              + f" | {avg:.1f} | {res.score:.1f} | {avg - avg0:+.1f} | {extra[0]} | {extra[1]} |")
    print(f"\n{base.n_pairs} image pairs, group size {args.group_size}, symmetric RTN "
          f"(auto-round iters=0), {args.threads} thread(s)")


if __name__ == "__main__":
    main()
