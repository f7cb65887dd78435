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

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, KeyError)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=1, default=str))


def _load(args):
    from mopeq.models import load_model

    return load_model(args.model, trust_remote_code=getattr(args, "trust_remote_code", False))


# --------------------------------------------------------------------------- commands


def cmd_inspect(args) -> int:
    """Print the MoE layout of a model."""
    from mopeq.moe import discover, layout_from_config

    if Path(args.model).is_dir() and not any(Path(args.model).glob("*.safetensors")) \
            and args.model != "embedded":
        from transformers import AutoConfig

        layout = layout_from_config(AutoConfig.from_pretrained(args.model))
    else:
        layout = discover(_load(args).model)
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

    from mopeq import tiny

    torch.set_num_threads(args.threads)
    recipe = tiny.TinyRecipe(seed=args.seed, **({"steps": args.steps} if args.steps else {}))
    log = tiny.train(args.out, recipe, minutes=args.minutes,
                     on_progress=lambda f, m: print(m, flush=True))
    print(json.dumps({k: log[k] for k in ("steps_done", "wall_minutes", "stopped_early")}))
    return 0


def cmd_evaluate(args) -> int:
    """Quick MME(-style) evaluation of a model."""
    from mopeq.evaluate import run_evaluation

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
    sp.add_argument("--steps", type=int, default=None, help="override the recipe's step count")
    sp.add_argument("--minutes", type=float, default=None, help="wall-time cap")
    sp.add_argument("--threads", type=int, default=1)
    sp.set_defaults(func=cmd_train_tiny)

    sp = sub.add_parser("evaluate", help="quick MME evaluation")
    model_args(sp)
    sp.add_argument("--dataset", default="synthetic",
                    help="'synthetic', a local MME folder or parquet file, or 'lmms-lab/MME'")
    sp.add_argument("--pairs", type=int, default=None, help="image pairs (default: all)")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(func=cmd_evaluate)
    return p


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
        print(f"mopeq {args.command}: error: {msg}", file=sys.stderr)
        return 2
    finally:
        if args.debug:
            print(f"[{args.command} took {time.perf_counter() - start:.2f} s]", file=sys.stderr)
