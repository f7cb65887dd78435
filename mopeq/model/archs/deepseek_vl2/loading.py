"""Read and write DeepSeek-VL2 folders: the hub layout (by key mapping) and mopeq's export.

Hub layout: ``config.json`` (``model_type: deepseek_vl_v2``), ``*.safetensors`` under the
authors' names, tokenizer files and ``processor_config.json``. The authors' names map to this
package's modules as follows (everything else keeps its name):

- ``vision.*`` (timm ViT) -> SigLIP names under ``vision.`` (``vision.timm_to_siglip``);
- ``language.*`` -> ``language_model.*``;
- ``language.model.layers.{L}.mlp.experts.{e}.{gate,up,down}_proj.weight`` -> the fused
  ``experts.gate_up_proj`` [E, 2I, H] (gate rows, then up rows) and ``experts.down_proj`` [E, H, I].

Loading is strict: a checkpoint tensor without a place, or a parameter without a tensor, is an
error. Weights are placed straight into a model built on the meta device; the non-persistent
buffers (rotary ``inv_freq``, SigLIP ``position_ids``) are then computed afresh: they are not in
any checkpoint, and left alone they would be uninitialised memory (wrong logits, no error).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from mopeq.core.errors import MopeqError
from mopeq.model.archs.deepseek_vl2.config import DeepseekVL2Config
from mopeq.model.archs.deepseek_vl2.model import DeepseekVL2ForCausalLM
from mopeq.model.archs.deepseek_vl2.processing import DeepseekVL2Processor
from mopeq.model.archs.deepseek_vl2.vision import siglip_to_timm, timm_to_siglip

_EXPERT = re.compile(r"language\.model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj"
                     r"\.weight")
_FUSED = re.compile(r"language_model\.model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj")


def load(path: str | Path, dtype: torch.dtype = torch.float32):
    """Model and processor from a folder in the hub layout or mopeq's quantized export.

    Raises:
        MopeqError: when the folder's tensors and the model's parameters do not match.
    """
    path = Path(path)
    raw = json.loads((path / "config.json").read_text())
    config = DeepseekVL2Config({k: v for k, v in raw.items() if k != "quantized_language_model"})
    if raw.get("quantized_language_model"):
        model = _load_quantized(path, config, raw["quantized_language_model"], dtype)
    else:
        with torch.device("meta"):
            model = DeepseekVL2ForCausalLM(config)
        _assign(model, hub_to_model(_read_tensors(path), dtype), strict=True)
    init_buffers(model)
    return model.eval(), DeepseekVL2Processor.from_pretrained(path)


def _read_tensors(path: Path):
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise MopeqError(f"{path} holds no *.safetensors weights")
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, fh.get_tensor(name)


def hub_to_model(tensors, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The authors' tensors (name, tensor) -> this package's state dict (see module docstring)."""
    out, vision = {}, {}
    experts: dict[int, dict] = defaultdict(dict)
    for name, t in tensors:
        t = t.to(dtype) if t.is_floating_point() else t
        if m := _EXPERT.fullmatch(name):
            experts[int(m[1])][int(m[2]), m[3]] = t
        elif name.startswith("vision."):
            vision[name.removeprefix("vision.")] = t
        elif name.startswith("language."):
            out["language_model." + name.removeprefix("language.")] = t
        else:
            out[name] = t
    out.update({f"vision.{k}": v for k, v in timm_to_siglip(vision).items()})
    for layer, parts in experts.items():
        n = 1 + max(e for e, _ in parts)
        prefix = f"language_model.model.layers.{layer}.mlp.experts"
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([parts[e, "gate"], parts[e, "up"]]) for e in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([parts[e, "down"] for e in range(n)])
    return out


def model_to_hub(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``hub_to_model``: this package's state dict -> the authors' names."""
    out, vision = {}, {}
    for name, t in state.items():
        if m := _FUSED.fullmatch(name):
            prefix = f"language.model.layers.{m[1]}.mlp.experts"
            for e, w in enumerate(t):
                if m[2] == "down":
                    out[f"{prefix}.{e}.down_proj.weight"] = w
                else:
                    gate, up = w.chunk(2)
                    out[f"{prefix}.{e}.gate_proj.weight"] = gate
                    out[f"{prefix}.{e}.up_proj.weight"] = up
        elif name.startswith("vision."):
            vision[name.removeprefix("vision.")] = t
        elif name.startswith("language_model."):
            out["language." + name.removeprefix("language_model.")] = t
        else:
            out[name] = t
    out.update({f"vision.{k}": v for k, v in siglip_to_timm(vision).items()})
    return out


def save_hub_layout(model: DeepseekVL2ForCausalLM, processor, out_dir: str | Path,
                    dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write ``model`` as the hub repositories lay it out (what the authors' code loads)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous() if v.is_floating_point() else v.contiguous()
             for k, v in model_to_hub(_persistent_state(model)).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1))
    processor.save_pretrained(out)
    return out


def _persistent_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without tied duplicates (``lm_head`` stays when untied)."""
    return {k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


# ------------------------------------------------------------------------ placing weights


def _assign(model: nn.Module, state: dict[str, torch.Tensor], strict: bool) -> None:
    expected = set(model.state_dict())
    unexpected = sorted(set(state) - expected)
    missing = sorted(expected - set(state))
    if unexpected or (strict and missing):
        raise MopeqError(f"checkpoint does not match DeepSeek-VL2 ({type(model).__name__}): "
                         f"{len(missing)} missing e.g. {missing[:3]}, {len(unexpected)} without a "
                         f"place e.g. {unexpected[:3]}")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = [k for k, v in state.items() if tuple(v.shape) != shapes[k]]
    if bad:
        raise MopeqError(f"shape mismatch for {bad[:3]}: e.g. {tuple(state[bad[0]].shape)} in the "
                         f"checkpoint vs {shapes[bad[0]]} in the model")
    model.load_state_dict(state, strict=False, assign=True)


def init_buffers(model: nn.Module) -> None:
    """Compute the non-persistent buffers; fail if any tensor is still without data.

    Raises:
        MopeqError: naming a parameter or buffer left on the meta device.
    """
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            fresh = type(module)(config=module.config)
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner) if owner else model, attr, fresh)
        elif isinstance(getattr(module, "position_ids", None), torch.Tensor):
            n = module.position_ids.shape[-1]
            module.position_ids = torch.arange(n).expand((1, -1))
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise MopeqError(f"{len(left)} tensors were never loaded, e.g. {left[:3]}")


def _load_quantized(path: Path, config: DeepseekVL2Config, lm_folder: str,
                    dtype: torch.dtype) -> DeepseekVL2ForCausalLM:
    """Mopeq's export: auto-round language model in ``lm_folder``, the rest in 16 bit."""
    from safetensors.torch import load_file

    from mopeq.model.archs.deepseek_vl2.language import lm_class

    with torch.device("meta"):
        model = DeepseekVL2ForCausalLM(config)
    model.language_model = lm_class(config.language_config).from_pretrained(
        path / lm_folder, device_map="cpu")
    rest = {k: v.to(dtype) for k, v in load_file(str(path / "rest.safetensors")).items()
            if not k.startswith("language_model.")}
    expected = {k for k in model.state_dict() if not k.startswith("language_model.")}
    missing = sorted(expected - set(rest) - {k for k in expected if k.endswith("position_ids")})
    if missing:
        raise MopeqError(f"quantized export {path} lacks {missing[:3]}")
    _assign(model, rest, strict=False)
    return model
