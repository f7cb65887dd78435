"""Procedural MME-style data: 64x64 scenes, each with one "Yes" and one "No" question.

Seven categories are named after the MME subtasks they imitate. Five read the image
(``existence``, ``count``, ``position`` as a relation between two objects, ``color``, ``OCR`` of
four-letter words with one-letter foils); two need what the language model has *stored*:
``landmark`` asks "Is this a photo of <name>?" about one of ``N_LANDMARKS`` fixed scenes
(each a catalogue entry drawn anew per image, names made of two syllables), and
``numerical_calculation`` asks for the result of a rendered sum or product of two digits.
Memorising the catalogue and the tables fills the experts the way knowledge fills a real
model's MLPs, which is what low-bit quantization erodes first.

Every image is drawn from its own seeded RNG, so a sample depends only on
``(seed, split, category, index)``; the training stream skips any scene that also occurs in
the held-out split, so the two never overlap (catalogue entries and sums recur, their images
do not).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from functools import lru_cache

import numpy as np

from mopeq.core.errors import MopeqError
from mopeq.embedded import glyphs
from mopeq.embedded.scenes import (
    COLORS,
    GRID,
    IMAGE_SIZE,
    N_LANDMARKS,
    OPPOSITE,
    RELATIONS,
    SHAPES,
    WORDS,
    Obj,
    Question,
    Sample,
    Scene,
    calculate,
    caption,
    landmark_blueprints,
    landmark_name,
    landmark_names,
    relation_holds,
    render,
)

CATEGORIES = ("existence", "count", "position", "color", "OCR", "landmark",
              "numerical_calculation")
EVAL_SPLIT, TRAIN_SPLIT = 1, 0
EVAL_PER_CATEGORY = 150

# ------------------------------------------------------------------------- questions


def _free_cells(rng: np.random.Generator, n: int,
                rows: range = range(GRID)) -> list[tuple[int, int]]:
    cells = [(r, c) for r in rows for c in range(GRID)]
    idx = rng.choice(len(cells), size=n, replace=False)
    return [cells[i] for i in idx]


def _obj(rng, shape: str, color: str, row: int, col: int) -> Obj:
    return Obj(shape, color, row, col, int(rng.integers(-2, 3)), int(rng.integers(-2, 3)),
               int(rng.integers(5, 7)))


def _objects(rng, specs: list[tuple[str, str]], cells: list[tuple[int, int]]) -> tuple[Obj, ...]:
    return tuple(_obj(rng, s, c, r, k) for (s, c), (r, k) in zip(specs, cells, strict=True))


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _distinct_specs(rng, n: int) -> list[tuple[str, str]]:
    combos = [(s, c) for s in SHAPES for c in COLORS]
    idx = rng.choice(len(combos), size=n, replace=False)
    return [combos[i] for i in idx]


def _scene(rng, objects, text=None, text_xy=(0, 0), landmark=None) -> Scene:
    return Scene(objects, text, text_xy, int(rng.integers(15, 60)), int(rng.integers(2**31)),
                 landmark)


def _existence(rng):
    specs = _distinct_specs(rng, int(rng.integers(2, 6)))
    scene = _scene(rng, _objects(rng, specs, _free_cells(rng, len(specs))))
    shape, color = _pick(rng, specs)
    absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in specs]
    # the absent object shares a shape or colour with a present one (binding)
    near = [a for a in absent if any(a[0] == s or a[1] == c for s, c in specs)]
    ns, nc = _pick(rng, near or absent)
    return scene, (
        Question(f"Is there a {color} {shape} in the image?", "Yes"),
        Question(f"Is there a {nc} {ns} in the image?", "No"),
    )


def _count(rng):
    shape = _pick(rng, SHAPES)
    k = int(rng.integers(1, 6))
    others = [s for s in SHAPES if s != shape]
    specs = [(shape, _pick(rng, list(COLORS))) for _ in range(k)]
    specs += [(_pick(rng, others), _pick(rng, list(COLORS))) for _ in range(rng.integers(0, 4))]
    scene = _scene(rng, _objects(rng, specs, _free_cells(rng, len(specs))))
    wrong = k + 1 if k == 1 or rng.random() < 0.5 else k - 1
    return scene, (Question(_count_text(k, shape), "Yes"),
                   Question(_count_text(wrong, shape), "No"))


def _count_text(n: int, shape: str) -> str:
    if n == 1:
        return f"Is there {n} {shape} in the image?"
    return f"Are there {n} {shape}s in the image?"


def _position(rng):
    specs = _distinct_specs(rng, int(rng.integers(2, 5)))
    relation = _pick(rng, list(RELATIONS))
    axis = RELATIONS[relation][0]
    cells = _free_cells(rng, len(specs))
    while (cells[0][0] if axis == "row" else cells[0][1]) == (
            cells[1][0] if axis == "row" else cells[1][1]):
        cells = _free_cells(rng, len(specs))
    objs = _objects(rng, specs, cells)
    a, b = objs[0], objs[1]
    if not relation_holds(a, relation, b):
        relation = OPPOSITE[relation]
    name_a, name_b = f"{a.color} {a.shape}", f"{b.color} {b.shape}"
    return _scene(rng, objs), (
        Question(f"Is the {name_a} {_rel_text(relation)} the {name_b}?", "Yes"),
        Question(f"Is the {name_a} {_rel_text(OPPOSITE[relation])} the {name_b}?", "No"),
    )


def _rel_text(relation: str) -> str:
    return f"{relation} of" if relation in ("left", "right") else relation


def _color(rng):
    n = int(rng.integers(2, 5))
    shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), size=n, replace=False)]
    specs = [(s, _pick(rng, list(COLORS))) for s in shapes]
    scene = _scene(rng, _objects(rng, specs, _free_cells(rng, n)))
    shape, color = specs[0]
    present = [c for _, c in specs[1:] if c != color]  # a colour seen on another object
    wrong = _pick(rng, present) if present and rng.random() < 0.7 else _pick(
        rng, [c for c in COLORS if c != color])
    return scene, (
        Question(f"Is the {shape} {color}?", "Yes"),
        Question(f"Is the {shape} {wrong}?", "No"),
    )


def _text_placement(rng, text: str) -> tuple[tuple[int, int], range]:
    """Where a text goes (top or bottom band) and the rows left for objects."""
    top = rng.random() < 0.5
    x = int(rng.integers(0, IMAGE_SIZE - glyphs.text_width(text) + 1))
    y = int(rng.integers(2, 16) + (0 if top else 32))
    return (x, y), (range(2, 4) if top else range(0, 2))


def _ocr(rng):
    i = int(rng.integers(len(WORDS)))
    word, partner = WORDS[i], WORDS[i ^ 1]
    wrong = partner if rng.random() < 0.6 else _pick(rng, [w for w in WORDS if w != word])
    xy, rows = _text_placement(rng, word)
    specs = _distinct_specs(rng, int(rng.integers(0, 3)))
    scene = _scene(rng, _objects(rng, specs, _free_cells(rng, len(specs), rows)), word, xy)
    return scene, (
        Question(f"Is the word {word.lower()} written in the image?", "Yes"),
        Question(f"Is the word {wrong.lower()} written in the image?", "No"),
    )


def _landmark(rng):
    index = int(rng.integers(N_LANDMARKS))
    objs = tuple(_obj(rng, s, c, r, k) for s, c, r, k in landmark_blueprints()[index])
    name = landmark_name(index)
    first, second = name.split()
    near = [n for n in landmark_names() if n != name and {first, second} & set(n.split())]
    wrong = _pick(rng, near) if near and rng.random() < 0.5 else landmark_name(
        _pick(rng, [j for j in range(N_LANDMARKS) if j != index]))
    return _scene(rng, objs, landmark=index), (
        Question(f"Is this a photo of {name}?", "Yes"),
        Question(f"Is this a photo of {wrong}?", "No"),
    )


def _numerical(rng):
    if rng.random() < 0.5:
        a, b, op = int(rng.integers(0, 10)), int(rng.integers(0, 10)), "+"
    else:
        a, b, op = int(rng.integers(2, 10)), int(rng.integers(2, 10)), "x"
    text = f"{a}{op}{b}"
    value = calculate(text)
    if op == "x" and rng.random() < 0.5:  # a neighbour in the times table
        wrong = a * (b + 1) if b < 9 and (b == 2 or rng.random() < 0.5) else a * (b - 1)
    else:
        wrong = max(0, value + _pick(rng, [-2, -1, 1, 2]))
        wrong = wrong if wrong != value else value + 1
    xy, rows = _text_placement(rng, text)
    specs = _distinct_specs(rng, int(rng.integers(0, 2)))
    scene = _scene(rng, _objects(rng, specs, _free_cells(rng, len(specs), rows)), text, xy)
    return scene, (Question(f"Is the answer {value}?", "Yes"),
                   Question(f"Is the answer {wrong}?", "No"))


_MAKERS = {"existence": _existence, "count": _count, "position": _position, "color": _color,
           "OCR": _ocr, "landmark": _landmark, "numerical_calculation": _numerical}


def make_sample(seed: int, split: int, category: str, index: int) -> Sample:
    """Generate one image and its question pair, deterministically."""
    cat_id = CATEGORIES.index(category)
    rng = np.random.default_rng([seed, split, cat_id, index])
    scene, questions = _MAKERS[category](rng)
    if rng.random() < 0.5:  # the "Yes" question is not always asked first
        questions = (questions[1], questions[0])
    split_name = "eval" if split == EVAL_SPLIT else "train"
    return Sample(f"{split_name}-{category}-{index}", category, scene, questions,
                  caption(scene), render(scene))


def eval_split(n_per_category: int = EVAL_PER_CATEGORY, seed: int = 0) -> list[Sample]:
    """The fixed held-out split: ``n_per_category`` images for each category."""
    return [make_sample(seed, EVAL_SPLIT, c, i) for c in CATEGORIES for i in range(n_per_category)]


@lru_cache(maxsize=4)
def _eval_keys(n_per_category: int, seed: int) -> frozenset:
    return frozenset(s.scene.key() for s in eval_split(n_per_category, seed))


def train_stream(seed: int = 1, eval_seed: int = 0, n_eval: int = EVAL_PER_CATEGORY,
                 weights: dict[str, float] | None = None) -> Iterator[Sample]:
    """An endless stream of training samples, never an eval scene.

    Without ``weights`` it cycles the categories in order; with ``weights`` each sample's
    category is drawn (seeded) in proportion to them (a curriculum's emphasis).
    """
    held_out = _eval_keys(n_eval, eval_seed)
    if weights is None:
        order = (c for index in itertools.count() for c in CATEGORIES)
    else:
        order = _weighted_categories(seed, weights)
    counters = dict.fromkeys(CATEGORIES, 0)
    for category in order:
        sample = make_sample(seed, TRAIN_SPLIT, category, counters[category])
        counters[category] += 1
        if sample.scene.key() not in held_out:
            yield sample


def _weighted_categories(seed: int, weights: dict[str, float]) -> Iterator[str]:
    unknown = set(weights) - set(CATEGORIES)
    if unknown:
        raise MopeqError(f"unknown categories {sorted(unknown)}; known: {CATEGORIES}")
    p = np.array([weights.get(c, 0.0) for c in CATEGORIES], dtype=float)
    rng = np.random.default_rng([seed, 99])
    while True:
        yield CATEGORIES[int(rng.choice(len(CATEGORIES), p=p / p.sum()))]



