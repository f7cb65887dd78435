"""The torch-free description of a model's MoE structure: ``MoELayout`` and its parts.

Discovery (``mopeq.model.moe.discover``) builds a layout from a loaded model; every numeric stage
(memory, allocation, the sensitivity report) reads only this, so they import no torch. The bit
map checks that every stage shares live here too.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from mopeq.core.errors import MopeqError

PROJECTIONS = ("gate", "up", "down")
COMPONENTS = ("routed_experts", "shared_experts", "attention", "dense_mlp", "router",
              "embeddings", "lm_head", "vision", "norm", "other")


@dataclass(frozen=True)
class ExpertInfo:
    """One routed expert: its position and its three projections (auto-round names)."""

    layer: int  # index of the decoder layer in the model
    expert: int
    modules: dict[str, str]  # projection -> module name after unfusing
    shapes: dict[str, tuple[int, int]]  # projection -> (out_features, in_features)
    dtype: str = "bfloat16"  # as the model stores it (torch dtype name without "torch.")

    @property
    def numel(self) -> int:
        """Weights of the expert's three projections."""
        return sum(o * i for o, i in self.shapes.values())


@dataclass(frozen=True)
class TensorInfo:
    """A parameter of the model outside the routed experts, with its component."""

    name: str
    shape: tuple[int, ...]
    component: str
    linear: bool  # a 2-D weight of an nn.Linear (quantizable at the base bits)
    dtype: str = "bfloat16"  # as the model stores it, e.g. "float32" for DeepSeek-V2's router

    @property
    def numel(self) -> int:
        """Number of elements."""
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class MoEBlock:
    """One MoE block (the ``mlp`` of a decoder layer) and how its experts are stored."""

    layer: int
    path: str  # module path of the block, e.g. "model.layers.1.mlp"
    experts_path: str
    router_path: str | None
    shared_path: str | None
    fused: bool
    transposed: bool
    num_experts: int
    proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class MoELayout:
    """Everything about a model's MoE structure that the numeric stages need (no weights)."""

    model_type: str
    blocks: tuple[MoEBlock, ...]
    experts: tuple[ExpertInfo, ...]  # layer-major: blocks[0] experts 0..E-1, then blocks[1] ...
    tensors: tuple[TensorInfo, ...]
    top_k: int | None
    num_shared_experts: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def num_moe_layers(self) -> int:
        """Number of MoE layers."""
        return len(self.blocks)

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (the maximum if layers differ)."""
        return max(b.num_experts for b in self.blocks)

    @property
    def moe_layers(self) -> list[int]:
        """Decoder-layer indices of the MoE layers."""
        return [b.layer for b in self.blocks]

    def expert(self, row: int, expert: int) -> ExpertInfo:
        """The expert at (MoE layer position ``row``, ``expert``)."""
        return self.experts[row * self.num_experts + expert]

    def params(self) -> dict[str, int]:
        """Parameter counts by component, with ``total``."""
        counts = Counter({c: 0 for c in COMPONENTS})
        counts["routed_experts"] = sum(e.numel for e in self.experts)
        for t in self.tensors:
            counts[t.component] += t.numel
        out = dict(counts)
        out["total"] = sum(counts.values())
        return out

    def to_json(self) -> dict:
        """A JSON-ready summary (the ``inspect --json`` schema)."""
        return {
            "model_type": self.model_type,
            "num_moe_layers": self.num_moe_layers,
            "moe_layers": self.moe_layers,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "num_shared_experts": self.num_shared_experts,
            "fused": all(b.fused for b in self.blocks),
            "experts": [{"layer": e.layer, "expert": e.expert,
                         "modules": {p: e.modules[p] for p in PROJECTIONS},
                         "shapes": {p: list(e.shapes[p]) for p in PROJECTIONS},
                         "numel": e.numel} for e in self.experts],
            "params": self.params(),
            **self.meta,
        }

    def dumps(self) -> str:
        """Full serialisation (round-trips through ``MoELayout.loads``)."""
        return json.dumps(asdict(self))

    @staticmethod
    def loads(text: str) -> MoELayout:
        """Inverse of ``dumps``."""
        d = json.loads(text)
        return MoELayout(
            model_type=d["model_type"],
            blocks=tuple(MoEBlock(**{**b, "proj_names": tuple(b["proj_names"])})
                         for b in d["blocks"]),
            experts=tuple(ExpertInfo(e["layer"], e["expert"], e["modules"],
                                     {k: tuple(v) for k, v in e["shapes"].items()},
                                     e.get("dtype", "bfloat16"))
                          for e in d["experts"]),
            tensors=tuple(TensorInfo(t["name"], tuple(t["shape"]), t["component"], t["linear"],
                                     t.get("dtype", "bfloat16"))
                          for t in d["tensors"]),
            top_k=d["top_k"], num_shared_experts=d["num_shared_experts"], meta=d["meta"],
        )


def bitmap_array(bitmap, layout: MoELayout, what: str = "bit map") -> np.ndarray:
    """A [MoE layers, experts] array (a ``BitMap``'s ``bits`` or any array), checked.

    Raises:
        MopeqError: if its shape is not the layout's (it was made for another model).
    """
    bits = np.asarray(getattr(bitmap, "bits", bitmap))
    want = (layout.num_moe_layers, layout.num_experts)
    if bits.shape != want:
        raise MopeqError(f"{what} has shape {bits.shape}, but this model has {want[0]} MoE "
                         f"layers x {want[1]} experts: was it made for another model?")
    return bits


def deployable_fused(bits) -> bool:
    """Whether every MoE layer's experts share one width (loadable by vLLM, llama.cpp, ...)."""
    bits = np.asarray(getattr(bits, "bits", bits))
    return bool((bits == bits[:, :1]).all())
