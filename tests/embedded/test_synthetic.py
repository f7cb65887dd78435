"""The procedural MME-style data: deterministic, paired, and true to the scenes it draws."""

import re

import numpy as np
import pytest

from mopeq.embedded import glyphs, scenes, synthetic
from mopeq.embedded.scenes import COLORS
from mopeq.embedded.synthetic import CATEGORIES, EVAL_SPLIT, TRAIN_SPLIT, make_sample

N = 12  # images per category in these tests


@pytest.fixture(scope="module")
def split():
    return synthetic.eval_split(n_per_category=N)


def _same(a, b) -> bool:
    return (a.image_id, a.category, a.scene, a.questions, a.caption) == (
        b.image_id, b.category, b.scene, b.questions, b.caption
    ) and np.array_equal(a.image, b.image)


def test_eval_split_is_deterministic(split):
    again = synthetic.eval_split(n_per_category=N)
    assert len(split) == len(again) == N * len(CATEGORIES)
    assert all(_same(a, b) for a, b in zip(split, again, strict=True))


def test_sample_depends_only_on_its_coordinates():
    a = make_sample(0, EVAL_SPLIT, "count", 5)
    assert _same(a, make_sample(0, EVAL_SPLIT, "count", 5))
    assert not _same(a, make_sample(1, EVAL_SPLIT, "count", 5))
    assert not _same(a, make_sample(0, TRAIN_SPLIT, "count", 5))
    assert a.scene != make_sample(0, EVAL_SPLIT, "count", 6).scene


def test_every_image_has_one_yes_and_one_no_question(split):
    for s in split:
        assert len(s.questions) == 2
        assert sorted(q.answer for q in s.questions) == ["No", "Yes"]
        assert s.questions[0].text != s.questions[1].text
    firsts = {s.questions[0].answer for s in split}
    assert firsts == {"Yes", "No"}  # the "Yes" question is not always first


def test_images_are_uint8_rgb_with_unique_ids(split):
    assert len({s.image_id for s in split}) == len(split)
    for s in split:
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    assert [s.category for s in split] == [c for c in CATEGORIES for _ in range(N)]


def _side(a, relation: str, b) -> bool:
    return {"left of": a.col < b.col, "right of": a.col > b.col, "above": a.row < b.row,
            "below": a.row > b.row}[relation]


def _arith(text: str) -> int:
    a, op, b = int(text[0]), text[1], int(text[2])
    return a + b if op == "+" else a * b


def _truth(sample, text: str) -> bool:
    """What the scene says about a question, read independently of the generator."""
    objs = sample.scene.objects
    if m := re.fullmatch(r"Is there a (\w+) (\w+) in the image\?", text):
        return any((o.color, o.shape) == m.groups() for o in objs)
    if m := re.fullmatch(r"(?:Is|Are) there (\d) (\w+?)s? in the image\?", text):
        return sum(o.shape == m.group(2) for o in objs) == int(m.group(1))
    if m := re.fullmatch(r"Is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?",
                         text):
        a = [o for o in objs if (o.color, o.shape) == m.groups()[:2]]
        b = [o for o in objs if (o.color, o.shape) == m.groups()[3:]]
        assert len(a) == len(b) == 1, text  # both objects are named unambiguously
        return _side(a[0], m.group(3), b[0])
    if m := re.fullmatch(r"Is the answer (\d+)\?", text):
        return _arith(sample.scene.text) == int(m.group(1))
    if m := re.fullmatch(r"Is the (\w+) (\w+)\?", text):
        return any(o.shape == m.group(1) and o.color == m.group(2) for o in objs)
    if m := re.fullmatch(r"Is the word (\w+) written in the image\?", text):
        return (sample.scene.text or "").lower() == m.group(1)
    if m := re.fullmatch(r"Is this a photo of (\w+ \w+)\?", text):
        return scenes.landmark_name(sample.scene.landmark) == m.group(1)
    raise AssertionError(f"unknown question form: {text}")


def test_answers_are_true_of_the_scene(split):
    for s in split:
        for q in s.questions:
            assert _truth(s, q.text) == (q.answer == "Yes"), (s.image_id, q)


def test_objects_are_drawn_in_their_colour(split):
    for s in (x for x in split if x.category in ("existence", "landmark")):
        for o in s.scene.objects:
            cy = o.row * scenes.CELL + scenes.CELL // 2 + o.dy
            cx = o.col * scenes.CELL + scenes.CELL // 2 + o.dx
            assert tuple(s.image[cy, cx]) == COLORS[o.color]


def test_train_stream_cycles_categories_and_never_repeats_eval_scenes():
    held_out = {s.scene.key() for s in synthetic.eval_split(n_per_category=N)}
    stream = synthetic.train_stream(seed=1, eval_seed=0, n_eval=N)
    first = [next(stream) for _ in range(40)]
    assert all(s.scene.key() not in held_out for s in first)
    assert {s.category for s in first[:10]} == set(CATEGORIES)
    again = synthetic.train_stream(seed=1, eval_seed=0, n_eval=N)
    assert all(_same(a, next(again)) for a in first)


def test_landmark_catalogue_is_fixed_and_every_entry_is_distinct():
    prints = scenes.landmark_blueprints()
    assert len(prints) == scenes.N_LANDMARKS == len(set(scenes.landmark_names()))
    for i, a in enumerate(prints):
        assert len(a) == 3
        for b in prints[:i]:
            assert len(set(a) & set(b)) < 2
    # a landmark image shows its catalogue entry (jittered), and only that
    s = make_sample(0, EVAL_SPLIT, "landmark", 3)
    entry = prints[s.scene.landmark]
    assert sorted((o.shape, o.color, o.row, o.col) for o in s.scene.objects) == list(entry)


def test_every_text_a_scene_shows_has_a_class_and_renders_inside_the_image(split):
    classes = scenes.text_classes()
    for s in split:
        if s.scene.text:
            assert s.scene.text in classes
            x, _ = s.scene.text_xy
            assert x + glyphs.text_width(s.scene.text) <= scenes.IMAGE_SIZE


def test_vocabulary_covers_every_question_and_caption(split):
    vocab = set(scenes.vocabulary())
    for s in split:
        for text in [q.text for q in s.questions] + [s.caption]:
            words = re.findall(r"\w+|[^\w\s]", text.lower())
            assert set(words) <= vocab, (text, set(words) - vocab)
