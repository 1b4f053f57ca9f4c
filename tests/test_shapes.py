"""The generator against shared/DATASET.md: geometry, colours, texts and every answer rule."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vlmkd.data import shapes
from vlmkd.data.shapes import COLORS, ShapeObject, ask, caption, cell_box, infer_question_type, render


def test_cell_boxes_follow_the_spec():
    assert cell_box(0) == (5, 5, 26, 26)
    assert cell_box(4) == (37, 37, 58, 58)
    assert cell_box(8) == (69, 69, 90, 90)
    assert cell_box(5) == (69, 37, 90, 58)  # row 1, column 2


def test_pixels_at_known_coordinates():
    scene = [ShapeObject("square", "red", 0), ShapeObject("circle", "blue", 4), ShapeObject("triangle", "green", 8)]
    px = np.asarray(render(scene))
    assert px.shape == (96, 96, 3)
    # square fills its whole box, inclusive corners
    for x, y in [(5, 5), (26, 26), (5, 26), (26, 5), (15, 15)]:
        assert tuple(px[y, x]) == COLORS["red"]
    for x, y in [(4, 5), (27, 26), (5, 4), (26, 27)]:
        assert tuple(px[y, x]) == (255, 255, 255)
    # circle: centre filled, box corners white
    assert tuple(px[47, 47]) == COLORS["blue"]
    assert tuple(px[37, 37]) == (255, 255, 255) and tuple(px[58, 58]) == (255, 255, 255)
    # triangle: apex column filled near the top, top corners white, bottom edge filled
    assert tuple(px[70, 79]) == COLORS["green"]
    assert tuple(px[70, 69]) == (255, 255, 255) and tuple(px[70, 90]) == (255, 255, 255)
    assert tuple(px[90, 70]) == COLORS["green"] and tuple(px[90, 89]) == COLORS["green"]
    # empty cells are pure background
    assert (px[0:32, 32:64] == 255).all()


def test_scene_statistics():
    rng = np.random.default_rng(0)
    counts = [len(shapes.sample_scene(rng)) for _ in range(4000)]
    assert set(counts) == {1, 2, 3, 4}
    assert abs(np.mean(counts) - 2.5) < 0.08
    scene = shapes.sample_scene(np.random.default_rng(5))
    cells = [o.cell for o in scene]
    assert cells == sorted(cells) and len(set(cells)) == len(cells)


def test_caption_rules():
    a = ShapeObject("circle", "red", 0)
    b = ShapeObject("square", "blue", 4)
    c = ShapeObject("triangle", "green", 7)
    assert caption([a]) == "a red circle at the top left."
    assert caption([a, b]) == "a red circle at the top left and a blue square at the center."
    assert caption([a, b, c]) == (
        "a red circle at the top left, a blue square at the center and a green triangle at the bottom."
    )


class _Fixed:
    """An rng whose integers() returns queued values, to pin what `ask` picks."""

    def __init__(self, ints, rand=0.9):
        self.ints, self.rand = list(ints), rand

    def integers(self, n):
        v = self.ints.pop(0)
        assert 0 <= v < n
        return v

    def random(self):
        return self.rand


SCENE = [ShapeObject("circle", "red", 0), ShapeObject("square", "blue", 4), ShapeObject("square", "green", 8)]


def test_type1_color_of_unique_shape():
    assert ask(SCENE, 1, _Fixed([0])) == ("What color is the circle?", "red")
    assert shapes.allowed_types([ShapeObject("circle", "red", 0), ShapeObject("circle", "blue", 1)]) == [2, 3, 4, 5]


def test_type2_shape_at_position():
    assert ask(SCENE, 2, _Fixed([4])) == ("What shape is at the center?", "square")
    assert ask(SCENE, 2, _Fixed([1])) == ("What shape is at the top?", "nothing")


def test_type3_counts():
    assert ask(SCENE, 3, _Fixed([1])) == ("How many squares are there?", "two")
    assert ask(SCENE, 3, _Fixed([2])) == ("How many triangles are there?", "zero")


def test_type4_existence():
    assert ask(SCENE, 4, _Fixed([1], rand=0.1)) == ("Is there a blue square?", "yes")
    assert ask(SCENE, 4, _Fixed([0, 0], rand=0.9)) == ("Is there a red circle?", "yes")
    assert ask(SCENE, 4, _Fixed([2, 1], rand=0.9)) == ("Is there a blue square?", "yes")
    assert ask(SCENE, 4, _Fixed([0, 1], rand=0.9)) == ("Is there a red square?", "no")


def test_type5_color_at_position():
    assert ask(SCENE, 5, _Fixed([8])) == ("What color is the object at the bottom right?", "green")
    assert ask(SCENE, 5, _Fixed([3])) == ("What color is the object at the left?", "nothing")


def test_answers_are_consistent_with_the_rendered_scene():
    """Every generated answer re-derived from the scene, over many random samples."""
    rng = np.random.default_rng(3)
    for _ in range(500):
        scene = shapes.sample_scene(rng)
        qtype, q, a = shapes.random_question(scene, rng)
        assert infer_question_type(q) == shapes.QUESTION_TYPES[qtype]
        if qtype == 3:
            shape = q.split()[2][:-1]
            assert shapes.COUNT_WORDS.index(a) == sum(o.shape == shape for o in scene)
        if qtype == 2:
            pos = q[len("What shape is at the ") : -1]
            cell = shapes.POSITIONS.index(pos)
            assert a == next((o.shape for o in scene if o.cell == cell), "nothing")


def test_question_type_mix_and_empty_cell_rate():
    rng = np.random.default_rng(11)
    types, empty = [], []
    for _ in range(5000):
        scene = shapes.sample_scene(rng)
        qtype, _, a = shapes.random_question(scene, rng)
        types.append(qtype)
        if qtype in (2, 5):
            empty.append(a == "nothing")
    frac = np.bincount(types, minlength=6)[1:] / len(types)
    assert all(0.15 < f < 0.25 for f in frac), frac
    assert 0.68 < np.mean(empty) < 0.76


def test_write_dataset_is_deterministic_and_llava_shaped(tmp_path):
    a = shapes.write_dataset(tmp_path / "a", {"train": 5, "test": 3}, seed=7, caption_every={"train": 2})
    b = shapes.write_dataset(tmp_path / "b", {"train": 5, "test": 3}, seed=7, caption_every={"train": 2})
    ra, rb = json.loads(a["train"].read_text()), json.loads(b["train"].read_text())
    assert ra == rb
    assert (tmp_path / "a/images/train/000004.png").read_bytes() == (tmp_path / "b/images/train/000004.png").read_bytes()
    caps = [r for r in ra if r["id"].endswith("-cap")]
    assert len(caps) == 3 and caps[0]["conversations"][0]["value"] == "<image>\nDescribe the image."
    assert ra[0]["image"] == "images/train/000000.png"
    c = shapes.write_dataset(tmp_path / "c", {"train": 5}, seed=8)
    assert json.loads(c["train"].read_text()) != [r for r in ra if not r["id"].endswith("-cap")]


@pytest.mark.parametrize(
    "question,qtype",
    [("<image>\nWhat color is the circle?", "color_of_shape"), ("What color is the object at the top?", "color_at_position"),
     ("How many squares are there?", "count_shape"), ("Is there a red circle?", "exists_color_shape"),
     ("What shape is at the left?", "shape_at_position"), ("Why?", "other")],
)
def test_infer_question_type(question, qtype):
    assert infer_question_type(question) == qtype


def _scene_from_caption(text: str) -> list[ShapeObject]:
    import re

    found = re.findall(r"a (\w+) (\w+) at the ([a-z ]+?)(?=, | and |\.$)", text)
    return [ShapeObject(shape, color, shapes.POSITIONS.index(pos)) for color, shape, pos in found]


def test_text_rows_answer_from_the_written_scene_and_leave_image_rows_alone(tmp_path):
    """The pretrained regime's language corpus: each text-only row's answer re-derived from the scene as
    written in its prompt (the caption where the image would be), deterministic, and the image rows'
    bytes the same with or without it."""
    rows = shapes.text_records("train", 600, seed=5)
    assert rows == shapes.text_records("train", 600, seed=5)
    assert len({r["id"] for r in rows}) == 600 and all("image" not in r and r["kind"] == "text" for r in rows)
    described = 0
    for r in rows:
        scene_text, question = r["conversations"][0]["value"].split("\n")
        answer = r["conversations"][1]["value"]
        scene = _scene_from_caption(scene_text)
        assert 1 <= len(scene) <= 4 and caption(scene) == scene_text
        if question == shapes.CAPTION_PROMPT:
            described += 1
            assert answer == scene_text and "question_type" not in r
            continue
        qtype = infer_question_type(question)
        assert r["question_type"] == qtype
        by_pos = {o.position: o for o in scene}
        if qtype in ("shape_at_position", "color_at_position"):
            obj = by_pos.get(question.split(" at the ")[1][:-1])
            assert answer == ("nothing" if obj is None else obj.shape if qtype == "shape_at_position" else obj.color)
        elif qtype == "count_shape":
            assert shapes.COUNT_WORDS.index(answer) == sum(o.shape == question.split()[2][:-1] for o in scene)
        elif qtype == "exists_color_shape":
            color, shape = question[len("Is there a "):-1].split()
            assert answer == ("yes" if any(o.color == color and o.shape == shape for o in scene) else "no")
        else:
            shape = question[len("What color is the "):-1]
            assert answer == next(o.color for o in scene if o.shape == shape)
    assert 60 < described < 140  # one in six
    plain = shapes.write_dataset(tmp_path / "a", {"train": 6}, seed=5, caption_every={"train": 2})
    more = shapes.write_dataset(tmp_path / "b", {"train": 6}, seed=5, caption_every={"train": 2},
                                text_rows={"train": 10}, preference={"train"})
    a, b = json.loads(plain["train"].read_text()), json.loads(more["train"].read_text())
    assert [{k: v for k, v in r.items() if k != "rejected"} for r in b[: len(a)]] == a
    assert b[len(a):] == shapes.text_records("train", 10, seed=5)  # text rows carry no preference pair
