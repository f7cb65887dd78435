"""Quantize a model per expert with auto-round (``quantize.export`` writes the result).

This is the only module that imports auto-round (pinned in pyproject; its API churns). A
``BitMap`` becomes auto-round's ``layer_config`` keyed by the per-expert module names that
auto-round creates when it unfuses transformers-5 experts. Non-expert linear layers of the
language model get the base bits; routers, embeddings, lm_head and any vision tower/projector
stay 16-bit. A linear layer whose shape auto-round cannot pack (a dimension not divisible by 32,
or an input dimension not divisible by the group size) stays 16-bit too, as in the authors' code.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mopeq.core import defaults as D
from mopeq.core.errors import MopeqError
from mopeq.core.layout import PROJECTIONS, MoELayout, bitmap_array
from mopeq.core.memory import quantizable, takes_base_bits

SUPPORTED_BITS = (2, 3, 4, 8, 16)
# auto-round keeps its compressor context in process-wide singletons: a second AutoRound built
# while one is quantizing or saving corrupts the first. One quantization at a time, therefore.
_AUTOROUND_LOCK = threading.Lock()


@dataclass(frozen=True)
class QuantConfig:
    """How to quantize: mode, group size, symmetry, bits of the non-expert linears."""

    mode: str = D.QUANT_MODE  # "rtn": data-free round-to-nearest; "tuned": SignRound (iters > 0)
    group_size: int = D.GROUP_SIZE
    sym: bool = D.SYM
    base_bits: int = D.BASE_BITS  # attention, dense MLP, shared experts (16: unquantized)
    iters: int = 50  # tuned mode only
    nsamples: int = 32  # tuned mode only
    seqlen: int = 32  # tuned mode only
    batch_size: int = 8  # tuned mode only
    seed: int = D.SEED  # tuned mode: SignRound's sampling of calibration batches (reproducible)

    def __post_init__(self):
        if self.mode not in ("rtn", "tuned"):
            raise MopeqError(f"mode must be 'rtn' or 'tuned', got {self.mode!r}")
        if self.group_size < 1 or self.group_size % 32:
            raise MopeqError(f"group_size must be a positive multiple of 32, got {self.group_size}")
        if self.base_bits not in SUPPORTED_BITS:
            raise MopeqError(f"base_bits must be one of {SUPPORTED_BITS}, got {self.base_bits}")


@dataclass
class QuantResult:
    """A quantized model, the bits applied to each module, and what was exported."""

    model: nn.Module
    layer_config: dict[str, dict]
    elapsed_s: float
    config: QuantConfig
    levels_ok: bool | None = None
    export_dir: Path | None = None
    recipe: dict = field(default_factory=dict)
    checkpoint: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    dtypes: dict[str, str] = field(default_factory=dict, repr=False)  # stored dtype by key


def quant_root(model: nn.Module) -> tuple[nn.Module, str]:
    """The module auto-round quantizes (the language model of a VLM) and its name prefix."""
    lm = getattr(model, "language_model", None)
    if isinstance(lm, nn.Module) and hasattr(lm, "config") and hasattr(lm, "lm_head"):
        return lm, "language_model."
    return model, ""


def check_bitmap(layout: MoELayout, bits: np.ndarray) -> np.ndarray:
    """Validate a bit map against a layout; return it as an int array.

    Raises:
        MopeqError: wrong shape (a bit map of another model) or unsupported widths.
    """
    bits = bitmap_array(bits, layout)
    bad = sorted(set(np.unique(bits).tolist()) - set(SUPPORTED_BITS))
    if bad:
        raise MopeqError(f"unsupported bit widths {bad}: auto-round exports {SUPPORTED_BITS}")
    return bits.astype(int)


def layer_config(layout: MoELayout, bits: np.ndarray, config: QuantConfig,
                 prefix: str = "") -> dict[str, dict]:
    """auto-round ``layer_config``: every expert projection and base linear, by module name.

    Names are relative to the quantized root (``prefix`` is stripped). Layers outside the
    language model (vision tower, projector) are not listed: they are not in the root.
    """
    bits = check_bitmap(layout, bits)
    cfg: dict[str, dict] = {}

    def entry(b: int, out_f: int, in_f: int) -> dict:
        b = b if b < 16 and bool(quantizable(out_f, in_f, config.group_size)) else 16
        return {"bits": int(b), "group_size": config.group_size, "sym": config.sym}

    for info in layout.experts:
        row = layout.moe_layers.index(info.layer)
        for p in PROJECTIONS:
            name = info.modules[p].removeprefix(prefix)
            cfg[name] = entry(bits[row, info.expert], *info.shapes[p])
    for t in layout.tensors:
        if not t.linear or not t.name.startswith(prefix):
            continue
        name = t.name.removeprefix(prefix).removesuffix(".weight")
        b = config.base_bits if takes_base_bits(t) else 16
        cfg[name] = entry(b, t.shape[0], t.shape[1])
    return cfg


def quantize(model: nn.Module, layout: MoELayout, bits, config: QuantConfig = QuantConfig(),
             tokenizer=None, calib: list[str] | None = None, inplace: bool = False,
             on_progress: Callable[[float, str], None] | None = None) -> QuantResult:
    """Quantize the language model with per-expert bits; returns a ready-to-evaluate model.

    ``bits`` is a [MoE layers x experts] array (or a ``BitMap``). Mode ``rtn`` is data-free;
    ``tuned`` runs SignRound on ``calib`` (local strings, never the hub's default data set).
    """
    bits = getattr(bits, "bits", bits)
    start = time.perf_counter()
    model = model if inplace else copy.deepcopy(model)
    root, prefix = quant_root(model)
    cfg = layer_config(layout, bits, config, prefix)
    if config.mode == "tuned" and not calib:
        raise MopeqError("tuned mode needs local calibration texts (calib=[...])")
    if on_progress:
        on_progress(0.05, f"quantizing {len(cfg)} linear layers ({config.mode})")
    checkpoint = tempfile.TemporaryDirectory(prefix="mopeq-q-")
    work = os.path.join(checkpoint.name, ".work")  # auto-round's scratch, not the cwd
    with _AUTOROUND_LOCK, _quiet(), _env(AR_WORK_SPACE=work):
        ar = _autoround(root, tokenizer, cfg, config, calib)
        ar.quantize()
        # packed now: auto-round's context does not survive the next AutoRound instance
        ar.save_quantized(checkpoint.name, format="auto_round", inplace=False)
        shutil.rmtree(work, ignore_errors=True)
    root.float()
    result = QuantResult(model, cfg, time.perf_counter() - start, config, checkpoint=checkpoint,
                         dtypes=unquantized_dtypes(layout, prefix))
    result.levels_ok = verify_levels(root, cfg)
    if on_progress:
        on_progress(1.0, f"quantized in {result.elapsed_s:.1f} s")
    return result


def _autoround(root, tokenizer, cfg, config: QuantConfig, calib):
    from auto_round import AutoRound

    if tokenizer is None:
        raise MopeqError("auto-round needs the model's tokenizer")
    kwargs = dict(scheme="W4A16", group_size=config.group_size, sym=config.sym,
                  device_map="cpu", enable_torch_compile=False, layer_config=copy.deepcopy(cfg),
                  seed=config.seed)
    if config.mode == "rtn":
        kwargs.update(iters=0, disable_opt_rtn=True)
    else:
        kwargs.update(iters=config.iters, nsamples=config.nsamples, seqlen=config.seqlen,
                      batch_size=config.batch_size, dataset=list(calib))
    return AutoRound(root, tokenizer=getattr(tokenizer, "tokenizer", tokenizer), **kwargs)


@contextlib.contextmanager
def _env(**values: str):
    """Set environment variables for the duration of a call (auto-round reads them lazily)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _quiet:
    """Silence auto-round's INFO/WARNING logging for the duration of a call."""

    def __enter__(self):
        self.logger = logging.getLogger("autoround")
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)


