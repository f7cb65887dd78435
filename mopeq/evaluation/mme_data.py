"""MME data: one item type for every source, the loaders, and the seeded quick subset.

Sources: the procedural split (``"synthetic"``), a local copy of MME in the official release
layout or as parquet in the ``lmms-lab/MME`` layout, and the hub data set where a network
exists. Every source yields items with ``image_id``, ``category``, ``questions`` (two
``scenes.Question``) and ``image``, so evaluation treats them alike.
"""

from __future__ import annotations

import io
import os
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mopeq.core.errors import MopeqError
from mopeq.embedded import synthetic
from mopeq.embedded.scenes import Question

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
              "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
             "code_reasoning")
# Official release: these subtasks keep images in images/ and their questions in
# questions_answers_YN/; the others keep image.jpg beside image.txt.
SPLIT_FOLDER_SUBTASKS = ("artwork", "celebrity", "landmark", "posters", "scene")
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG", ".JPEG")
HUB_DATASET = "lmms-lab/MME"


@dataclass(frozen=True)
class MMEItem:
    """One MME image with its questions; the image is decoded only when asked for."""

    image_id: str
    category: str
    questions: tuple[Question, ...]
    source: bytes | Path = field(repr=False)  # encoded image bytes or an image file

    @property
    def image(self):
        """The image as an RGB ``PIL.Image``."""
        from PIL import Image

        src = io.BytesIO(self.source) if isinstance(self.source, bytes) else self.source
        with Image.open(src) as im:
            return im.convert("RGB")


def category_order(category: str) -> tuple[int, str]:
    """Sort key: MME's subtask order, unknown names after it alphabetically."""
    order = PERCEPTION + COGNITION
    return (order.index(category) if category in order else len(order), category)


def load_dataset(spec: str = "synthetic") -> list:
    """Items of ``"synthetic"``, a local MME folder or parquet, or a hub data set id.

    Args:
        spec: ``"synthetic"`` (the held-out procedural split), a folder in the official
            release layout, a parquet file or a folder of parquet shards (``lmms-lab/MME``
            layout), or a hub id such as ``"lmms-lab/MME"``.

    Returns:
        Items sorted by category (MME order) and image id.

    Raises:
        MopeqError: for a path that holds no MME data, malformed data (an image without
            exactly two questions), or a hub id on an offline machine.
    """
    spec = (spec or "").strip()
    if spec == "synthetic":
        return synthetic.eval_split()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".parquet":
        return load_parquet([path])
    if path.is_dir():
        shards = sorted(path.rglob("*.parquet"))
        return load_parquet(shards) if shards else load_release_folder(path)
    if path.exists() or spec.count("/") != 1 or spec.startswith((".", "/", "~")):
        raise MopeqError(f"no MME data at {spec!r}: expected 'synthetic', a folder in the "
                         "official release layout, a parquet file/folder, or a hub id")
    return load_parquet(_hub_shards(spec))


# ------------------------------------------------------------------ official release


def load_release_folder(root: str | Path) -> list[MMEItem]:
    """Items of a folder in the official MME release layout (``MME_Benchmark_release_version``).

    Each subtask folder holds, per image, a text file of ``question<TAB>answer`` lines: beside
    the image, or in ``questions_answers_YN/`` with the image in ``images/`` (artwork,
    celebrity, landmark, posters, scene). The root may also be a parent of the release folder.
    """
    base = _release_root(Path(root))
    items = []
    for category in PERCEPTION + COGNITION:
        folder = base / category
        if folder.is_dir():
            items += _subtask_items(folder, category)
    return _sorted(items)


def _release_root(root: Path) -> Path:
    known = PERCEPTION + COGNITION
    for cand in [root, *sorted(root.glob("*")), *sorted(root.glob("*/*"))]:
        if cand.is_dir() and any((cand / c).is_dir() for c in known):
            return cand
    raise MopeqError(f"{root} is not an MME copy: no subtask folder ({', '.join(known[:4])}, "
                     "...) and no parquet files in it")


def _subtask_items(folder: Path, category: str) -> list[MMEItem]:
    split = (folder / "questions_answers_YN").is_dir()
    text_dir = folder / "questions_answers_YN" if split else folder
    image_dir = folder / "images" if split else folder
    items = []
    for txt in sorted(text_dir.glob("*.txt")):
        image = next((image_dir / (txt.stem + s) for s in IMAGE_SUFFIXES
                      if (image_dir / (txt.stem + s)).is_file()), None)
        if image is None:
            raise MopeqError(f"no image for {txt} in {image_dir}")
        items.append(MMEItem(image.name, category, _read_questions(txt), image))
    return items


