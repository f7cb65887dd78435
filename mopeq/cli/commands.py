"""The CLI's commands: each builds a ``RunSpec`` from its options and calls a stage.

``Workspace`` (``mopeq.workflow``) does the work; here are only files in and text out.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

from mopeq.core import methods
from mopeq.core.errors import MopeqError
from mopeq.workflow.spec import RunSpec


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=str))


def _stderr_progress(fraction: float, message: str) -> None:
    print(f"[{fraction:5.1%}] {message}", file=sys.stderr, flush=True)


def _progress(args):
    return None if args.json else _stderr_progress


def _print_grid(title: str, grid) -> None:
    print(title)
    for row in grid:
        print("  " + " ".join(f"{x:9.3g}" for x in row))


def _write_json(path: str | None, obj: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(obj, default=str))


# ----------------------------------------------------------------- models and files


def _open(args):
    from mopeq.workflow.workspace import Workspace

    return Workspace.open(args.model, getattr(args, "trust_remote_code", False))


def _load(args):
    """``--model`` loaded without its MoE layout (evaluation runs dense models too)."""
    from mopeq.model.loading import load_model
    from mopeq.workflow.workspace import user_errors

    with user_errors():
        return load_model(args.model, trust_remote_code=args.trust_remote_code)


def _workspace(args, needs_weights: str | None = None):
    """(Workspace or None, layout) of ``--model``: a config-only folder gives only a layout.

    ``needs_weights``: what the command does, for the error when only a config is there.
    """
    path = Path(args.model)
    if path.is_dir() and (path / "config.json").exists() and not any(path.glob("*.safetensors")):
        if needs_weights:
            raise MopeqError(f"{needs_weights} needs weights; this folder holds only a config")
        return None, _config_layout(path, getattr(args, "trust_remote_code", False))
    ws = _open(args)
    return ws, ws.layout


def _config_layout(path: Path, trust_remote_code: bool):
    """The layout of a config-only folder (meta device; no weights read)."""
    from transformers import AutoConfig

    from mopeq.model.loading import native_arch
    from mopeq.model.moe import discover, layout_from_config
    from mopeq.workflow.workspace import user_errors

    with user_errors():
        native = native_arch(json.loads((path / "config.json").read_text()))
        if native is not None and hasattr(native, "meta_model"):  # e.g. MolmoE, from its config
            return discover(native.meta_model(path))
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        return layout_from_config(config)


def _read_json(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise MopeqError(f"{path} is not valid JSON ({exc})") from None


def _read_scores(path: str):
    from mopeq.sensitivity.profile import Scores
    from mopeq.workflow.workspace import user_errors

    d = _read_json(path)
    with user_errors():
        return Scores.from_json(d) if "scores" in d else Scores.load(path)


def _read_bitmap(path: str):
    from mopeq.allocation.bitmap import BitMap
    from mopeq.workflow.workspace import user_errors

    d = _read_json(path)
    if "bits" not in d:
        raise MopeqError(f"{path} has no 'bits': not a bit map (write one with 'mopeq allocate')")
    with user_errors():
        return BitMap.from_json({"method": "file", **d})  # a hand-written {"bits": ...} is fine


# ------------------------------------------------------------------------- specs


def _spec(args, **fields) -> RunSpec:
    """The ``RunSpec`` of the shared option groups present in ``args``, plus ``fields``."""
    names = {"group_size": "group_size", "base_bits": "base_bits", "clusters": "clusters",
             "bits": "bits", "scope": "scope", "log_scores": "log_scores",
             "target_bits": "target_bits", "target_gb": "target_gb",
             "uniform_bits": "uniform_bits", "snap": "snap", "pairs": "pairs"}
    given = {field: getattr(args, name) for name, field in names.items() if hasattr(args, name)}
    return RunSpec(**{**given, **fields})


# ----------------------------------------------------------------------- commands


def cmd_inspect(args) -> int:
    """Print the MoE layout of a model."""
    _, layout = _workspace(args)
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
    assets = (Path(__file__).resolve().parents[2] / "assets").resolve()
    if (out == assets or assets in out.parents) and not args.overwrite_assets:
        raise MopeqError(f"--out {args.out} is inside assets/ (the shipped model); pass "
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
    from mopeq.workflow.workspace import user_errors

    spec = _spec(args, dataset=args.dataset, eval_seed=args.seed)
    with user_errors():
        result = run_evaluation(_load(args), spec.dataset, pairs=spec.pairs,
                                seed=spec.eval_seed)
    out = result.to_json()
    if args.json:
        _print_json(out)
        return 0
    for cat, v in out["per_category"].items():
        print(f"{cat:<24} acc {v['acc']:.3f}  acc+ {v['acc_plus']:.3f}  "
              f"score {v['score']:6.1f}  ({v['n_pairs']} pairs)")
    print(f"{'total':<24} score {out['score']:.1f} over {out['n_pairs']} image pairs "
          f"in {out['elapsed_s']:.2f} s")
    return 0


def cmd_profile(args) -> int:
    """Per-expert sensitivity scores."""
    spec = _spec(args, score_method=args.method, probes=args.probes, profile_seed=args.seed,
                 closed_form=args.closed_form, normalize=args.normalize,
                 max_cost_s=args.max_cost_s or None)
    ws, layout = _workspace(args, needs_weights="profiling")
    scores = ws.profile(spec, on_progress=_progress(args))
    out = scores.to_json()
    _write_json(args.out, out)
    if args.json:
        _print_json(out)
        return 0
    _print_grid(f"{args.method} scores (rows: MoE layers {layout.moe_layers})", scores.scores)
    print("from cache (computed earlier)" if out["cache_hit"] else
          f"computed in {out['elapsed_s']:.2f} s")
    return 0


def cmd_allocate(args) -> int:
    """Bits per expert from a scores file."""
    from mopeq.workflow.workspace import allocate

    scores = _read_scores(args.scores)
    ws, layout = _workspace(args)
    spec = _spec(args, alloc_method=args.method, seed=args.seed, score_method=scores.method)
    if spec.allocation_score_method != scores.method:  # frequency: routing counts
        if ws is None:
            raise MopeqError(f"{spec.alloc_method} allocation needs "
                             f"{spec.allocation_score_method} scores or the weights")
        scores = ws.allocation_scores(spec, scores, on_progress=_progress(args))
    errors = None
    if methods.allocator(spec.alloc_method).needs_errors:
        if ws is None:
            raise MopeqError("budget allocation needs the weights (quantization errors)")
        errors = ws.errors(spec)
    result = allocate(scores, layout, spec, errors=errors)
    out = {**result.to_json(), "layers": layout.moe_layers}
    _write_json(args.out, out)
    if args.json:
        _print_json(out)
        return 0
    bm, m = result.bitmap, result.memory
    _print_grid(f"bits ({bm.method}; rows: MoE layers {layout.moe_layers})", bm.bits)
    print(f"average bits {bm.avg_bits:.3f}; deployable on fused-MoE engines: "
          f"{bm.deployable_fused}; memory {m.gb:.6f} GB ({m.ratio:.2f}x vs bf16)")
    return 0


def cmd_memory(args) -> int:
    """Memory estimate of a bit map on a model (a config-only folder is enough)."""
    from mopeq.core.memory import estimate
    from mopeq.workflow.workspace import user_errors

    _, layout = _workspace(args)
    bitmap = _read_bitmap(args.bitmap)
    with user_errors():
        est = estimate(layout, bitmap, _spec(args).memory_config())
    if args.json:
        _print_json(est.to_json())
        return 0
    print(f"total {est.total_bytes:,} bytes = {est.gb:.4f} GB = {est.gib:.4f} GiB "
          f"({est.ratio:.2f}x smaller than bf16 {est.bf16_bytes:,} bytes)")
    print(f"bits per quantized weight {est.avg_bits_quantized:.3f}, over all weights "
          f"{est.avg_bits_all:.3f}")
    for comp, n in est.breakdown.items():
        print(f"  {comp:<20}{n:>16,} bytes")
    return 0


def cmd_quantize(args) -> int:
    """Quantize with a bit map and export checkpoint + recipe + snippets."""
    spec = _spec(args, mode=args.mode, iters=args.iters)
    bitmap = _read_bitmap(args.bitmap)
    ws, _ = _workspace(args, needs_weights="quantizing")
    result = ws.quantize(spec, bitmap, on_progress=_progress(args))
    mem = ws.memory(spec, bitmap)
    out_dir = ws.export(result, bitmap, mem, args.out)
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

    ws = _open(args)
    table = run_study(ws.loaded, pairs=args.pairs, seed=args.seed, out_dir=args.out,
                      random_seeds=args.random_seeds, group_size=args.group_size,
                      on_progress=_stderr_progress)
    print(table)
    if not args.no_report:  # the study carries the sensitivity-quality table too
        from mopeq.sensitivity.report import ReportConfig, write_report

        config = ReportConfig(group_size=args.group_size, pairs=args.pairs)
        report = ws.report(config, on_progress=_stderr_progress)
        print(f"\nsensitivity quality: {write_report(report, args.out)}")
    return 0


def cmd_sensitivity_report(args) -> int:
    """Every sensitivity method against the measured ground truth (markdown + JSON)."""
    from mopeq.sensitivity.report import QUICK, ReportConfig, markdown, write_report

    if args.quick:  # its methods, calibration size and subset; the targets and groups given
        config = dataclasses.replace(QUICK, targets=args.targets, group_size=args.group_size)
    else:
        config = ReportConfig(methods=args.methods, targets=args.targets,
                              group_size=args.group_size, n_batches=args.n_batches,
                              batch_size=args.batch_size, pairs=args.pairs)
    report = _open(args).report(config, on_progress=_stderr_progress)
    out = write_report(report, args.out)
    print(markdown(report))
    print(f"wrote {out / 'sensitivity_report.md'} and .json", file=sys.stderr)
    return 0
