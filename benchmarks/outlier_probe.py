"""How much RTN costs the embedded model under a choice of outlier channels (validation split).

    python benchmarks/outlier_probe.py [--exponents="-3,0,0,0;-2,0,0,0"] [--seed 0]
                                       [--per-category 80] [--model DIR]

Takes a trained tiny VLM *without* outlier channels (default: the shipped one with its channels
undone, which gives back the trained weights bit for bit), spreads its channels with the given
per-layer exponent sets (``;`` between layers, cycled; ``embedded.outliers.spread_channels``;
default: the recipe's ``tiny.CHANNEL_EXPONENTS``; ``--exponents=0`` for none),
and prints the loss of uniform symmetric RTN on the routed experts (group 128, everything else
16-bit) at 4, 3 and 2 bits, on ``eval_split(per_category, seed=1)`` — the validation split the
recipe was chosen on, never the held-out split the bar is measured on. This is how
``tiny.CHANNEL_EXPONENTS`` was picked (README, "The embedded model").
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
    p.add_argument("--exponents", default=None,
                   help='per-layer sets, e.g. --exponents="-3,0,0,0;-2,0,0,0"; "0": none')
    p.add_argument("--seed", type=int, default=0, help="seed of the channel draws")
    p.add_argument("--per-category", type=int, default=80)
    p.add_argument("--model", default="embedded")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    from mopeq.embedded import outliers
    from mopeq.embedded.synthetic import eval_split
    from mopeq.embedded.tiny import CHANNEL_EXPONENTS, VALIDATION_SEED
    from mopeq.evaluation.evaluate import compare, run_evaluation
    from mopeq.model.loading import load_model
    from mopeq.model.moe import discover
    from mopeq.quantize.autoround import QuantConfig, quantize

    text = args.exponents or ";".join(",".join(map(str, row)) for row in CHANNEL_EXPONENTS)
    sets = [[int(x) for x in part.split(",")] for part in text.split(";")]
    loaded = load_model(args.model)
    recorded = loaded.model.config.channel_gains
    if recorded:  # back to the trained weights first
        outliers.spread_channels(loaded.model.language_model, recorded["exponents"],
                                 recorded["seed"], undo=True)
    outliers.spread_channels(loaded.model.language_model, sets, args.seed)
    layout = discover(loaded.model)
    samples = eval_split(args.per_category, seed=VALIDATION_SEED)
    base = run_evaluation(loaded, samples)
    print(f"exponents {text} (seed {args.seed}), {len(samples)} validation pairs: "
          f"16-bit {base.score:.0f} {[round(x) for x in base.score_ci95]}")
    for bits in (4, 3, 2):
        grid = np.full((layout.num_moe_layers, layout.num_experts), bits)
        q = quantize(loaded.model, layout, grid, QuantConfig(group_size=128, base_bits=16),
                     tokenizer=loaded.processor)
        res = run_evaluation(dataclasses.replace(loaded, model=q.model), samples)
        c = compare(base, res)
        lo, hi = (-100 * x / base.score for x in reversed(c["score_delta_ci95"]))
        print(f"  RTN {bits}-bit experts: {res.score:.0f}, loses "
              f"{-100 * c['score_delta'] / base.score:.1f} % [{lo:.1f}, {hi:.1f}], "
              f"KL {c['kl']:.4f}", flush=True)


if __name__ == "__main__":
    main()
