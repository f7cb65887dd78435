"""Export a quantized model: the checkpoint, ``recipe.json`` and the engine snippets.

``FILES`` is the table of what an export holds beside the checkpoint: file name -> a writer
that turns the recipe into the file's text (None: the file does not apply, e.g. llama.cpp
types for a per-expert map). The checkpoint keeps every unquantized tensor in the dtype the
model stores it in, as ``core.memory`` counts it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from mopeq.core.errors import MopeqError
from mopeq.core.layout import MoELayout, deployable_fused
from mopeq.model.moe import STORED_DTYPES_ATTR
from mopeq.quantize.autoround import QuantResult, quant_root
from mopeq.quantize.snippets import SNIPPETS

# file name -> writer(recipe) -> text, or None where the file does not apply; written in order
FILES: dict[str, Callable[[dict], str | None]] = {
    "recipe.json": lambda recipe: json.dumps(recipe, indent=1),
    **SNIPPETS,
}


def export(result: QuantResult, layout: MoELayout, out_dir: str | Path, *, source: str,
           fingerprint: str, bitmap_json: dict, scores_summary: dict | None = None,
           memory: dict | None = None, processor=None) -> Path:
    """Write the checkpoint (auto-round format), ``recipe.json`` and engine snippets.

    Everything is written into a temporary folder next to ``out_dir`` and renamed at the end,
    so a failure leaves no half-written output.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise MopeqError(f"output folder {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        _write_checkpoint(result, tmp, processor)
        recipe = build_recipe(result, layout, source=source, fingerprint=fingerprint,
                              bitmap_json=bitmap_json, scores_summary=scores_summary,
                              memory=memory)
        write_files(recipe, tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.export_dir, result.recipe = out, recipe
    return out


def _write_checkpoint(result: QuantResult, folder: Path, processor) -> None:
    root, prefix = quant_root(result.model)
    lm_dir = folder / "language_model" if prefix else folder
    shutil.copytree(result.checkpoint.name, lm_dir, dirs_exist_ok=True)
    if result.dtypes:
        _restore_dtypes(lm_dir, result.dtypes)
    if prefix:  # a VLM: the unquantized rest of the model beside the quantized language model
        from safetensors.torch import save_file

        table = getattr(result.model, STORED_DTYPES_ATTR, None)  # models.mark_stored_dtypes
        rest = {k: v.detach().to(_stored_dtype(v, table, k)).contiguous()
                for k, v in result.model.state_dict().items() if not k.startswith(prefix)}
        save_file(rest, str(folder / "rest.safetensors"))
        config = result.model.config.to_dict()
        config["quantized_language_model"] = "language_model"
        (folder / "config.json").write_text(json.dumps(config, indent=1))
    if processor is not None:  # tokenizer and image-processor files: needed to evaluate
        processor.save_pretrained(folder)


def _stored_dtype(t: torch.Tensor, table: dict | None = None, key: str = "") -> torch.dtype:
    """The dtype to store ``key`` in.

    The checkpoint's when the loader recorded it; else fp32 stays fp32 (what the model keeps
    wide) and other floats are stored as bf16.
    """
    if table is not None and t.is_floating_point():
        return getattr(torch, table["tensors"].get(key, table["default"]))
    return t.dtype if t.dtype in (torch.float32, torch.bfloat16, torch.float16) else (
        torch.bfloat16 if t.is_floating_point() else t.dtype)


def _restore_dtypes(folder: Path, dtypes: dict[str, str]) -> None:
    """Cast the unquantized tensors of auto-round's shards back to the model's dtypes.

    auto-round computes in its own dtype (fp32 on a CPU without bf16) and saves in it; the
    checkpoint keeps every unquantized tensor as the model stores it, as ``memory`` counts it.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        changed = False
        for k, t in tensors.items():
            want = getattr(torch, dtypes.get(k, ""), None)
            if isinstance(want, torch.dtype) and t.is_floating_point() and t.dtype != want:
                tensors[k], changed = t.to(want).contiguous(), True
        if changed:
            save_file(tensors, str(shard), metadata=meta)


def build_recipe(result: QuantResult, layout: MoELayout, *, source: str, fingerprint: str,
                 bitmap_json: dict, scores_summary: dict | None, memory: dict | None) -> dict:
    """The plain JSON recipe: everything needed to reproduce or convert the choice."""
    _, prefix = quant_root(result.model)
    return {
        "mopeq_recipe": 1,
        "model": {"source": source, "fingerprint": fingerprint, "model_type": layout.model_type},
        "defaults": {**asdict(result.config), "router": 16, "embeddings": 16, "lm_head": 16,
                     "vision": 16},
        "module_prefix": prefix,
        "modules": result.layer_config,
        "allocation": {**bitmap_json, "layers": layout.moe_layers},
        "scores": scores_summary or {},
        "memory": memory or {},
        "deployable_fused": deployable_fused(bitmap_json["bits"]),
        "quantize_seconds": round(result.elapsed_s, 2),
    }


def write_files(recipe: dict, folder: Path) -> dict[str, str]:
    """Write every file of ``FILES`` that applies to ``recipe``; returns ``{file name: text}``."""
    written = {}
    for name, writer in FILES.items():
        text = writer(recipe)
        if text is not None:
            (Path(folder) / name).write_text(text)
            written[name] = text
    return written
