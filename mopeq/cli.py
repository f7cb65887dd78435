"""``python -m mopeq``: headless commands over the same library functions the app uses.

User errors print one line to stderr and exit 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mopeq.core import methods

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=str))


def _load(args):
    from mopeq.model.loading import load_model

    return load_model(args.model, trust_remote_code=getattr(args, "trust_remote_code", False))


# --------------------------------------------------------------------------- commands


def cmd_inspect(args) -> int:
    """Print the MoE layout of a model."""
    _, layout = _layout(args)
    info = layout.to_json()
    if args.json:
        _print_json(info)
        return 0
    print(f"model type      {info['model_type']}")
    print(f"MoE layers      {info['num_moe_layers']} (decoder layers {info['moe_layers']})")
    print(f"routed experts  {info['num_experts']} per layer, top-{info['top_k']}")
    print(f"shared experts  {info['num_shared_experts']}")
    print(f"expert storage  {'fused 3-D tensors' if info['fused'] else 'module list'}")
    print("parameters by component:")
    for comp, n in info["params"].items():
        print(f"  {comp:<16}{n:>14,}")
    return 0


def cmd_train_tiny(args) -> int:
    """Train the embedded tiny VLM from its recipe."""
    import torch

    from mopeq.embedded import tiny, training

    out = Path(args.out).resolve()
    assets = (Path(__file__).resolve().parent.parent / "assets").resolve()
    if (out == assets or assets in out.parents) and not args.overwrite_assets:
        raise ValueError(f"--out {args.out} is inside assets/ (the shipped model); pass "
                              "--overwrite-assets to replace it on purpose")
    torch.set_num_threads(args.threads)
    recipe = tiny.TinyRecipe(seed=args.seed)
    if args.steps:
        recipe = recipe.scaled(args.steps)
    start = time.perf_counter()
    log = training.train(args.out, recipe, minutes=args.minutes, init_from=args.init_from,
                         start_phase=args.start_phase, checkpoint_every=args.checkpoint_every,
                         eval_every=args.eval_every,
                         on_progress=lambda _step, point: print(point, flush=True))
    print(json.dumps({"wall_minutes": round((time.perf_counter() - start) / 60, 2),
                      "stopped_early": log["stopped_early"], "out": args.out}))
    return 0


def cmd_evaluate(args) -> int:
    """Quick MME(-style) evaluation of a model."""
    from mopeq.evaluation.evaluate import run_evaluation

    result = run_evaluation(_load(args), args.dataset, pairs=args.pairs, seed=args.seed)
    out = result.to_json()
    if args.json:
        _print_json(out)
    else:
        for cat, v in out["per_category"].items():
            print(f"{cat:<24} acc {v['acc']:.3f}  acc+ {v['acc_plus']:.3f}  "
                  f"score {v['score']:6.1f}  ({v['n_pairs']} pairs)")
        print(f"{'total':<24} score {out['score']:.1f} over {out['n_pairs']} image pairs "
              f"in {out['elapsed_s']:.2f} s")
    return 0


def _layout(args):
    """Layout of ``--model``: from the weights, or from a config-only folder (meta device)."""
    from mopeq.model.moe import discover, layout_from_config

    path = Path(args.model)
    if path.is_dir() and (path / "config.json").exists() and not any(path.glob("*.safetensors")):
        from transformers import AutoConfig

        from mopeq.model.loading import native_arch

        native = native_arch(json.loads((path / "config.json").read_text()))
        if native is not None and hasattr(native, "meta_model"):  # e.g. MolmoE, from its config
            return None, discover(native.meta_model(path))

        return None, layout_from_config(AutoConfig.from_pretrained(
            path, trust_remote_code=getattr(args, "trust_remote_code", False)))
    loaded = _load(args)
    return loaded, discover(loaded.model)


def _bits_arg(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"bits must be comma-separated integers, got {text!r}") from None


def _read_json(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


def _read_scores(path: str):
    from mopeq.sensitivity.profile import Scores

    d = _read_json(path)
    if "scores" in d:
        return Scores.from_json(d)
    return Scores.load(path)


def _read_bitmap(path: str):
    from mopeq.allocation.bitmap import BitMap

    d = _read_json(path)
    if "bits" not in d:
        raise ValueError(f"{path} has no 'bits': not a bit map (write one with 'mopeq allocate')")
    return BitMap.from_json({"method": "file", **d})  # a hand-written {"bits": ...} is fine


def cmd_profile(args) -> int:
    """Per-expert sensitivity scores."""
    from mopeq.sensitivity.profile import ProfileConfig
    from mopeq.workflow.pipeline import CalibConfig, sensitivity

    loaded, layout = _layout(args)
    if loaded is None:
        raise ValueError("profiling needs weights; this folder holds only a config")
    config = ProfileConfig(probes=args.probes, seed=args.seed, closed_form=args.closed_form,
                           normalize_per_layer=args.normalize, group_size=args.group_size,
                           max_cost_s=args.max_cost_s or None)
    scores = sensitivity(loaded, layout, args.method, config, CalibConfig(seed=args.seed),
                         on_progress=None if args.json else _stderr_progress)
    out = scores.to_json()
    if args.out:
        Path(args.out).write_text(json.dumps(out, default=str))
    if args.json:
        _print_json(out)
    else:
        _print_grid(f"{args.method} scores (rows: MoE layers {layout.moe_layers})", scores.scores)
        print("from cache (computed earlier)" if out["cache_hit"] else
              f"computed in {out['elapsed_s']:.2f} s")
    return 0


def _stderr_progress(fraction: float, message: str) -> None:
    print(f"[{fraction:5.1%}] {message}", file=sys.stderr, flush=True)


def _print_grid(title: str, grid) -> None:
    print(title)
    for row in grid:
        print("  " + " ".join(f"{x:9.3g}" for x in row))


def _alloc_config(args):
    from mopeq.allocation.allocate import AllocConfig
    from mopeq.core.memory import MemoryConfig

    return AllocConfig(method=args.method, clusters=args.clusters, bits=args.bits,
                       scope=args.scope, log_scores=args.log_scores,
                       target_bits=args.target_bits, target_gb=args.target_gb,
                       uniform_bits=args.uniform_bits, seed=args.seed,
                       memory=MemoryConfig(group_size=args.group_size, base_bits=args.base_bits))


def cmd_allocate(args) -> int:
    """Bits per expert from a scores file."""
    from mopeq.workflow.pipeline import allocation, errors_for

    scores = _read_scores(args.scores)
    loaded, layout = _layout(args)
    config = _alloc_config(args)
    errors = None
    if args.method == "budget":
        if loaded is None:
            raise ValueError("budget allocation needs the weights (quantization errors)")
        errors = errors_for(loaded, layout, config.bits, args.group_size)
    result = allocation(scores, layout, config, snap=args.snap, errors=errors)
    out = result.to_json()
    out["layers"] = layout.moe_layers
    if args.out:
        Path(args.out).write_text(json.dumps(out, default=str))
    if args.json:
        _print_json(out)
    else:
        _print_grid(f"bits ({result.bitmap.method}; rows: MoE layers {layout.moe_layers})",
                    result.bitmap.bits)
        m = result.memory
        print(f"average bits {result.bitmap.avg_bits:.3f}; deployable on fused-MoE engines: "
              f"{result.bitmap.deployable_fused}; memory {m.gb:.6f} GB ({m.ratio:.2f}x vs bf16)")
    return 0


def cmd_memory(args) -> int:
    """Memory estimate of a bit map on a model (a config-only folder is enough)."""
    from mopeq.core.memory import MemoryConfig, estimate

    _, layout = _layout(args)
    bitmap = _read_bitmap(args.bitmap)
    est = estimate(layout, bitmap, MemoryConfig(group_size=args.group_size,
                                                base_bits=args.base_bits))
    out = est.to_json()
    if args.json:
        _print_json(out)
    else:
        print(f"total {est.total_bytes:,} bytes = {est.gb:.4f} GB = {est.gib:.4f} GiB "
              f"({est.ratio:.2f}x smaller than bf16 {est.bf16_bytes:,} bytes)")
        print(f"bits per quantized weight {est.avg_bits_quantized:.3f}, over all weights "
              f"{est.avg_bits_all:.3f}")
        for comp, n in est.breakdown.items():
            print(f"  {comp:<20}{n:>16,} bytes")
    return 0


def cmd_quantize(args) -> int:
    """Quantize with a bit map and export checkpoint + recipe + snippets."""
    from mopeq.core.memory import MemoryConfig, estimate
    from mopeq.quantize.autoround import QuantConfig, quantize
    from mopeq.quantize.export import export
    from mopeq.workflow.pipeline import calibration_texts

    loaded, layout = _layout(args)
    if loaded is None:
        raise ValueError("quantizing needs weights; this folder holds only a config")
    bitmap = _read_bitmap(args.bitmap)
    config = QuantConfig(mode=args.mode, group_size=args.group_size, base_bits=args.base_bits,
                         iters=args.iters)
    calib = calibration_texts(loaded) if args.mode == "tuned" else None
    result = quantize(loaded.model, layout, bitmap, config, tokenizer=loaded.processor,
                      calib=calib, on_progress=None if args.json else _stderr_progress)
    mem = estimate(layout, bitmap, MemoryConfig(group_size=args.group_size,
                                                base_bits=args.base_bits))
    out_dir = export(result, layout, args.out, source=loaded.source,
                     fingerprint=loaded.fingerprint, bitmap_json=bitmap.to_json(),
                     memory=mem.to_json(), processor=loaded.processor)
    info = {"out": str(out_dir), "quantize_s": round(result.elapsed_s, 2),
            "levels_ok": result.levels_ok, "avg_bits": bitmap.avg_bits,
            "deployable_fused": bitmap.deployable_fused, "estimated_bytes": mem.total_bytes}
    if args.json:
        _print_json(info)
    else:
        print(f"quantized in {info['quantize_s']} s; bits verified: {result.levels_ok}; "
              f"wrote {out_dir}")
    return 0


def cmd_study(args) -> int:
    """The comparison study: MoPEQ vs baselines vs the peer on one model and subset."""
    from mopeq.workflow.study import run_study

    loaded = _load(args)
    table = run_study(loaded, pairs=args.pairs, seed=args.seed, out_dir=args.out,
                      random_seeds=args.random_seeds, group_size=args.group_size,
                      on_progress=_stderr_progress)
    print(table)
    if not args.no_report:  # the study carries the sensitivity-quality table too
        from mopeq.sensitivity.report import ReportConfig, sensitivity_report, write_report

        report = sensitivity_report(loaded, ReportConfig(group_size=args.group_size,
                                                         pairs=args.pairs),
                                    on_progress=_stderr_progress)
        print(f"\nsensitivity quality: {write_report(report, args.out)}")
    return 0


def cmd_sensitivity_report(args) -> int:
    """Every sensitivity method against the measured ground truth (markdown + JSON)."""
    from mopeq.sensitivity.report import ReportConfig, markdown, sensitivity_report, write_report

    config = ReportConfig(methods=args.methods, targets=args.targets, group_size=args.group_size,
                          n_batches=args.n_batches, batch_size=args.batch_size, pairs=args.pairs)
    report = sensitivity_report(_load(args), config, on_progress=_stderr_progress)
    out = write_report(report, args.out)
    print(markdown(report))
    print(f"wrote {out / 'sensitivity_report.md'} and .json", file=sys.stderr)
    return 0


def _names_arg(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for n in names:
        if n not in methods.NAMES:
            raise argparse.ArgumentTypeError(f"unknown method {n!r}; choose from {methods.NAMES}")
    return names


def _floats_arg(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}") from None


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    p = argparse.ArgumentParser(prog="mopeq", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp):
        sp.add_argument("--model", default="embedded",
                        help="'embedded', a local folder, or a hub id")
        sp.add_argument("--trust-remote-code", action="store_true",
                        help="allow the model's own code to run (only for models you trust)")
        sp.add_argument("--json", action="store_true", help="print one JSON object")

    sp = sub.add_parser("inspect", help="show the MoE layout of a model")
    model_args(sp)
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("train-tiny", help="train the embedded tiny MoE VLM")
    sp.add_argument("--out", required=True)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--steps", type=int, default=None,
                    help="shorten the recipe to this many steps in all (quick runs)")
    sp.add_argument("--minutes", type=float, default=None, help="wall-time cap per phase")
    sp.add_argument("--init-from", default=None, help="resume from a saved model folder")
    sp.add_argument("--start-phase", type=int, default=0, help="first phase to run")
    sp.add_argument("--threads", type=int, default=1)
    sp.add_argument("--checkpoint-every", type=int, default=None,
                    help="also save DIR/checkpoints/phaseP-stepN every N steps")
    sp.add_argument("--eval-every", type=int, default=500,
                    help="steps between validation points of the training curve")
    sp.add_argument("--overwrite-assets", action="store_true",
                    help="allow --out inside assets/ (replaces the shipped model)")
    sp.set_defaults(func=cmd_train_tiny)

    sp = sub.add_parser("evaluate", help="quick MME evaluation")
    model_args(sp)
    sp.add_argument("--dataset", default="synthetic",
                    help="'synthetic', a local MME folder or parquet file, or 'lmms-lab/MME'")
    sp.add_argument("--pairs", type=int, default=None, help="image pairs (default: all)")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_evaluate)

    sp = sub.add_parser("profile", help="per-expert sensitivity scores")
    model_args(sp)
    sp.add_argument("--method", default="frobenius", choices=list(methods.NAMES),
                    help="; ".join(f"{m.name}: {m.label}" for m in methods.TABLE))
    sp.add_argument("--probes", type=int, default=None,
                    help="Hutchinson probes (frobenius: 100; hessian: cap 64)")
    sp.add_argument("--group-size", type=int, default=128,
                    help="block_error / block_fisher / measured: RTN group size")
    sp.add_argument("--max-cost-s", type=float, default=900.0,
                    help="measured: refuse when the estimated time exceeds this (0: no limit)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--closed-form", action="store_true",
                    help="frobenius: the exact (n-1)/(n||W||) instead of Hutchinson")
    sp.add_argument("--normalize", action="store_true",
                    help="divide by the layer's sum (the authors' MolmoE variant)")
    sp.add_argument("--out", help="write the scores JSON here")
    sp.set_defaults(func=cmd_profile)

    def alloc_args(sp):
        sp.add_argument("--method", default="kmeans",
                        choices=["kmeans", "budget", "uniform", "frequency", "random"])
        sp.add_argument("--clusters", type=int, default=3)
        sp.add_argument("--bits", type=_bits_arg, default=(2, 3, 4))
        sp.add_argument("--scope", default="model", choices=["model", "layer"])
        sp.add_argument("--log-scores", action="store_true", help="cluster log10 scores")
        target = sp.add_mutually_exclusive_group()
        target.add_argument("--target-bits", type=float, default=None)
        target.add_argument("--target-gb", type=float, default=None)
        sp.add_argument("--uniform-bits", type=int, default=4)
        sp.add_argument("--snap", choices=["mean", "max", "min"], default=None,
                        help="one width per layer (fused-MoE engines)")
        sp.add_argument("--seed", type=int, default=0)

    sp = sub.add_parser("allocate", help="bits per expert from scores")
    model_args(sp)
    sp.add_argument("--scores", required=True, help="a scores JSON from 'mopeq profile --out'")
    alloc_args(sp)
    sp.add_argument("--group-size", type=int, default=128)
    sp.add_argument("--base-bits", type=int, default=4)
    sp.add_argument("--out", help="write the bit map JSON here")
    sp.set_defaults(func=cmd_allocate)

    sp = sub.add_parser("memory", help="memory estimate of a bit map")
    model_args(sp)
    sp.add_argument("--bitmap", required=True)
    sp.add_argument("--group-size", type=int, default=128)
    sp.add_argument("--base-bits", type=int, default=4)
    sp.set_defaults(func=cmd_memory)

    sp = sub.add_parser("quantize", help="quantize per expert with auto-round and export")
    model_args(sp)
    sp.add_argument("--bitmap", required=True)
    sp.add_argument("--mode", default="rtn", choices=["rtn", "tuned"])
    sp.add_argument("--group-size", type=int, default=128)
    sp.add_argument("--base-bits", type=int, default=4)
    sp.add_argument("--iters", type=int, default=50, help="tuned mode: SignRound iterations")
    sp.add_argument("--out", required=True)
    sp.set_defaults(func=cmd_quantize)

    sp = sub.add_parser("study", help="compare MoPEQ, baselines and auto-round AutoScheme")
    model_args(sp)
    sp.add_argument("--pairs", type=int, default=None, help="image pairs (default: all)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--random-seeds", type=int, default=5)
    sp.add_argument("--group-size", type=int, default=128)
    sp.add_argument("--out", default="study")
    sp.add_argument("--no-report", action="store_true",
                    help="skip the sensitivity-quality report (every method vs measured)")
    sp.set_defaults(func=cmd_study)

    sp = sub.add_parser("sensitivity-report",
                        help="rank every sensitivity method against the measured ground truth")
    model_args(sp)
    sp.add_argument("--methods", type=_names_arg, default=methods.NAMES,
                    help="comma-separated (default: all)")
    sp.add_argument("--targets", type=_floats_arg, default=(2.5, 3.0),
                    help="average bits of the budget allocations to realise")
    sp.add_argument("--group-size", type=int, default=128)
    sp.add_argument("--n-batches", type=int, default=4)
    sp.add_argument("--batch-size", type=int, default=16)
    sp.add_argument("--pairs", type=int, default=None, help="evaluation pairs (default: all)")
    sp.add_argument("--out", default="sensitivity_report")
    sp.set_defaults(func=cmd_sensitivity_report)
    return p


def _config_of(args) -> dict:
    """``--model``'s config.json as a dict ({} when it is not a local folder)."""
    path = Path(getattr(args, "model", "") or "") / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable = args.func
    start = time.perf_counter()
    try:
        return func(args) or 0
    except USER_ERRORS as exc:
        if args.debug:
            raise
        msg = exc.args[0] if exc.args else type(exc).__name__
        if isinstance(exc, KeyError):
            msg = f"missing or unknown key {msg!r}"
        print(f"mopeq {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except Exception as exc:
        from mopeq.model.loading import is_remote_code_error, remote_code_failure

        if args.debug or not is_remote_code_error(exc):
            raise
        print(f"mopeq {args.command}: error: {remote_code_failure(_config_of(args), exc)}",
              file=sys.stderr)
        return 2
    finally:
        if args.debug:
            print(f"[{args.command} took {time.perf_counter() - start:.2f} s]", file=sys.stderr)
