"""The world of the synthetic data: shapes, colours, words, landmarks; scenes and their images.

A ``Scene`` is a few coloured shapes on a ``GRID`` x ``GRID`` lattice, optionally a rendered
text or a landmark; ``render`` draws it as an ``IMAGE_SIZE`` square RGB image and ``caption``
describes it. ``mopeq.embedded.synthetic`` asks questions about scenes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import numpy as np

from mopeq.embedded import glyphs

SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {
    "red": (220, 50, 47),
    "green": (60, 180, 75),
    "blue": (60, 100, 240),
    "yellow": (240, 220, 40),
    "white": (235, 235, 235),
    "purple": (160, 70, 200),
    "orange": (245, 140, 30),
}
# Four-letter words in one-letter pairs: the "No" question of OCR names the partner.
WORDS = ("CART", "CARD", "BOLT", "BELT", "FISH", "DISH", "GOLD", "COLD", "HAND", "LAND",
         "LAMP", "CAMP", "MOON", "MOOD", "ROAD", "READ", "STAR", "SCAR", "TREE", "FREE",
         "BEAR", "BEER", "COAT", "BOAT")
SYLLABLES = ("tor", "vel", "ka", "mir", "sol", "dun", "ara", "bel", "cor", "fen", "gal",
             "hul", "ist", "jor", "lum", "nar")
N_LANDMARKS = 240
IMAGE_SIZE = 64
GRID = 4  # scenes are laid out on a GRID x GRID lattice of cells
CELL = IMAGE_SIZE // GRID
RELATIONS = {"left": ("col", -1), "right": ("col", 1), "above": ("row", -1), "below": ("row", 1)}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}



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
    text: str | None = None  # a written word or a calculation such as "7x8"
    text_xy: tuple[int, int] = (0, 0)
    background: int = 30
    noise_seed: int = 0
    landmark: int | None = None  # catalogue index of a landmark scene

    def key(self) -> tuple:
        """A hashable identity of the scene (used to keep train and eval apart)."""
        return (self.objects, self.text, self.text_xy, self.background, self.noise_seed)


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
    if scene.text:
        glyphs.draw_text(img, scene.text, *scene.text_xy)
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_mask(shape: str, cy: int, cx: int, r: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dy * dy + dx * dx <= r * r
    if shape == "square":
        return (np.abs(dy) <= r - 1) & (np.abs(dx) <= r - 1)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    # triangle pointing up: apex at top, base at the bottom
    return (dy <= r - 1) & (dy >= -r) & (np.abs(dx) * 2 <= (dy + r))


def relation_holds(a: Obj, relation: str, b: Obj) -> bool:
    """Whether ``a`` is ``relation`` ("left", "right", "above", "below") of ``b`` (by cell)."""
    axis, sign = RELATIONS[relation]
    return (getattr(a, axis) - getattr(b, axis)) * sign > 0


def landmark_name(index: int) -> str:
    """The two-syllable name of catalogue entry ``index``."""
    return landmark_names()[index]


@cache
def landmark_names() -> tuple[str, ...]:
    """The ``N_LANDMARKS`` two-syllable landmark names, in catalogue order (fixed seed)."""
    pairs = [f"{a} {b}" for a in SYLLABLES for b in SYLLABLES if a != b]
    order = np.random.default_rng(2024).permutation(len(pairs))[:N_LANDMARKS]
    return tuple(pairs[i] for i in order)


@cache
def landmark_blueprints() -> tuple[tuple[tuple[str, str, int, int], ...], ...]:
    """The catalogue: for each landmark, three (shape, colour, row, col) placements.

    Seeded and fixed. No two entries share two of their three placements, so every entry
    needs its whole configuration to be recognised.
    """
    rng = np.random.default_rng(4242)
    combos = [(s, c) for s in SHAPES for c in COLORS]
    cells = [(r, c) for r in range(GRID) for c in range(GRID)]
    out: list[tuple] = []
    while len(out) < N_LANDMARKS:
        specs = [combos[i] for i in rng.choice(len(combos), 3, replace=False)]
        where = [cells[i] for i in rng.choice(len(cells), 3, replace=False)]
        entry = tuple(sorted((s, c, r, k) for (s, c), (r, k) in zip(specs, where, strict=True)))
        if all(len(set(entry) & set(other)) < 2 for other in out):
            out.append(entry)
    return tuple(out)


def caption(scene: Scene) -> str:
    """A plain description of a scene (auxiliary training target, not a question)."""
    if scene.landmark is not None:
        return f"photo of {landmark_name(scene.landmark)} ."
    parts = []
    for o in sorted(scene.objects, key=lambda o: (o.row, o.col)):
        vert = "top" if o.row < GRID // 2 else "bottom"
        horiz = "left" if o.col < GRID // 2 else "right"
        parts.append(f"{o.color} {o.shape} {vert} {horiz}")
    if scene.text and scene.text[1] in "+x":
        parts.append(f"{scene.text[0]} {scene.text[1]} {scene.text[2]} = {calculate(scene.text)}")
    elif scene.text:
        parts.append(f"word {scene.text.lower()}")
    return " . ".join(parts) + " ." if parts else "empty ."


def calculate(text: str) -> int:
    """The value of a rendered calculation such as ``"7x8"`` or ``"3+4"``."""
    a, op, b = int(text[0]), text[1], int(text[2])
    return a + b if op == "+" else a * b


def text_classes() -> tuple[str, ...]:
    """Every text an image can show (words and calculations), for the vision auxiliary head."""
    sums = [f"{a}+{b}" for a in range(10) for b in range(10)]
    products = [f"{a}x{b}" for a in range(2, 10) for b in range(2, 10)]
    return (*WORDS, *sums, *products)


def vocabulary() -> list[str]:
    """Every word the questions, answers and captions can use (lower case)."""
    words = {"is", "are", "there", "a", "in", "the", "image", "?", "of", "word", "written",
             "yes", "no", "top", "bottom", "left", "right", "above", "below", "empty", ".",
             "this", "photo", "answer", "x", "+", "="}
    words |= set(SHAPES) | {s + "s" for s in SHAPES} | set(COLORS) | set(SYLLABLES)
    words |= {w.lower() for w in WORDS} | {str(n) for n in range(0, 91)}
    return sorted(words)
