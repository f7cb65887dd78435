"""Engine snippets of a recipe: auto-round ``layer_config``, GPTQModel ``dynamic``, llama.cpp.

Every ``.py`` snippet is valid Python that runs as written (``exec`` defines its names):
``autoround_layer_config.py`` defines ``layer_config``; ``gptqmodel_dynamic.py`` defines
``bits``, ``group_size`` and ``dynamic`` for ``QuantizeConfig(bits=bits,
group_size=group_size, dynamic=dynamic)``. Module names are those of the recipe (relative to
its ``module_prefix``).

GPTQModel resolves ``dynamic`` per module, so per-expert rules work there. vLLM (and SGLang)
resolve it once per *fused* MoE layer (``...mlp.experts``): per-expert rules never match
there. For a map with one width per MoE layer the expert rules are therefore written per
layer, matching both the fused module and each expert module; a per-expert map says in the
file that it does not load in vLLM.
"""

from __future__ import annotations

import pprint
import re

import numpy as np

from mopeq.core.layout import PROJECTIONS

GGML_TYPES = {2: "q2_K", 3: "q3_K", 4: "q4_K", 8: "q8_0", 16: "f16"}
EXPERT_MODULE = re.compile(r"^(?P<experts>.+\.experts)\.\d+\.[^.]+$")
PER_EXPERT_NOTE = (
    "# Per-expert widths. GPTQModel / transformers resolve these rules per expert module and\n"
    "# load them; vLLM and SGLang resolve `dynamic` once per fused MoE layer (`...mlp.experts`),\n"
    "# so per-expert rules do NOT apply there and this file is not loadable by vLLM. To deploy\n"
    "# on vLLM, snap the allocation to one width per MoE layer and export again.\n")
PER_LAYER_NOTE = (
    "# One width per MoE layer: each expert rule matches the fused experts module\n"
    "# (`...mlp.experts`, as vLLM / SGLang resolve it) and each expert module (as GPTQModel\n"
    "# does), so the same rules load in GPTQModel, transformers and vLLM.\n")


def autoround_snippet(mods: dict[str, dict]) -> str:
    """``layer_config = {...}`` for ``AutoRound(..., layer_config=layer_config)``."""
    cfg = {n: {"bits": int(c["bits"]), "group_size": int(c["group_size"]), "sym": bool(c["sym"])}
           for n, c in mods.items()}
    return ("# auto-round layer_config: AutoRound(model, ..., layer_config=layer_config)\n"
            "layer_config = " + pprint.pformat(cfg, sort_dicts=False, width=100) + "\n")


def gptq_snippet(mods: dict[str, dict]) -> str:
    """``bits``, ``group_size`` and ``dynamic`` for GPTQModel's ``QuantizeConfig``."""
    default = default_bits(mods)
    per_layer = gptq_dynamic_per_layer(mods, default)
    note = PER_LAYER_NOTE if per_layer is not None else PER_EXPERT_NOTE
    rules = per_layer if per_layer is not None else gptq_dynamic(mods, default)
    sizes = sorted({int(c["group_size"]) for c in mods.values()})
    return (note + "# QuantizeConfig(bits=bits, group_size=group_size, dynamic=dynamic)\n"
            f"bits = {default}\ngroup_size = {sizes[0] if sizes else 128}\n"
            "dynamic = " + pprint.pformat(rules, sort_dicts=False, width=100) + "\n")


def default_bits(mods: dict[str, dict]) -> int:
    """The widest width below 16 (the ``QuantizeConfig`` default the rules deviate from)."""
    return max({int(c["bits"]) for c in mods.values() if c["bits"] < 16}, default=4)


def gptq_dynamic(mods: dict[str, dict], default: int | None = None) -> dict[str, dict]:
    """GPTQModel ``dynamic`` rules: one regex per module whose bits differ from the default."""
    default = default_bits(mods) if default is None else default
    rules = {}
    for name, c in mods.items():
        key = re.escape(name) + "$"
        if c["bits"] >= 16:
            rules[f"-:{key}"] = {}
        elif c["bits"] != default:
            rules[f"+:{key}"] = {"bits": c["bits"], "group_size": c["group_size"]}
    return rules


def gptq_dynamic_per_layer(mods: dict[str, dict],
                           default: int | None = None) -> dict[str, dict] | None:
    """Rules with one entry per fused experts module, or None if a layer's experts differ.

    A layer's experts differ when the map is per-expert, or when some projection stays 16-bit
    because of its shape: neither can be said to an engine that sees one fused module.
    """
    default = default_bits(mods) if default is None else default
    layers: dict[str, list[dict]] = {}
    rest = {}
    for name, c in mods.items():
        m = EXPERT_MODULE.match(name)
        if m:
            layers.setdefault(m["experts"], []).append(c)
        else:
            rest[name] = c
    if not layers or any(len({(c["bits"], c["group_size"]) for c in cs}) != 1
                         for cs in layers.values()):
        return None
    rules = gptq_dynamic(rest, default)
    for path, cs in layers.items():
        key = re.escape(path) + r"(\.|$)"
        if cs[0]["bits"] >= 16:
            rules[f"-:{key}"] = {}
        elif cs[0]["bits"] != default:
            rules[f"+:{key}"] = {"bits": cs[0]["bits"], "group_size": cs[0]["group_size"]}
    return rules


def llama_cpp_lines(recipe: dict) -> str:
    """``--tensor-type`` arguments for llama-quantize (one type per layer's stacked experts)."""
    bits = np.asarray(recipe["allocation"]["bits"])
    layers = recipe["allocation"].get("layers") or list(range(len(bits)))
    lines = []
    for layer, row in zip(layers, bits, strict=True):
        ggml = GGML_TYPES[int(row[0])]
        lines += [f"--tensor-type blk.{layer}.ffn_{p}_exps={ggml}" for p in PROJECTIONS]
    return " \\\n".join(lines) + "\n"


# file name -> writer(recipe) -> text, or None where the engine cannot load the map
SNIPPETS = {
    "autoround_layer_config.py": lambda recipe: autoround_snippet(recipe["modules"]),
    "gptqmodel_dynamic.py": lambda recipe: gptq_snippet(recipe["modules"]),
    "llama_cpp_tensor_types.txt": lambda recipe: (llama_cpp_lines(recipe)
                                                  if recipe["deployable_fused"] else None),
}