def verify_levels(root: nn.Module, cfg: dict[str, dict]) -> bool:
    """Check that every quantized weight takes at most 2**bits levels per group.

    Raises:
        AssertionError: naming the first module that breaks the rule.
    """
    modules = dict(root.named_modules())
    for name, c in cfg.items():
        if c["bits"] >= 16 or name not in modules:
            continue
        w = modules[name].weight.detach().float()
        groups = w.reshape(w.shape[0], -1, c["group_size"])
        levels = max(len(torch.unique(g)) for g in groups.reshape(-1, c["group_size"]))
        if levels > 2 ** c["bits"]:
            raise AssertionError(f"{name}: {levels} levels in a group at {c['bits']} bits")
    return True


def unquantized_dtypes(layout: MoELayout, prefix: str) -> dict[str, str]:
    """Checkpoint key -> dtype of every tensor the layout knows, names relative to the root."""
    out = {t.name.removeprefix(prefix): t.dtype for t in layout.tensors
           if t.name.startswith(prefix)}
    for e in layout.experts:
        out.update({f"{e.modules[p].removeprefix(prefix)}.weight": e.dtype for p in PROJECTIONS})
    return out


# ------------------------------------------------------------------ the peer: AutoScheme


def autoscheme(model: nn.Module, layout: MoELayout, expert_avg_bits: float, config: QuantConfig,
               tokenizer, texts: list[str], bits: tuple[int, ...] = D.BITS):
    """auto-round's own mixed-bit search (AutoScheme) at the same average expert bits.

    Non-expert layers are fixed as in ``layer_config`` (base bits / 16-bit), so AutoScheme only
    chooses among the experts; its ``avg_bits`` counts every layer it sees, so the target is
    converted from an expert average to an all-layer average. auto-round scores layers by
    ``|grad * (W - Q(W))|`` on calibration data and solves a knapsack; by default experts of
    one block are one decision unit. Returns (expert bits [L, E], ``QuantResult``).
    """
    from auto_round import AutoRound, AutoScheme

    start = time.perf_counter()
    model = copy.deepcopy(model)
    root, prefix = quant_root(model)
    full = layer_config(layout, np.full((layout.num_moe_layers, layout.num_experts), 4),
                        config, prefix)
    fixed = {n: c for n, c in full.items() if ".experts." not in n}
    target = _all_layer_target(layout, fixed, full, expert_avg_bits)
    suffix = "" if config.group_size == 128 else f"G{config.group_size}"  # auto-round's W*A16: 128
    with (tempfile.TemporaryDirectory(prefix="mopeq-as-") as tmp, _AUTOROUND_LOCK, _quiet(),
          _env(AR_AUTO_SCHEME_CACHE=str(Path(tmp, "scores")),  # never reuse another's scores
               AR_WORK_SPACE=str(Path(tmp, "work")))):
        data = Path(tmp, "calib.jsonl")
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
        common = dict(nsamples=min(len(texts), 16), seqlen=config.seqlen, batch_size=4,
                      dataset=str(data))
        scheme = AutoScheme(avg_bits=target, options=",".join(f"W{b}A16{suffix}" for b in bits),
                            ignore_scale_zp_bits=True, low_cpu_mem_usage=False,
                            device_map="cpu", **common)
        ar = AutoRound(root, tokenizer=getattr(tokenizer, "tokenizer", tokenizer), scheme=scheme,
                       iters=0, disable_opt_rtn=True, device_map="cpu",
                       enable_torch_compile=False, layer_config=copy.deepcopy(fixed), **common)
        _, chosen = ar.quantize()
    root.float()
    out = np.zeros((layout.num_moe_layers, layout.num_experts), dtype=int)
    for info in layout.experts:
        name = info.modules["gate"].removeprefix(prefix)
        out[layout.moe_layers.index(info.layer), info.expert] = int(chosen[name]["bits"])
    cfg = {n: {"bits": int(c["bits"]), "group_size": config.group_size, "sym": config.sym}
           for n, c in chosen.items() if n in full}
    return out, QuantResult(model, cfg, time.perf_counter() - start, config)


def _all_layer_target(layout: MoELayout, fixed: dict, full: dict, expert_avg: float) -> float:
    shapes = {t.name.removesuffix(".weight"): t.shape for t in layout.tensors if t.linear}
    shapes = {n.split(".", 1)[1] if n.startswith("language_model.") else n: s
              for n, s in shapes.items()}
    fixed_numel = sum(shapes[n][0] * shapes[n][1] for n in fixed if n in shapes)
    fixed_bits = sum(shapes[n][0] * shapes[n][1] * c["bits"] for n, c in fixed.items()
                     if n in shapes)
    expert_numel = sum(e.numel for e in layout.experts)
    return (fixed_bits + expert_avg * expert_numel) / (fixed_numel + expert_numel)
