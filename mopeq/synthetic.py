"""Procedural MME-style data: 64x64 scenes, each with one "Yes" and one "No" question.

Categories are named after the MME perception subtasks that can be generated honestly
(existence, count, position, color, OCR). Every image is drawn from its own seeded RNG, so a
sample depends only on ``(seed, split, category, index)``; the training stream skips any scene
that also occurs in the held-out split, so the two never overlap.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache, lru_cache

import numpy as np

CATEGORIES = ("existence", "count", "position", "color", "OCR")
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 50, 47),
    "green": (60, 180, 75),
    "blue": (60, 100, 240),
    "yellow": (240, 220, 40),
    "white": (235, 235, 235),
}
WORDS = ("CAT", "DOG", "SUN", "BOX", "MAP", "KEY", "CUP", "PEN")
IMAGE_SIZE = 64
GRID = 4  # scenes are laid out on a GRID x GRID lattice of cells
CELL = IMAGE_SIZE // GRID
EVAL_SPLIT, TRAIN_SPLIT = 1, 0
SIDES = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}

# 5x7 bitmap glyphs for the letters of WORDS (no font file, identical on every machine).
_GLYPHS = {
    "A": ['.###.', '#...#', '#...#', '#####', '#...#', '#...#', '#...#'],
    "B": ['####.', '#...#', '#...#', '####.', '#...#', '#...#', '####.'],
    "C": ['.####', '#....', '#....', '#....', '#....', '#....', '.####'],
    "D": ['####.', '#...#', '#...#', '#...#', '#...#', '#...#', '####.'],
    "E": ['#####', '#....', '#....', '####.', '#....', '#....', '#####'],
    "G": ['.####', '#....', '#....', '#.###', '#...#', '#...#', '.###.'],
    "K": ['#...#', '#..#.', '#.#..', '##...', '#.#..', '#..#.', '#...#'],
    "M": ['#...#', '##.##', '#.#.#', '#...#', '#...#', '#...#', '#...#'],
    "N": ['#...#', '##..#', '#.#.#', '#..##', '#...#', '#...#', '#...#'],
    "O": ['.###.', '#...#', '#...#', '#...#', '#...#', '#...#', '.###.'],
    "P": ['####.', '#...#', '#...#', '####.', '#....', '#....', '#....'],
    "S": ['.####', '#....', '#....', '.###.', '....#', '....#', '####.'],
    "T": ['#####', '..#..', '..#..', '..#..', '..#..', '..#..', '..#..'],
    "U": ['#...#', '#...#', '#...#', '#...#', '#...#', '#...#', '.###.'],
    "X": ['#...#', '#...#', '.#.#.', '..#..', '.#.#.', '#...#', '#...#'],
    "Y": ['#...#', '#...#', '.#.#.', '..#..', '..#..', '..#..', '..#..'],
}


@cache
def _glyph(letter: str) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in _GLYPHS[letter]], dtype=bool)


@dataclass(frozen=True)
class Obj:
    """One object of a scene: a coloured shape in a grid cell, with a small pixel jitter."""

    shape: str
    color: str
    row: int
    col: int
    dx: int = 0
    dy: int = 0
    size: int = 6


@dataclass(frozen=True)
class Scene:
    """What an image shows; rendering it is deterministic."""

    objects: tuple[Obj, ...]
    word: str | None = None
    word_xy: tuple[int, int] = (0, 0)
    background: int = 30
    noise_seed: int = 0

    def key(self) -> tuple:
        """A hashable identity of the scene (used to keep train and eval apart)."""
        return (self.objects, self.word, self.word_xy, self.background, self.noise_seed)


@dataclass(frozen=True)
class Question:
    """A yes/no question about an image."""

    text: str
    answer: str  # "Yes" or "No"


@dataclass(frozen=True)
class Sample:
    """One image with its pair of questions (one "Yes", one "No") and a caption."""

    image_id: str
    category: str
    scene: Scene
    questions: tuple[Question, Question]
    caption: str
    image: np.ndarray = field(repr=False, compare=False)


def side_of(obj: Obj, side: str) -> bool:
    """Whether an object lies on the given half of the image."""
    return {
        "left": obj.col < GRID // 2,
        "right": obj.col >= GRID // 2,
        "top": obj.row < GRID // 2,
        "bottom": obj.row >= GRID // 2,
    }[side]


def render(scene: Scene) -> np.ndarray:
    """Draw a scene as a uint8 RGB array of shape (64, 64, 3)."""
    rng = np.random.default_rng(scene.noise_seed)
    img = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), scene.background, dtype=np.float32)
    img += rng.normal(0.0, 6.0, size=img.shape)
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    for obj in scene.objects:
        cy = obj.row * CELL + CELL // 2 + obj.dy
        cx = obj.col * CELL + CELL // 2 + obj.dx
        img[_shape_mask(obj.shape, cy, cx, obj.size, yy, xx)] = COLORS[obj.color]
    if scene.word:
        x0, y0 = scene.word_xy
        for i, letter in enumerate(scene.word):
            glyph = np.kron(_glyph(letter), np.ones((2, 2), dtype=bool))  # 10x14 px
            x = x0 + i * 12
            img[y0 : y0 + 14, x : x + 10][glyph] = (245, 245, 245)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(shape: str, cy: int, cx: int, r: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return (np.abs(dy) <= r - 1) & (np.abs(dx) <= r - 1)
    # triangle pointing up: apex at top, base at the bottom
    return (dy <= r - 1) & (dy >= -r) & (np.abs(dx) * 2 <= (dy + r))


def caption(scene: Scene) -> str:
    """A plain description of a scene (auxiliary training target, not a question)."""
    parts = []
    for o in sorted(scene.objects, key=lambda o: (o.row, o.col)):
        vert = "top" if o.row < GRID // 2 else "bottom"
        horiz = "left" if o.col < GRID // 2 else "right"
        parts.append(f"{o.color} {o.shape} {vert} {horiz}")
    if scene.word:
        parts.append(f"word {scene.word.lower()}")
    return " . ".join(parts) + " ." if parts else "empty ."


# ---------------------------------------------------------------------------- scenes


def _free_cells(rng: np.random.Generator, n: int,
                rows: range = range(GRID)) -> list[tuple[int, int]]:
    cells = [(r, c) for r in rows for c in range(GRID)]
    idx = rng.choice(len(cells), size=n, replace=False)
    return [cells[i] for i in idx]


def _objects(rng, specs: list[tuple[str, str]], cells: list[tuple[int, int]]) -> tuple[Obj, ...]:
    out = []
    for (shape, color), (row, col) in zip(specs, cells, strict=True):
        out.append(
            Obj(shape, color, row, col, int(rng.integers(-2, 3)), int(rng.integers(-2, 3)),
                int(rng.integers(5, 7)))
        )
    return tuple(out)


def _pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def _distinct_specs(rng, n: int) -> list[tuple[str, str]]:
    combos = [(s, c) for s in SHAPES for c in COLORS]
    idx = rng.choice(len(combos), size=n, replace=False)
    return [combos[i] for i in idx]


def _scene(rng, objects, word=None, word_xy=(0, 0)) -> Scene:
    return Scene(objects, word, word_xy, int(rng.integers(15, 60)), int(rng.integers(2**31)))


def _existence(rng):
    specs = _distinct_specs(rng, int(rng.integers(1, 4)))
    scene = _scene(rng, _objects(rng, specs, _free_cells(rng, len(specs))))
    shape, color = _pick(rng, specs)
    absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in specs]
    # half the time the absent object shares a shape or colour with a present one (binding)
    near = [a for a in absent if any(a[0] == s or a[1] == c for s, c in specs)]
    ns, nc = _pick(rng, near if near and rng.random() < 0.5 else absent)
    return scene, (
        Question(f"Is there a {color} {shape} in the image?", "Yes"),
        Question(f"Is there a {nc} {ns} in the image?", "No"),
    )


def _count(rng):
    shape = _pick(rng, SHAPES)
    k = int(rng.integers(1, 5))
    others = [s for s in SHAPES if s != shape]
    n_other = int(rng.integers(0, 3))
    specs = [(shape, _pick(rng, list(COLORS))) for _ in range(k)]
    specs += [(_pick(rng, others), _pick(rng, list(COLORS))) for _ in range(n_other)]
    scene = _scene(rng, _objects(rng, specs, _free_cells(rng, len(specs))))
    wrong = k + 1 if k == 1 or rng.random() < 0.5 else k - 1
    return scene, (Question(_count_text(k, shape), "Yes"),
                   Question(_count_text(wrong, shape), "No"))


def _count_text(n: int, shape: str) -> str:
    if n == 1:
        return f"Is there {n} {shape} in the image?"
    return f"Are there {n} {shape}s in the image?"


def _position(rng):
    specs = _distinct_specs(rng, int(rng.integers(1, 4)))
    objs = _objects(rng, specs, _free_cells(rng, len(specs)))
    scene = _scene(rng, objs)
    target = objs[0]
    axis = ("left", "right") if rng.random() < 0.5 else ("top", "bottom")
    yes = axis[0] if side_of(target, axis[0]) else axis[1]
    name = f"{target.color} {target.shape}"
    return scene, (
        Question(f"Is the {name} on the {yes} side of the image?", "Yes"),
        Question(f"Is the {name} on the {SIDES[yes]} side of the image?", "No"),
    )


def _color(rng):
    n = int(rng.integers(1, 4))
    shapes = [SHAPES[i] for i in rng.choice(len(SHAPES), size=n, replace=False)]
    specs = [(s, _pick(rng, list(COLORS))) for s in shapes]
    scene = _scene(rng, _objects(rng, specs, _free_cells(rng, n)))
    shape, color = specs[0]
    wrong = _pick(rng, [c for c in COLORS if c != color])
    return scene, (
        Question(f"Is the {shape} {color}?", "Yes"),
        Question(f"Is the {shape} {wrong}?", "No"),
    )


def _ocr(rng):
    word = _pick(rng, WORDS)
    top = rng.random() < 0.5
    word_xy = (int(rng.integers(0, IMAGE_SIZE - 34)), int(rng.integers(2, 16) + (0 if top else 32)))
    rows = range(2, 4) if top else range(0, 2)  # objects in the other half
    specs = _distinct_specs(rng, int(rng.integers(0, 2)))
    scene = _scene(rng, _objects(rng, specs, _free_cells(rng, len(specs), rows)), word, word_xy)
    wrong = _pick(rng, [w for w in WORDS if w != word])
    return scene, (
        Question(f"Is the word {word.lower()} written in the image?", "Yes"),
        Question(f"Is the word {wrong.lower()} written in the image?", "No"),
    )


_MAKERS = {"existence": _existence, "count": _count, "position": _position, "color": _color,
           "OCR": _ocr}


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


def eval_split(n_per_category: int = 120, seed: int = 0) -> list[Sample]:
    """The fixed held-out split: ``n_per_category`` images for each category."""
    return [make_sample(seed, EVAL_SPLIT, c, i) for c in CATEGORIES for i in range(n_per_category)]


@lru_cache(maxsize=4)
def _eval_keys(n_per_category: int, seed: int) -> frozenset:
    return frozenset(s.scene.key() for s in eval_split(n_per_category, seed))


def train_stream(seed: int = 1, eval_seed: int = 0, n_eval: int = 120,
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
        raise ValueError(f"unknown categories {sorted(unknown)}; known: {CATEGORIES}")
    p = np.array([weights.get(c, 0.0) for c in CATEGORIES], dtype=float)
    rng = np.random.default_rng([seed, 99])
    while True:
        yield CATEGORIES[int(rng.choice(len(CATEGORIES), p=p / p.sum()))]


def vocabulary() -> list[str]:
    """Every word the questions, answers and captions can use (lower case)."""
    words = {"is", "are", "there", "a", "in", "the", "image", "?", "on", "side", "of", "word",
             "written", "yes", "no", "top", "bottom", "left", "right", "empty", "."}
    words |= set(SHAPES) | {s + "s" for s in SHAPES} | set(COLORS)
    words |= {w.lower() for w in WORDS} | {str(n) for n in range(0, 6)}
    return sorted(words)
