"""The CLI's options: one builder per sub-command, one per shared option group.

Every default is ``RunSpec``'s (``mopeq.core.defaults``); ``tests/test_defaults.py`` checks it.
"""

from __future__ import annotations

import argparse

from mopeq.allocation.bitmap import SNAP_RULES
from mopeq.core import defaults as D
from mopeq.core import methods
from mopeq.workflow.spec import RunSpec


def _numbers_arg(cast: type, what: str):
    """An argparse type: comma-separated values of ``cast`` (``what`` names them in errors)."""
    def parse(text: str) -> tuple:
        try:
            return tuple(cast(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what}, got {text!r}") from None

    return parse


_ints_arg = _numbers_arg(int, "bits must be comma-separated integers")
_floats_arg = _numbers_arg(float, "expected comma-separated numbers")


def _names_arg(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for n in names:
        if n not in methods.NAMES:
            raise argparse.ArgumentTypeError(f"unknown method {n!r}; choose from {methods.NAMES}")
    return names


# ------------------------------------------------------------------ option groups

SPEC = RunSpec()  # the defaults every option below shows


def _model_options(sp) -> None:
    sp.add_argument("--model", default=D.MODEL_SOURCE,
                    help="'embedded', a local folder, or a hub id")
    sp.add_argument("--trust-remote-code", action="store_true",
                    help="allow the model's own code to run (only for models you trust)")
    sp.add_argument("--json", action="store_true", help="print one JSON object")


def _storage_options(sp, base_bits: bool = True, help: str | None = None) -> None:
    sp.add_argument("--group-size", type=int, default=SPEC.group_size, help=help)
    if base_bits:
        sp.add_argument("--base-bits", type=int, default=SPEC.base_bits)


def _eval_options(sp, seed: bool = True, what: str = "image pairs") -> None:
    sp.add_argument("--pairs", type=int, default=SPEC.pairs, help=f"{what} (default: all)")
    if seed:
        sp.add_argument("--seed", type=int, default=SPEC.eval_seed)


def _alloc_options(sp) -> None:
    sp.add_argument("--method", default=SPEC.alloc_method, choices=list(methods.ALLOC_NAMES),
                    help="; ".join(f"{m.name}: {m.label}" for m in methods.ALLOCATORS))
    sp.add_argument("--clusters", type=int, default=SPEC.clusters)
    sp.add_argument("--bits", type=_ints_arg, default=SPEC.bits)
    sp.add_argument("--scope", default=SPEC.scope, choices=["model", "layer"])
    sp.add_argument("--log-scores", action="store_true", help="cluster log10 scores")
    target = sp.add_mutually_exclusive_group()
    target.add_argument("--target-bits", type=float, default=None)
    target.add_argument("--target-gb", type=float, default=SPEC.target_gb)
    sp.add_argument("--uniform-bits", type=int, default=SPEC.uniform_bits)
    sp.add_argument("--snap", choices=list(SNAP_RULES), default=SPEC.snap,
                    help="one width per layer (fused-MoE engines)")
    sp.add_argument("--seed", type=int, default=SPEC.seed)


# ------------------------------------------------------------------ sub-parsers


def inspect_parser(sp) -> None:
    """``inspect``: --model only."""
    _model_options(sp)


def train_tiny_parser(sp) -> None:
    """``train-tiny``: The recipe's seed, length, time caps and checkpoints."""
    sp.add_argument("--out", required=True)
    sp.add_argument("--seed", type=int, default=D.SEED)
    sp.add_argument("--steps", type=int, default=None,
                    help="shorten the recipe to this many steps in all (quick runs)")
    sp.add_argument("--minutes", type=float, default=None, help="wall-time cap per phase")
    sp.add_argument("--init-from", default=None, help="resume from a saved model folder")
    sp.add_argument("--start-phase", type=int, default=0, help="first phase to run")
    sp.add_argument("--threads", type=int, default=2,
                    help="torch threads (the shipped weights: 2; another count rounds "
                         "differently, so its weights differ in the last bits and then more)")
    sp.add_argument("--checkpoint-every", type=int, default=None,
                    help="also save DIR/checkpoints/phaseP-stepN every N steps")
    sp.add_argument("--eval-every", type=int, default=250,
                    help="steps between validation points of the training curve")
    sp.add_argument("--overwrite-assets", action="store_true",
                    help="allow --out inside assets/ (replaces the shipped model)")


def evaluate_parser(sp) -> None:
    """``evaluate``: The data set and its subset."""
    _model_options(sp)
    sp.add_argument("--dataset", default=SPEC.dataset,
                    help="'synthetic', a local MME folder or parquet file, or 'lmms-lab/MME'")
    _eval_options(sp)


def profile_parser(sp) -> None:
    """``profile``: The sensitivity method and its settings."""
    _model_options(sp)
    sp.add_argument("--method", default=SPEC.score_method, choices=list(methods.NAMES),
                    help="; ".join(f"{m.name}: {m.label}" for m in methods.TABLE))
    probes = ", ".join(f"{k}: {v}" for k, v in methods.DEFAULT_PROBES.items())
    sp.add_argument("--probes", type=int, default=SPEC.probes,
                    help=f"Hutchinson probes (default {probes}; hessian stops early)")
    _storage_options(sp, base_bits=False,
                     help="block_error / block_fisher / measured: RTN group size")
    sp.add_argument("--max-cost-s", type=float, default=SPEC.max_cost_s,
                    help="measured: refuse when the estimated time exceeds this (0: no limit)")
    sp.add_argument("--seed", type=int, default=SPEC.profile_seed)
    sp.add_argument("--closed-form", action="store_true",
                    help="frobenius: the exact (n-1)/(n||W||) instead of Hutchinson")
    sp.add_argument("--normalize", action="store_true",
                    help="divide by the layer's sum (the authors' MolmoE variant)")
    sp.add_argument("--out", help="write the scores JSON here")


def allocate_parser(sp) -> None:
    """``allocate``: The scores file, the allocation and the storage options."""
    _model_options(sp)
    sp.add_argument("--scores", required=True, help="a scores JSON from 'mopeq profile --out'")
    _alloc_options(sp)
    _storage_options(sp)
    sp.add_argument("--out", help="write the bit map JSON here")


def memory_parser(sp) -> None:
    """``memory``: The bit map and the storage options."""
    _model_options(sp)
    sp.add_argument("--bitmap", required=True)
    _storage_options(sp)


def quantize_parser(sp) -> None:
    """``quantize``: The bit map, the quantizer and the storage options."""
    _model_options(sp)
    sp.add_argument("--bitmap", required=True)
    sp.add_argument("--mode", default=SPEC.mode, choices=["rtn", "tuned"])
    _storage_options(sp)
    sp.add_argument("--iters", type=int, default=SPEC.iters,
                    help="tuned mode: SignRound iterations")
    sp.add_argument("--out", required=True)


def study_parser(sp) -> None:
    """``study``: The subset, random rows and group size."""
    _model_options(sp)
    _eval_options(sp)
    sp.add_argument("--random-seeds", type=int, default=D.RANDOM_SEEDS)
    _storage_options(sp, base_bits=False)
    sp.add_argument("--out", default=D.STUDY_DIR)
    sp.add_argument("--no-report", action="store_true",
                    help="skip the sensitivity-quality report (every method vs measured)")


def sensitivity_report_parser(sp) -> None:
    """``sensitivity-report``: The methods, budget targets, calibration size and subset."""
    _model_options(sp)
    sp.add_argument("--methods", type=_names_arg, default=methods.NAMES,
                    help="comma-separated (default: all)")
    sp.add_argument("--targets", type=_floats_arg, default=D.REPORT_TARGETS,
                    help="average bits of the budget allocations to realise")
    _storage_options(sp, base_bits=False)
    sp.add_argument("--n-batches", type=int, default=SPEC.calib_batches)
    sp.add_argument("--batch-size", type=int, default=SPEC.calib_batch_size)
    _eval_options(sp, seed=False, what="evaluation pairs")
    sp.add_argument("--quick", action="store_true",
                    help="the quick report (the app's): frobenius in closed form, fisher, "
                         "frequency and block_fisher on 8 calibration samples and the quick "
                         "MME subset, no held-out reference or split halves (replaces "
                         "--methods, --n-batches, --batch-size, --pairs)")
    sp.add_argument("--out", default="sensitivity_report")
