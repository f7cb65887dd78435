"""The baselines: every expert at one width (``uniform``), or a reference map's bits shuffled.

``random`` permutes a reference map's bits (same multiset, so the same average bits), over the
whole model or within each layer (``scope``), seeded. ``inverted`` is the k-means map with its
clusters' widths in reverse order: a control that any useful sensitivity must beat.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mopeq.allocation.bitmap import AllocInputs, BitMap, new_map
from mopeq.allocation.kmeans import cluster_map, spread
from mopeq.core.errors import MopeqError
from mopeq.core.layout import MoELayout

if TYPE_CHECKING:
    from mopeq.allocation.allocate import AllocConfig


def uniform_map(inputs: AllocInputs, layout: MoELayout, config: AllocConfig) -> BitMap:
    """Every expert at ``config.uniform_bits``."""
    return new_map(np.full(inputs.s.shape, config.uniform_bits), layout, "uniform", config)


def random_map(inputs: AllocInputs, layout: MoELayout, config: AllocConfig) -> BitMap:
    """A seeded permutation of the reference map's bits (default: the k-means map)."""
    s, reference = inputs.s, inputs.reference
    if reference is None:
        reference = cluster_map(s, layout, config, "kmeans")
    if reference.bits.shape != s.shape:
        raise MopeqError(f"reference map has shape {reference.bits.shape}, expected {s.shape}")
    rng = np.random.default_rng(config.seed)
    if config.scope == "layer":
        bits = rng.permuted(reference.bits, axis=1)
    else:
        bits = rng.permutation(reference.bits.ravel()).reshape(s.shape)
    meta = {"scope": config.scope, "reference_method": reference.method,
            "reference_avg_bits": reference.avg_bits}
    return new_map(bits, layout, "random", config, meta=meta)


def inverted_map(inputs: AllocInputs, layout: MoELayout, config: AllocConfig) -> BitMap:
    """The k-means clusters with the widths reversed: the most sensitive get the fewest bits.

    Not a recipe but a control: the gap between ``kmeans`` and ``inverted`` at similar average
    bits is what a sensitivity's ranking is worth (a score that ranks experts backwards makes
    ``inverted`` the better of the two).
    """
    reference = cluster_map(inputs.s, layout, config, "kmeans")
    flipped = (config.clusters - 1) - reference.labels
    bits = np.asarray(config.bits)[spread(flipped, config.clusters, len(config.bits))]
    return new_map(bits, layout, "inverted", config, labels=reference.labels,
                   centroids=reference.centroids,
                   meta={**reference.meta, "reference_method": reference.method})
