"""Discover MoE layers and routed experts across architectures (-> ``core.layout.MoELayout``).

Architecture knowledge is data: ``ARCHS`` maps a ``model_type`` to the attribute names to look
for (experts, router, shared experts, vision tower) and to how fused expert tensors are laid out.
Discovery walks the module tree once, so it finds MoE blocks wherever a model keeps them
(``model.layers``, ``model.language_model.layers``, ``language_model.model.layers``, ...).
Two expert layouts are handled:

- *fused* (transformers 5.x): ``experts.gate_up_proj`` [E, 2I, H] (gate rows, then up rows) and
  ``experts.down_proj`` [E, H, I]; Aria and Llama4 store them transposed ([E, H, 2I], [E, I, H]);
- *module list* (remote-code models): ``experts`` is an ``nn.ModuleList`` of MLPs with
  ``gate_proj``/``up_proj``/``down_proj`` (or ``w1``/``w3``/``w2``) linears.

Every expert is named as auto-round names it after unfusing:
``{block}.experts.{e}.{gate_proj|up_proj|down_proj}``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from mopeq.core.errors import MopeqError
from mopeq.core.layout import PROJECTIONS, ExpertInfo, MoEBlock, MoELayout, TensorInfo


@dataclass(frozen=True)
class ArchSpec:
    """Where an architecture keeps its MoE parts (candidate attribute names, in order)."""

    experts: tuple[str, ...] = ("experts",)
    router: tuple[str, ...] = ("gate", "router")
    shared: tuple[str, ...] = ("shared_experts", "shared_expert", "shared_mlp")
    shared_gate: tuple[str, ...] = ("shared_expert_gate",)
    transposed: bool = False  # fused tensors stored as [E, H, 2I] / [E, I, H]
    proj_names: tuple[tuple[str, str, str], ...] = (("gate_proj", "up_proj", "down_proj"),
                                                    ("w1", "w3", "w2"))
    vision: tuple[str, ...] = ("visual", "vision_tower", "vision_model", "vision",
                               "multi_modal_projector", "projector", "mm_projector", "aligner",
                               "vision_embed", "patch_embed", "vision_backbone", "connector")
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok", "moe_k", "top_k", "moe_top_k",
                                     "moe_topk")


# Extend this table to teach discovery a new architecture (keyed by config.model_type).
ARCHS: dict[str, ArchSpec] = {
    "default": ArchSpec(),
    "olmoe": ArchSpec(),
    "deepseek_v2": ArchSpec(),
    "deepseek_v3": ArchSpec(),
    "qwen2_moe": ArchSpec(),
    "qwen3_moe": ArchSpec(),
    "qwen3_vl_moe": ArchSpec(),
    "mixtral": ArchSpec(),
    "glm4v_moe": ArchSpec(),
    "glm4_moe": ArchSpec(),
    "aria": ArchSpec(router=("router", "gate"), transposed=True),
    "aria_text": ArchSpec(router=("router", "gate"), transposed=True),
    "llama4": ArchSpec(router=("router",), transposed=True),
    "llama4_text": ArchSpec(router=("router",), transposed=True),
    "mopeq_tiny_vlm": ArchSpec(),
    # mopeq.model.archs.deepseek_vl2: its learned separator embeddings belong to the vision side
    "deepseek_vl_v2": ArchSpec(vision=ArchSpec().vision + ("image_newline", "view_seperator")),
    # MolmoE (mopeq.model.archs.molmoe): OLMoE experts under language_model, CLIP + connector vision
    "molmo": ArchSpec(),
}


class NotMoEError(MopeqError):
    """The model has no MoE layer that discovery recognises."""


# ------------------------------------------------------------------------- discovery


def text_config(config):
    """The language-model config of a VLM (``text_config``), or the config itself."""
    for key in ("text_config", "language_config", "llm_config"):
        sub = getattr(config, key, None)
        if sub is not None and not isinstance(sub, dict):
            return sub
    return config


def spec_for(config) -> tuple[str, ArchSpec]:
    """The model type and its ``ArchSpec`` (the default spec for unknown types)."""
    model_type = getattr(config, "model_type", "unknown")
    tc_type = getattr(text_config(config), "model_type", model_type)
    for key in (model_type, tc_type):
        if key in ARCHS:
            return model_type, ARCHS[key]
    return model_type, ARCHS["default"]


def discover(model: nn.Module) -> MoELayout:
    """Find every MoE layer, routed expert, router, shared expert and other component.

    Raises:
        NotMoEError: if no module holds routed experts in a recognised layout.
    """
    config = getattr(model, "config", None)
    model_type, spec = spec_for(config)
    blocks = [b for name, mod in model.named_modules() if (b := _block(name, mod, spec))]
    if not blocks:
        raise NotMoEError(
            f"no MoE layer found in {type(model).__name__} (model_type={model_type!r}): looked for "
            f"a child named one of {spec.experts} holding fused 3-D 'gate_up_proj'/'down_proj' "
            f"tensors or an nn.ModuleList of MLPs with {spec.proj_names} linears. If this model "
            f"is MoE, add its model_type to mopeq.model.moe.ARCHS."
        )
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    experts = tuple(e for b in blocks for e in _experts(b, params, modules, model))
    tensors = _tensors(model, blocks, spec)
    tc = text_config(config) if config is not None else None
    return MoELayout(
        model_type=model_type, blocks=tuple(blocks), experts=experts, tensors=tensors,
        top_k=_first_attr(tc, spec.top_k_keys), num_shared_experts=_num_shared(tc, blocks),
    )


def _first_attr(obj, keys):
    for k in keys:
        v = getattr(obj, k, None)
        if isinstance(v, int):
            return v
    return None


def _num_shared(tc, blocks) -> int:
    for key in ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"):
        v = getattr(tc, key, None)
        if isinstance(v, int):
            return v
    return 1 if any(b.shared_path for b in blocks) else 0


def _layer_index(path: str) -> int:
    nums = re.findall(r"\.(\d+)(?=\.|$)", "." + path)
    return int(nums[-1]) if nums else 0


def _child(mod: nn.Module, names: tuple[str, ...]) -> tuple[str, nn.Module] | tuple[None, None]:
    for n in names:
        sub = getattr(mod, n, None)
        if isinstance(sub, nn.Module):
            return n, sub
    return None, None


def _block(path: str, mod: nn.Module, spec: ArchSpec) -> MoEBlock | None:
    name, experts = _child(mod, spec.experts)
    if experts is None:
        return None
    join = (lambda n: f"{path}.{n}" if path else n)  # noqa: E731
    router_name, _ = _child(mod, spec.router)
    shared_name, _ = _child(mod, spec.shared)
    common = dict(layer=_layer_index(path), path=path, experts_path=join(name),
                  router_path=join(router_name) if router_name else None,
                  shared_path=join(shared_name) if shared_name else None)
    gu, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if isinstance(gu, torch.Tensor) and gu.dim() == 3 and isinstance(down, torch.Tensor):
        return MoEBlock(**common, fused=True, transposed=spec.transposed, num_experts=gu.shape[0])
    if isinstance(experts, nn.ModuleList) and len(experts) > 0:
        for names in spec.proj_names:
            if all(isinstance(getattr(experts[0], n, None), nn.Linear) for n in names):
                return MoEBlock(**common, fused=False, transposed=False,
                                num_experts=len(experts), proj_names=names)
    return None


def _experts(block: MoEBlock, params: dict, modules: dict, model: nn.Module) -> list[ExpertInfo]:
    out = []
    for e in range(block.num_experts):
        names = {p: f"{block.experts_path}.{e}.{n}"
                 for p, n in zip(PROJECTIONS, ("gate_proj", "up_proj", "down_proj"), strict=True)}
        if block.fused:
            key = f"{block.experts_path}.gate_up_proj"
            gu = params[key]
            views = _fused_expert(block, gu, params[f"{block.experts_path}.down_proj"], e)
            shapes = {p: tuple(t.shape) for p, t in views.items()}
        else:
            mods = [modules[f"{block.experts_path}.{e}.{n}"] for n in block.proj_names]
            shapes = {p: (m.out_features, m.in_features)
                      for p, m in zip(PROJECTIONS, mods, strict=True)}
            names = {p: f"{block.experts_path}.{e}.{n}"
                     for p, n in zip(PROJECTIONS, block.proj_names, strict=True)}
            gu, key = mods[0].weight, f"{names['gate']}.weight"
        out.append(ExpertInfo(block.layer, e, names, shapes, stored_dtype(model, key, gu)))
    return out


def _tensors(model: nn.Module, blocks: list[MoEBlock], spec: ArchSpec) -> tuple[TensorInfo, ...]:
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = []
    for name, p in model.named_parameters():
        if any(name.startswith(b.experts_path + ".") for b in blocks):
            continue
        comp = _component(name, p, blocks, spec)
        out.append(TensorInfo(name, tuple(p.shape), comp, name in linear_weights,
                              stored_dtype(model, name, p)))
    for name, buf in model.named_buffers():
        if _persistent(model, name) and buf.is_floating_point() and buf.dim() >= 2:
            out.append(TensorInfo(name, tuple(buf.shape), "other", False,
                                  stored_dtype(model, name, buf)))
    return tuple(out)


# Where ``models.mark_stored_dtypes`` keeps a checkpoint's on-disk dtypes on a loaded model.
STORED_DTYPES_ATTR = "_mopeq_stored_dtypes"


def stored_dtype(model: nn.Module, name: str, tensor: torch.Tensor) -> str:
    """The dtype ``name`` is stored in.

    The checkpoint's (when the loader recorded it), else the tensor's own. Unknown names (e.g.
    fused experts saved per expert) take the checkpoint's most common dtype.
    """
    table = getattr(model, STORED_DTYPES_ATTR, None)
    if table is None:
        return dtype_name(tensor.dtype)
    return table["tensors"].get(name, table["default"])


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (layouts stay plain JSON)."""
    return str(dtype).removeprefix("torch.")


