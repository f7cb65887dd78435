"""Uncertainty of MME scores: stratified bootstrap intervals and the exact McNemar test.

Pure numpy (no model, no records): callers pass per-image arrays. The resampling unit is the
MME image, so both of its questions stay together; images are resampled with replacement
within their category (stratum), so every resample keeps the subset's category sizes, as the
seeded quick subset does. An MME category score is ``100*acc + 100*acc+``, which equals the
mean over the category's images of ``50*(right answers) + 100*(both right)``; the total is the
sum of the category scores. Every statistic is therefore a function of per-stratum means, and
one (strata x resamples) table of means gives them all at once (vectorised: thousands of
resamples of a full MME run take milliseconds).

Intervals are percentile intervals over ``n_boot`` seeded resamples. ``paired_*`` functions
resample the *same* images for two runs, so the interval of a difference reflects only what
differs between the runs on identical questions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from mopeq.core.errors import MopeqError

N_BOOT = 2000  # resamples: the percentile bounds move by < 1 % of the width between seeds
LEVEL = 0.95


def image_scores(correct: np.ndarray) -> np.ndarray:
    """[n] MME points of each image from its [n, 2] per-question correctness.

    ``50 * (right answers) + 100 * (both right)``: the mean over a category's images is its
    ``100*acc + 100*acc+`` score.
    """
    c = np.asarray(correct, dtype=bool)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"correct must be [images, 2] (two questions per image), got {c.shape}")
    return 50.0 * c.sum(1) + 100.0 * c.all(1)


def stratified_means(values: Sequence[np.ndarray], strata: np.ndarray, n_boot: int = N_BOOT,
                     seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per-stratum means of each array over ``n_boot`` shared stratified resamples.

    Args:
        values: arrays of shape [n] (one value per image), resampled with the same indices.
        strata: [n] stratum label of each image (any hashable numpy dtype).
        n_boot: number of resamples.
        seed: seed of the resampling (the same seed draws the same images).

    Returns:
        The sorted stratum labels and, per input array, an [S, n_boot] table of means.
    """
    strata = np.asarray(strata)
    arrays = [np.asarray(v, dtype=np.float64) for v in values]
    if any(a.shape != strata.shape for a in arrays):
        raise ValueError("every value array needs one entry per image, like strata")
    labels = np.unique(strata)
    rng = np.random.default_rng(seed)
    tables = [np.empty((len(labels), n_boot)) for _ in arrays]
    for s, label in enumerate(labels):
        members = np.flatnonzero(strata == label)
        idx = members[rng.integers(0, len(members), size=(n_boot, len(members)))]
        for table, a in zip(tables, arrays, strict=True):
            table[s] = a[idx].mean(1)
    return labels, tables


def percentile_interval(samples: np.ndarray, level: float = LEVEL) -> list[float]:
    """[low, high] percentile interval of bootstrap samples (along the last axis)."""
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(samples, [tail, 100 - tail], axis=-1)
    return [float(lo), float(hi)]


def score_intervals(correct: np.ndarray, strata: np.ndarray, n_boot: int = N_BOOT,
                    seed: int = 0, level: float = LEVEL) -> dict:
    """Intervals of the total MME score and of each category score.

    Returns:
        ``{"total": [lo, hi], "per_stratum": {label: [lo, hi]}}``.
    """
    labels, (table,) = stratified_means([image_scores(correct)], strata, n_boot, seed)
    return {"total": percentile_interval(table.sum(0), level),
            "per_stratum": {_plain(lab): percentile_interval(row, level)
                            for lab, row in zip(labels, table, strict=True)}}


def paired_score_delta(base_correct: np.ndarray, other_correct: np.ndarray,
                       strata: np.ndarray, n_boot: int = N_BOOT, seed: int = 0,
                       level: float = LEVEL) -> dict:
    """Paired intervals of ``other - base`` total and per-category scores (same images)."""
    labels, (b, o) = stratified_means([image_scores(base_correct), image_scores(other_correct)],
                                      strata, n_boot, seed)
    diff = o - b
    return {"total": percentile_interval(diff.sum(0), level),
            "per_stratum": {_plain(lab): percentile_interval(row, level)
                            for lab, row in zip(labels, diff, strict=True)}}


def mean_interval(per_question: np.ndarray, strata: np.ndarray, n_boot: int = N_BOOT,
                  seed: int = 0, level: float = LEVEL) -> list[float]:
    """Interval of the mean over all questions of an [n, 2] per-question value (KL, flips).

    Images are resampled within strata; the overall mean weighs each stratum by its size,
    exactly as the plain mean over all questions does.
    """
    v = np.asarray(per_question, dtype=np.float64)
    labels, (table,) = stratified_means([v.mean(1)], strata, n_boot, seed)
    sizes = np.array([(np.asarray(strata) == lab).sum() for lab in labels], dtype=np.float64)
    return percentile_interval((sizes[:, None] * table).sum(0) / sizes.sum(), level)


def mcnemar_exact(base_right: np.ndarray, other_right: np.ndarray) -> dict:
    """Exact McNemar test on paired per-question correctness (two-sided binomial, p = 1/2).

    Only discordant questions count: ``b`` right before and wrong after, ``c`` the reverse.
    ``p = min(1, 2 * P(X <= min(b, c)))`` for ``X ~ Binomial(b + c, 1/2)``; 1.0 when none.
    """
    a, o = np.asarray(base_right, bool).ravel(), np.asarray(other_right, bool).ravel()
    if a.shape != o.shape:
        raise ValueError("both runs need the same questions")
    b, c = int((a & ~o).sum()), int((~a & o).sum())
    return {"b": b, "c": c, "n_discordant": b + c, "p_value": binomial_two_sided(b, b + c)}


def binomial_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair trials (doubling the tail)."""
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1))
    return min(1.0, 2 * tail / 2**n)  # exact integer arithmetic until the last division


def by_image(keys: Sequence[tuple], *per_question: Sequence) -> tuple[np.ndarray, list]:
    """Group per-question values into [images, 2] arrays by image.

    Args:
        keys: one ``(category, image_id, ...)`` tuple per question; the first two items name
            the image, and its questions are ordered by the full key.
        per_question: arrays (or lists) with one value per question, aligned with ``keys``.

    Returns:
        The [images] category of each image and, per input, an [images, 2] array.

    Raises:
        ValueError: when an image does not have exactly two questions.
    """
    order = sorted(range(len(keys)), key=lambda i: tuple(map(str, keys[i])))
    images: dict[tuple, list[int]] = {}
    for i in order:
        images.setdefault(tuple(keys[i][:2]), []).append(i)
    bad = [k for k, rows in images.items() if len(rows) != 2]
    if bad:
        raise MopeqError(f"{len(bad)} image(s) do not have exactly two questions, e.g. {bad[:3]}")
    rows = np.array(list(images.values()), dtype=np.int64).reshape(-1, 2)
    strata = np.array([str(k[0]) for k in images])
    return strata, [np.asarray(v)[rows] for v in per_question]


def half_width(interval: Sequence[float] | None) -> float | None:
    """Half the width of an interval (what a "± x" shows), or None."""
    return None if interval is None else (interval[1] - interval[0]) / 2


def contains_zero(interval: Sequence[float] | None) -> bool:
    """Whether an interval contains 0 (a difference not distinguishable from none)."""
    return interval is not None and interval[0] <= 0 <= interval[1]


def _plain(label):
    return label.item() if isinstance(label, np.generic) else label
