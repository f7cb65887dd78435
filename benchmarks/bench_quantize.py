"""Time to quantize the embedded model per mode (RTN vs tuned SignRound), and to evaluate it.

    python benchmarks/bench_quantize.py [--model embedded] [--repeats 3] [--iters 50]

Uses the paper's default map (frobenius closed form, k-means C=3, bits {2,3,4}, model-wise),
group size 128, base bits 4. Prints medians over ``--repeats`` runs and the ratio of each step
to the RTN quantization measured in the same process.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="embedded")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--pairs", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from mopeq.evaluation.evaluate import run_evaluation
    from mopeq.model.loading import load_model
    from mopeq.model.moe import discover
    from mopeq.quantize.autoround import QuantConfig, quantize
    from mopeq.workflow.spec import RunSpec
    from mopeq.workflow.workspace import Workspace, calibration_texts

    loaded = load_model(args.model)
    layout = discover(loaded.model)
    ws = Workspace(loaded, layout)
    scores = ws.profile(RunSpec(closed_form=True))
    alloc = ws.allocate(RunSpec(), scores)
    texts = calibration_texts(loaded)
    modes = {"rtn": QuantConfig(), "tuned": QuantConfig(mode="tuned", iters=args.iters)}
    times, models = {}, {}
    for name, config in modes.items():
        runs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            res = quantize(loaded.model, layout, alloc.bitmap, config,
                           tokenizer=loaded.processor, calib=texts)
            runs.append(time.perf_counter() - t)
        times[name], models[name] = statistics.median(runs), res.model
    import dataclasses

    evals = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        run_evaluation(dataclasses.replace(loaded, model=models["rtn"]), "synthetic",
                       pairs=args.pairs)
        evals.append(time.perf_counter() - t)
    times[f"evaluate {args.pairs} pairs"] = statistics.median(evals)
    print(f"model {args.model}: {layout.num_moe_layers} MoE layers x {layout.num_experts} "
          f"experts, map avg {alloc.bitmap.avg_bits:.2f} bits; medians of {args.repeats} runs, "
          f"{args.threads} thread(s)")
    for name, t in times.items():
        print(f"  {name:<24} {t:8.2f} s   ratio vs rtn {t / times['rtn']:6.2f}")


if __name__ == "__main__":
    main()