def _persistent(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    mod = model.get_submodule(owner) if owner else model
    return leaf not in getattr(mod, "_non_persistent_buffers_set", set())


def _component(name: str, p, blocks, spec: ArchSpec) -> str:
    parts = name.split(".")
    if any(b.router_path and name.startswith(b.router_path + ".") for b in blocks):
        return "router"
    if any(s in parts for s in spec.shared_gate):
        return "router"
    if any(b.shared_path and name.startswith(b.shared_path + ".") for b in blocks):
        return "shared_experts"
    if any(v in parts for v in spec.vision):
        return "vision"
    if "lm_head" in parts or "output" == parts[0]:
        return "lm_head"
    if any(k in parts for k in ("embed_tokens", "wte", "embeddings", "word_embeddings")):
        return "embeddings"
    if p.dim() <= 1:
        return "norm"
    if any(k in parts for k in ("self_attn", "attention", "attn")):
        return "attention"
    if any(k in parts for k in ("mlp", "feed_forward", "ffn")):
        return "dense_mlp"
    return "other"


# --------------------------------------------------------------------------- access


def block_params(model: nn.Module, block: MoEBlock) -> list[torch.Tensor]:
    """The block's expert parameters as stored: fused (gate_up, down), or 3 weights per expert."""
    experts = model.get_submodule(block.experts_path)
    if block.fused:
        return [experts.gate_up_proj, experts.down_proj]
    return [getattr(experts[e], n).weight for e in range(block.num_experts)
            for n in block.proj_names]


def canonical(block: MoEBlock, tensors) -> dict[str, torch.Tensor]:
    """Tensors aligned with ``block_params`` -> projection -> [E, out, in] (views when fused).

    The one reader of the fused layouts: gate rows then up rows in ``gate_up_proj``, and Aria's /
    Llama4's transposed storage.
    """
    if not block.fused:
        return {p: torch.stack(list(tensors[i::3])) for i, p in enumerate(PROJECTIONS)}
    gate_up, down = tensors
    if block.transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    i = gate_up.shape[1] // 2
    return {"gate": gate_up[:, :i], "up": gate_up[:, i:], "down": down}


def from_canonical(block: MoEBlock, parts: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Inverse of ``canonical``: projection -> [E, out, in] back to ``block_params`` order."""
    if not block.fused:
        return [parts[p][e] for e in range(block.num_experts) for p in PROJECTIONS]
    gate_up, down = torch.cat([parts["gate"], parts["up"]], 1), parts["down"]
    if block.transposed:
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    return [gate_up, down]


def _fused_expert(block: MoEBlock, gate_up: torch.Tensor, down: torch.Tensor,
                  expert: int) -> dict[str, torch.Tensor]:
    """One expert's [out, in] views of a fused block's stored tensors."""
    parts = canonical(block, [gate_up[expert:expert + 1], down[expert:expert + 1]])
    return {p: t[0] for p, t in parts.items()}


def expert_weights(model: nn.Module, layout: MoELayout, row: int, expert: int) -> dict:
    """The expert's three weight matrices as 2-D [out, in] tensors (views where possible)."""
    block = layout.blocks[row]
    if block.fused:
        return _fused_expert(block, *block_params(model, block), expert)
    info = layout.expert(row, expert)
    return {p: model.get_submodule(info.modules[p]).weight for p in PROJECTIONS}


def layout_from_config(config) -> MoELayout:
    """Build a layout from a config alone, on the meta device (no weights, any size)."""
    from transformers import AutoModel, AutoModelForCausalLM

    dtype = getattr(config, "dtype", None) or "bfloat16"  # what the weights would be stored in
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        except ValueError:
            model = AutoModel.from_config(config, dtype=dtype)
    return discover(model)
