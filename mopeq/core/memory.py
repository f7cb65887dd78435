"""Memory of a quantized model from its layout and bit map: pure arithmetic, no weights.

Every tensor is counted as it will be stored (auto-round's ``compute_layer_bits`` convention):

- a quantized linear of shape [out, in] at ``b`` bits with group size ``g`` takes
  ``b * out * in + out * ceil(in / g) * (16 + b)`` bits: the weights, then one fp16 scale and one
  ``b``-bit zero point per group (the zero point is counted even when symmetric, as auto-round
  counts it), i.e. ``b + (16 + b) / g`` bits per weight;
- routed experts take the bits of the bit map (``16`` = kept in 16 bit);
- other linears (attention, dense MLP, shared experts, other) take ``MemoryConfig.base_bits``;
- the router, embeddings, lm_head, norms, biases and the vision tower are kept as the model
  stores them: 16 bits for bf16/fp16, 32 for fp32 (e.g. DeepSeek-V2's router), per tensor
  (``TensorInfo.dtype``, ``DTYPE_BITS``); the export writes them in the same dtypes;
- a linear that cannot be quantized stays 16-bit, whatever it was asked for: its ``in`` is not
  divisible by the group size (the MoPEQ code's rule, REFERENCE §1), or one of its dimensions is
  not a multiple of 32 (auto-round 0.16 keeps such int linears 16-bit,
  ``compressors/layer_config_resolver.py``). ``MemoryEstimate.kept_16bit`` counts them.

``estimate`` runs in well under a millisecond per thousand experts: the per-tensor shapes of a
layout are turned into numpy arrays once (``LayoutArrays.of``, memoised per layout object) and
every call is vectorised.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from mopeq.core import defaults as D
from mopeq.core.errors import MopeqError
from mopeq.core.layout import MoELayout, bitmap_array

FP_BITS = 16
# bits per element of a tensor kept unquantized, by its stored dtype (default: 16-bit floats)
DTYPE_BITS = {"float64": 64, "float32": 32, "int64": 64, "int32": 32, "int16": 16, "int8": 8,
              "uint8": 8, "bool": 8, "float8_e4m3fn": 8, "float8_e5m2": 8}
DIM_MULTIPLE = 32  # auto-round keeps int linears with a dimension not divisible by this 16-bit
BREAKDOWN = ("routed_experts", "shared_experts", "attention", "dense_mlp", "router",
             "embeddings_lm_head", "vision", "other")
# layout component -> breakdown entry
_COMPONENT = {"routed_experts": "routed_experts", "shared_experts": "shared_experts",
              "attention": "attention", "dense_mlp": "dense_mlp", "router": "router",
              "embeddings": "embeddings_lm_head", "lm_head": "embeddings_lm_head",
              "vision": "vision", "norm": "other", "other": "other"}
# components whose linears are quantized at the base bits (REFERENCE §1: everything else in
# the language model); ``takes_base_bits`` is the one rule, used here and by quantize
BASE_COMPONENTS = ("attention", "dense_mlp", "shared_experts", "other")
_MEMO_SIZE = 4


@dataclass(frozen=True)
class MemoryConfig:
    """How the model will be stored.

    Attributes:
        group_size: weights per scale/zero-point group along the input dim (-1: one per row).
        base_bits: bits of the non-expert linears (attention, dense MLP, shared experts).
        sym: symmetric quantization (changes the rounding, not the storage: auto-round counts a
            zero point per group either way).
    """

    group_size: int = D.GROUP_SIZE
    base_bits: int = D.BASE_BITS
    sym: bool = D.SYM

    def __post_init__(self):
        if not isinstance(self.group_size, int) or not (self.group_size == -1
                                                        or self.group_size >= 1):
            raise MopeqError(f"group_size must be a positive int or -1, got {self.group_size!r}")
        if not isinstance(self.base_bits, int) or not 1 <= self.base_bits <= FP_BITS:
            raise MopeqError(f"base_bits must be an int in 1..16, got {self.base_bits!r}")


def bit_set(bits) -> tuple[int, ...]:
    """Validate a collection of bit widths; return them sorted and de-duplicated."""
    try:
        values = tuple(bits)
    except TypeError:
        raise MopeqError(f"bits must be a collection of bit widths, got {bits!r}") from None
    if not values:
        raise MopeqError("bits is empty: give at least one bit width, e.g. bits=(2, 3, 4)")
    bad = [b for b in values if isinstance(b, bool) or not isinstance(b, (int, np.integer))
           or not 1 <= b <= FP_BITS]
    if bad:
        raise MopeqError(f"bit widths must be ints in 1..16, got {bad}")
    return tuple(sorted({int(b) for b in values}))


def takes_base_bits(tensor) -> bool:
    """Whether a non-expert tensor (``layout.TensorInfo``) is asked for the base bits.

    The one rule shared by the estimate and ``quantize.layer_config``: a 2-D ``nn.Linear``
    weight of a component in ``BASE_COMPONENTS``; everything else stays in its stored dtype.
    """
    return bool(tensor.linear and len(tensor.shape) == 2
                and tensor.component in BASE_COMPONENTS)


def quantizable(out_features, in_features, group_size: int):
    """Whether linears of these shapes can be quantized (else they stay 16-bit).

    Works elementwise on ints or numpy arrays. See the module docstring for the two rules.
    """
    out_features, in_features = np.asarray(out_features), np.asarray(in_features)
    ok = (out_features % DIM_MULTIPLE == 0) & (in_features % DIM_MULTIPLE == 0)
    if group_size > 0:
        ok &= in_features % group_size == 0
    return ok


def dtype_bits(dtype: str) -> int:
    """Bits per element of a tensor stored unquantized in ``dtype`` (a torch dtype name)."""
    return DTYPE_BITS.get(str(dtype).removeprefix("torch."), FP_BITS)


def storage_bits(out_features, in_features, bits, group_size: int, kept_bits=FP_BITS):
    """Bits to store linears of shape [out, in] asked for ``bits`` (elementwise, int64).

    Unquantizable shapes and ``bits >= 16`` are kept in their stored dtype, ``kept_bits`` per
    weight (16 unless the model keeps them wider, e.g. an fp32 router).
    """
    out_features = np.asarray(out_features, dtype=np.int64)
    in_features = np.asarray(in_features, dtype=np.int64)
    bits = np.asarray(bits, dtype=np.int64)
    numel = out_features * in_features
    g = in_features if group_size == -1 else group_size
    groups = out_features * (-(-in_features // g))
    q = quantizable(out_features, in_features, group_size) & (bits < FP_BITS)
    return np.where(q, numel * bits + groups * (FP_BITS + bits),
                    numel * np.asarray(kept_bits, dtype=np.int64))


@dataclass(frozen=True, eq=False)
class ExpertTerms:
    """[L, E] sums over an expert's projections for one group size.

    An expert at ``b < 16`` bits takes ``b * numel_q + (16 + b) * groups + k * numel_fp`` bits;
    at 16 bits, ``k * (numel_q + numel_fp)``, where ``k`` (``kept``) is the bits per element of
    its stored dtype.

    Attributes:
        numel_q: weights in quantizable projections.
        groups: scale/zero-point groups in quantizable projections.
        numel_fp: weights in projections that stay 16-bit because of their shape.
        count_fp: how many of the three projections stay 16-bit because of their shape.
        kept: bits per element of the expert's stored dtype (what unquantized weights take).
    """

    numel_q: np.ndarray
    groups: np.ndarray
    numel_fp: np.ndarray
    count_fp: np.ndarray
    kept: np.ndarray

    def bits(self, bits) -> np.ndarray:
        """Storage bits of each expert at ``bits`` (broadcast against [L, E])."""
        b = np.asarray(bits, dtype=np.int64)
        quantized = b * self.numel_q + (FP_BITS + b) * self.groups + self.kept * self.numel_fp
        return np.where(b < FP_BITS, quantized, self.kept * (self.numel_q + self.numel_fp))


@dataclass(frozen=True, eq=False)
class LayoutArrays:
    """A layout's shapes as numpy arrays (built once per layout, then shared).

    Attributes:
        out: [L, E, 3] out_features of each expert's gate/up/down.
        inp: [L, E, 3] in_features.
        t_out: [T] out_features of each non-expert tensor (numel for non-linears).
        t_in: [T] in_features (1 for non-linears).
        t_comp: [T] index into ``BREAKDOWN``.
        t_base: [T] True for linears that take the base bits.
        e_kept: [L, E] bits per element of each expert's stored dtype.
        t_kept: [T] bits per element of each tensor's stored dtype.
    """

    out: np.ndarray
    inp: np.ndarray
    t_out: np.ndarray
    t_in: np.ndarray
    t_comp: np.ndarray
    t_base: np.ndarray
    e_kept: np.ndarray
    t_kept: np.ndarray
    _terms: dict = field(default_factory=dict, repr=False)  # memo of ``terms`` by group size

    @property
    def shape(self) -> tuple[int, int]:
        """(MoE layers, experts per layer): the shape of a bit map."""
        return self.out.shape[:2]

    @property
    def expert_numel(self) -> np.ndarray:
        """[L, E] weights per expert."""
        return (self.out * self.inp).sum(-1)

    def terms(self, group_size: int) -> ExpertTerms:
        """Per-expert sums that make an expert's storage linear in its bits (memoised)."""
        if group_size not in self._terms:
            q = quantizable(self.out, self.inp, group_size)
            numel = self.out * self.inp
            g = self.inp if group_size == -1 else group_size
            groups = self.out * (-(-self.inp // g))
            terms = ExpertTerms(np.where(q, numel, 0).sum(-1), np.where(q, groups, 0).sum(-1),
                                np.where(q, 0, numel).sum(-1), (~q).sum(-1), self.e_kept)
            for a in terms.__dict__.values():
                a.setflags(write=False)
            self._terms[group_size] = terms
        return self._terms[group_size]

    @staticmethod
    def build(layout: MoELayout) -> LayoutArrays:
        """Build the arrays (no memo; prefer ``LayoutArrays.of``)."""
        shape = (layout.num_moe_layers, layout.num_experts)
        if len(layout.experts) != shape[0] * shape[1]:
            raise MopeqError("every MoE layer must have the same number of routed experts; "
                             f"got {[b.num_experts for b in layout.blocks]}")
        dims = np.array([[e.shapes[p] for p in ("gate", "up", "down")] for e in layout.experts],
                        dtype=np.int64).reshape(*shape, 3, 2)
        lin = [t.linear and len(t.shape) == 2 for t in layout.tensors]
        t_out = np.array([t.shape[0] if li else t.numel for t, li in zip(layout.tensors, lin,
                                                                         strict=True)], np.int64)
        t_in = np.array([t.shape[1] if li else 1 for t, li in zip(layout.tensors, lin,
                                                                  strict=True)], np.int64)
        comp = np.array([BREAKDOWN.index(_COMPONENT.get(t.component, "other"))
                         for t in layout.tensors], np.int64)
        base = np.array([takes_base_bits(t) for t in layout.tensors], bool)
        e_kept = np.array([dtype_bits(e.dtype) for e in layout.experts],
                          np.int64).reshape(shape)
        t_kept = np.array([dtype_bits(t.dtype) for t in layout.tensors], np.int64)
        arrays = (dims[..., 0], dims[..., 1], t_out, t_in, comp, base, e_kept, t_kept)
        for a in arrays:
            a.setflags(write=False)
        return LayoutArrays(*arrays)

    @staticmethod
    def of(layout: MoELayout) -> LayoutArrays:
        """The arrays of ``layout``, memoised on the layout object (layouts are immutable)."""
        return _MEMO.get(layout)


class _Memo:
    """A small LRU memo keyed by object identity, validated by a weak reference.

    ``MoELayout`` holds dicts, so it is not hashable; identity is the cheap key, and the weak
    reference guards against an id reused after the layout was freed. Caching a pure function
    of an immutable object: no observable state.
    """

    def __init__(self, size: int):
        self.size = size
        self.lock = threading.Lock()  # Gradio serves sessions from several threads
        self.entries: OrderedDict[int, tuple[weakref.ref, LayoutArrays]] = OrderedDict()

    def get(self, layout: MoELayout) -> LayoutArrays:
        with self.lock:
            hit = self.entries.get(id(layout))
            if hit is not None and hit[0]() is layout:
                self.entries.move_to_end(id(layout))
                return hit[1]
        arrays = LayoutArrays.build(layout)
        with self.lock:
            self.entries[id(layout)] = (weakref.ref(layout), arrays)
            while len(self.entries) > self.size:
                self.entries.popitem(last=False)
        return arrays


_MEMO = _Memo(_MEMO_SIZE)


@dataclass
class MemoryEstimate:
    """Stored size of a quantized model (weights only: no KV cache or activations).

    Attributes:
        total_bytes: everything, as stored (``ceil`` of the total bits / 8).
        bf16_bytes: the same model with every tensor in bf16.
        ratio: ``bf16_bytes / total_bytes``.
        gb: total in GB (1e9 bytes).
        gib: total in GiB (2**30 bytes).
        avg_bits_quantized: bits per weight over the quantized tensors, scales and zero points
            included (16.0 when nothing is quantized).
        avg_bits_all: bits per weight over all weights.
        avg_bits_experts: bits per weight over the routed experts, overhead included.
        breakdown: bytes by component (keys ``BREAKDOWN``).
        by_layer: bytes of the routed experts of each MoE layer (rows of the bit map).
        kept_16bit: linears (expert projections counted one by one) asked for fewer than 16
            bits that stay 16-bit because of their shape.
        kept_16bit_params: weights in those linears.
        quantized_params: weights stored below 16 bits.
        total_params: all weights.
    """

    total_bytes: int
    bf16_bytes: int
    ratio: float
    gb: float
    gib: float
    avg_bits_quantized: float
    avg_bits_all: float
    avg_bits_experts: float
    breakdown: dict[str, int]
    by_layer: list[int]
    kept_16bit: int
    kept_16bit_params: int
    quantized_params: int
    total_params: int
    config: MemoryConfig = field(default_factory=MemoryConfig)

    def to_json(self) -> dict:
        """A JSON-ready dict."""
        out = {k: v for k, v in self.__dict__.items() if k != "config"}
        out["config"] = {"group_size": self.config.group_size,
                         "base_bits": self.config.base_bits, "sym": self.config.sym}
        return out


def expert_cost_table(layout: MoELayout, bits: tuple[int, ...],
                      config: MemoryConfig) -> np.ndarray:
    """[L, E, B] storage bits of each routed expert at each width of ``bits``."""
    terms = LayoutArrays.of(layout).terms(config.group_size)
    b = np.asarray(bits, dtype=np.int64)
    return ExpertTerms(*(a[..., None] for a in terms.__dict__.values())).bits(b)


def tensor_bits(arrays: LayoutArrays, config: MemoryConfig) -> np.ndarray:
    """[T] storage bits of each non-expert tensor."""
    asked = np.where(arrays.t_base, config.base_bits, FP_BITS)
    q_bits = storage_bits(arrays.t_out, arrays.t_in, asked, config.group_size, arrays.t_kept)
    return np.where(arrays.t_base, q_bits, arrays.t_out * arrays.t_in * arrays.t_kept)


def fixed_bits(layout: MoELayout, config: MemoryConfig) -> int:
    """Storage bits of everything but the routed experts (what a bit map does not change)."""
    return int(tensor_bits(LayoutArrays.of(layout), config).sum())


def _tensor_quantized(arrays: LayoutArrays, config: MemoryConfig) -> np.ndarray:
    """[T] non-expert tensors stored below 16 bits."""
    return arrays.t_base & (config.base_bits < FP_BITS) & quantizable(
        arrays.t_out, arrays.t_in, config.group_size)


def estimate(layout: MoELayout, bitmap, config: MemoryConfig | None = None) -> MemoryEstimate:
    """Memory of ``layout`` quantized with ``bitmap`` (a ``BitMap`` or an [L, E] int array).

    Raises:
        MopeqError: if the bit map's shape does not match the layout.
    """
    config = config or MemoryConfig()
    arrays = LayoutArrays.of(layout)
    terms = arrays.terms(config.group_size)
    bits = bitmap_array(bitmap, layout).astype(np.int64, copy=False)
    e_bits, e_q = terms.bits(bits), bits < FP_BITS
    t_bits, t_numel = tensor_bits(arrays, config), arrays.t_out * arrays.t_in
    t_q = _tensor_quantized(arrays, config)
    t_kept = arrays.t_base & (config.base_bits < FP_BITS) & ~t_q
    comp_bits = np.bincount(arrays.t_comp, weights=t_bits, minlength=len(BREAKDOWN))
    comp_bits[BREAKDOWN.index("routed_experts")] += e_bits.sum()
    e_numel = terms.numel_q + terms.numel_fp
    total_bits = int(e_bits.sum() + t_bits.sum())
    total_params = int(e_numel.sum() + t_numel.sum())
    q_params = int(terms.numel_q[e_q].sum() + t_numel[t_q].sum())
    q_bits = int((e_bits - terms.kept * terms.numel_fp)[e_q].sum() + t_bits[t_q].sum())
    total_bytes = _bytes(total_bits)
    return MemoryEstimate(
        total_bytes=total_bytes, bf16_bytes=2 * total_params,
        ratio=2 * total_params / total_bytes, gb=total_bytes / 1e9, gib=total_bytes / 2**30,
        avg_bits_quantized=q_bits / q_params if q_params else float(FP_BITS),
        avg_bits_all=total_bits / total_params,
        avg_bits_experts=float(e_bits.sum() / max(int(e_numel.sum()), 1)),
        breakdown={k: _bytes(v) for k, v in zip(BREAKDOWN, comp_bits, strict=True)},
        by_layer=[_bytes(v) for v in e_bits.sum(1)],
        kept_16bit=int(terms.count_fp[e_q].sum() + t_kept.sum()),
        kept_16bit_params=int(terms.numel_fp[e_q].sum() + t_numel[t_kept].sum()),
        quantized_params=q_params, total_params=total_params, config=config)


def _bytes(bits) -> int:
    """Bits to whole bytes, rounded up."""
    return -(-int(bits) // 8)
