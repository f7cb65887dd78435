"""Benchmark of sensitivity.profile, printed as ratios measured in one run (same model, same batch).

1. ``hessian``: time per probe for all per-expert traces (``profile``) vs a PyHessian-style
   global trace loop (one double-backward HVP per probe over the same expert parameters, one
   shared first-backward graph). Per-probe time is the slope between two probe counts, so the
   fixed cost (routing pass, first backward) cancels; the total at the larger count is shown too.
   Goal: <= 1.2x.
2. ``frobenius``: closed form vs Hutchinson (100 probes): speed ratio, max relative difference.
3. Wall time of ``profile`` per method on the model with default settings.

Usage: python benchmarks/bench_sensitivity.py [--model embedded|random] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mopeq.core.layout import PROJECTIONS
from mopeq.embedded import tiny
from mopeq.model import moe
from mopeq.model.loading import EMBEDDED_DIR, load_model  # noqa: E402
from mopeq.sensitivity import calibration  # noqa: E402
from mopeq.sensitivity.profile import ProfileConfig, profile  # noqa: E402


def load(which: str):
    if which == "default":
        which = "embedded" if (EMBEDDED_DIR / "config.json").exists() else "random"
    if which == "embedded":
        loaded = load_model("embedded")
        return loaded.model, loaded.processor, "embedded (trained, assets/tiny-moe-vlm)"
    model, processor = tiny.new_model(tiny.TinyRecipe())
    return model.eval(), processor, "random tiny VLM (TinyRecipe() architecture, untrained)"


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def pyhessian_loop(model, layout, batch, probes: int, seed: int = 0) -> float:
    """Global Hutchinson trace: one shared graph, one HVP per probe, one global dot product."""
    params = [p for b in layout.blocks for p in moe.block_params(model, b)]
    gen = torch.Generator().manual_seed(seed)
    trace = 0.0
    with calibration.expert_grad_mode(model, params):
        loss = calibration.batch_loss(model, batch)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        for _ in range(probes):
            v = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in params]
            hv = torch.autograd.grad(grads, params, grad_outputs=v, retain_graph=True)
            trace += sum(float((a * b).sum()) for a, b in zip(v, hv, strict=True))
    return trace / probes


def bench_hessian(model, layout, data, low: int, high: int, repeats: int) -> dict:
    def ours(p):
        cfg = ProfileConfig(probes=p, min_probes=p, tol=0, probes_per_pass=p, use_cache=False)
        return lambda: profile(model, layout, "hessian", cfg, data)

    def theirs(p):
        return lambda: pyhessian_loop(model, layout, data.batches[0], p)

    t = {(name, p): best_of(repeats, f(p)) for name, f in (("ours", ours), ("pyhessian", theirs))
         for p in (low, high)}
    per_probe = {n: (t[(n, high)] - t[(n, low)]) / (high - low) for n in ("ours", "pyhessian")}
    return {"probes": [low, high], "ours_s": t[("ours", high)],
            "pyhessian_s": t[("pyhessian", high)],
            "ours_per_probe_ms": 1e3 * per_probe["ours"],
            "pyhessian_per_probe_ms": 1e3 * per_probe["pyhessian"],
            "per_probe_ratio": per_probe["ours"] / per_probe["pyhessian"],
            "total_ratio": t[("ours", high)] / t[("pyhessian", high)]}


def bench_frobenius(model, layout, repeats: int) -> dict:
    run = {}
    for form in ("closed", "hutchinson"):
        cfg = ProfileConfig(closed_form=form == "closed", use_cache=False)
        run[form] = (best_of(repeats, lambda c=cfg: profile(model, layout, "frobenius", c)),
                     profile(model, layout, "frobenius", cfg))
    closed, hutch = run["closed"][1], run["hutchinson"][1]
    return {"closed_s": run["closed"][0], "hutchinson_s": run["hutchinson"][0],
            "speedup": run["hutchinson"][0] / run["closed"][0],
            "max_rel_diff": float(np.max(np.abs(hutch.scores / closed.scores - 1))),
            "max_rel_diff_per_projection": float(max(
                np.max(np.abs(hutch.per_projection[p] / closed.per_projection[p] - 1))
                for p in PROJECTIONS))}


def bench_methods(model, layout, data) -> dict:
    out = {}
    settings = {"frobenius (closed)": ("frobenius", ProfileConfig(closed_form=True)),
                "frobenius (hutchinson)": ("frobenius", ProfileConfig()),
                "hessian": ("hessian", ProfileConfig()), "fisher": ("fisher", ProfileConfig()),
                "frequency": ("frequency", ProfileConfig())}
    for name, (method, cfg) in settings.items():
        cfg = ProfileConfig(**{**cfg.__dict__, "use_cache": False})
        start = time.perf_counter()
        s = profile(model, layout, method, cfg, data)
        out[name] = {"wall_s": time.perf_counter() - start, "probes": s.meta.get("probes"),
                     "coverage": s.meta.get("coverage"), "n_negative": s.meta["n_negative"]}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default", choices=["default", "embedded", "random"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--images", type=int, default=8, help="images per calibration batch")
    ap.add_argument("--batches", type=int, default=4, help="calibration batches (part 3)")
    ap.add_argument("--probes", type=int, nargs=2, default=[8, 32], help="low, high")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, processor, which = load(args.model)
    layout = moe.discover(model)
    one = calibration.calibration_batches(model, processor, 1, args.images, seed=0)
    data = calibration.calibration_batches(model, processor, args.batches, args.images, seed=0)
    print(f"model: {which}; torch {torch.__version__}, {args.threads} thread(s)")
    print(f"hessian batch: {one.description} ({one.n_tokens} tokens)")
    result = {"model": which, "threads": args.threads,
              "hessian": bench_hessian(model, layout, one, *args.probes, args.repeats),
              "frobenius": bench_frobenius(model, layout, args.repeats)}
    h, f = result["hessian"], result["frobenius"]
    print(f"[1] hessian per probe: per-expert {h['ours_per_probe_ms']:.1f} ms vs PyHessian-style "
          f"global {h['pyhessian_per_probe_ms']:.1f} ms -> ratio {h['per_probe_ratio']:.2f}x "
          f"(goal <= 1.2x); totals at {args.probes[1]} probes {h['ours_s']:.2f} s vs "
          f"{h['pyhessian_s']:.2f} s -> {h['total_ratio']:.2f}x")
    print(f"[2] frobenius: closed {1e3 * f['closed_s']:.1f} ms vs Hutchinson(100) "
          f"{1e3 * f['hutchinson_s']:.0f} ms -> closed form {f['speedup']:.0f}x faster; "
          f"max rel. diff {f['max_rel_diff']:.1e} "
          f"(per projection {f['max_rel_diff_per_projection']:.1e})")
    print(f"[3] profile wall time, {data.description} ({data.n_tokens} tokens):")
    result["methods"] = bench_methods(model, layout, data)
    for name, m in result["methods"].items():
        print(f"    {name:24s} {m['wall_s']:7.2f} s  probes={m['probes']}  "
              f"coverage={m['coverage']}  negative={m['n_negative']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