def _read_questions(txt: Path) -> tuple[Question, ...]:
    questions = []
    for n, line in enumerate(txt.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise MopeqError(f"{txt}:{n}: expected 'question<TAB>answer', got {line!r}")
        questions.append(Question(parts[0].strip(), parts[1].strip()))
    return _checked(tuple(questions), str(txt))


def _checked(questions: tuple[Question, ...], where: str) -> tuple[Question, ...]:
    if len(questions) != 2:
        raise MopeqError(f"{where}: an MME image needs exactly two questions, "
                         f"found {len(questions)}")
    if sorted(q.answer.lower() for q in questions) != ["no", "yes"]:
        raise MopeqError(f"{where}: expected one 'Yes' and one 'No' answer, got "
                         f"{[q.answer for q in questions]}")
    return questions


# ------------------------------------------------------------------ parquet and hub


def load_parquet(files: Sequence[str | Path]) -> list[MMEItem]:
    """Items of parquet shards in the ``lmms-lab/MME`` layout (one row per question).

    Columns: ``question_id`` (the image's file name), ``image`` (a ``{"bytes", "path"}``
    struct or raw bytes), ``question``, ``answer``, ``category``.
    """
    import pyarrow.parquet as pq

    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for f in files:
        for row in pq.read_table(f).to_pylist():
            row["_dir"] = Path(f).parent  # image paths in the struct are relative to the shard
            groups[(row["category"], str(row["question_id"]))].append(row)
    if not groups:
        raise MopeqError(f"no rows in {[str(f) for f in files]}")
    return _sorted([_parquet_item(cat, qid, rows) for (cat, qid), rows in groups.items()])


def _parquet_item(category: str, image_id: str, rows: list[dict]) -> MMEItem:
    questions = tuple(Question(str(r["question"]).strip(), str(r["answer"]).strip()) for r in rows)
    image = rows[0]["image"]
    if isinstance(image, dict):
        path = image.get("path")
        image = image.get("bytes") or (rows[0]["_dir"] / path if path else None)
    if image is None:
        raise MopeqError(f"{category}/{image_id}: the row has no image bytes or path")
    return MMEItem(image_id, category, _checked(questions, f"{category}/{image_id}"), image)


def _hub_shards(repo_id: str) -> list[Path]:
    """Download the parquet shards of a hub data set, or say clearly that we are offline."""
    try:
        from huggingface_hub import HfApi, snapshot_download

        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise OSError("HF_HUB_OFFLINE=1")
        info = HfApi().dataset_info(repo_id, timeout=10)
        local = snapshot_download(repo_id, repo_type="dataset", revision=info.sha,
                                  allow_patterns=["*.parquet"])
    except Exception as exc:  # noqa: BLE001 - any failure here means "not reachable"
        raise MopeqError(
            f"cannot fetch the data set {repo_id!r} from the Hugging Face Hub "
            f"({type(exc).__name__}: {str(exc)[:160]}); this machine looks offline. Download "
            "MME elsewhere and pass its local copy (the official release folder or the "
            "lmms-lab/MME parquet files) with --dataset PATH."
        ) from None
    shards = sorted(Path(local).rglob("*.parquet"))
    if not shards:
        raise MopeqError(f"the hub data set {repo_id!r} has no parquet files")
    return shards


def _sorted(items: list[MMEItem]) -> list[MMEItem]:
    return sorted(items, key=lambda it: (category_order(it.category), it.image_id))


# ---------------------------------------------------------------------- quick subset


def quick_subset(items: Sequence, pairs: int, seed: int = 0) -> list:
    """A seeded subset of ``pairs`` whole images (each with its two questions), by category.

    Allocation: with at least as many pairs as categories, every category gets one image and
    the rest is shared in proportion to each category's remaining images, rounded by largest
    remainder (ties go to the larger category, then by name). With fewer pairs than
    categories, a seeded draw picks the categories that get one image each. Within a
    category the images are drawn without replacement; the subset keeps the input order.

    Raises:
        MopeqError: if ``pairs`` is not positive.
    """
    if pairs <= 0:
        raise MopeqError(f"pairs must be positive, got {pairs}")
    if pairs >= len(items):
        return list(items)
    rng = np.random.default_rng(seed)
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_cat[it.category].append(i)
    quota = _allocate({c: len(ix) for c, ix in by_cat.items()}, pairs, rng)
    chosen = [int(i) for c in sorted(by_cat) if quota[c]
              for i in rng.choice(by_cat[c], size=quota[c], replace=False)]
    return [items[i] for i in sorted(chosen)]


def _allocate(sizes: dict[str, int], pairs: int, rng: np.random.Generator) -> dict[str, int]:
    """Images per category (see ``quick_subset``); ``pairs`` < total images."""
    cats = sorted(sizes)
    if pairs < len(cats):
        picked = {cats[i] for i in rng.choice(len(cats), size=pairs, replace=False)}
        return {c: int(c in picked) for c in cats}
    rest, room = pairs - len(cats), sum(sizes.values()) - len(cats)
    exact = {c: rest * (sizes[c] - 1) / room for c in cats}
    quota = {c: 1 + int(exact[c]) for c in cats}
    left = pairs - sum(quota.values())
    for c in sorted(cats, key=lambda c: (-(exact[c] - int(exact[c])), -sizes[c], c))[:left]:
        quota[c] += 1
    return quota
