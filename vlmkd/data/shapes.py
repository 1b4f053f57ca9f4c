"""The embedded "shapes" data set, exactly as shared/DATASET.md specifies it.

Everything is deterministic from a seed: image i of split s draws from its own generator seeded with
(seed, split, i), so any slice of a split can be regenerated alone and gives the same bytes.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
CELL = 32
MARGIN = 5
SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
COUNT_WORDS = ("zero", "one", "two", "three", "four")
SPLITS = ("train", "val", "test")
CAPTION_PROMPT = "Describe the image."

# The five question types of DATASET.md, numbered as there.
QUESTION_TYPES = {
    1: "color_of_shape",
    2: "shape_at_position",
    3: "count_shape",
    4: "exists_color_shape",
    5: "color_at_position",
}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    color: str
    cell: int  # row-major index 0..8

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


def cell_box(cell: int) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x0, y0, x1, y1) of the object drawn in `cell`."""
    r, c = divmod(cell, 3)
    return CELL * c + MARGIN, CELL * r + MARGIN, CELL * c + CELL - 1 - MARGIN, CELL * r + CELL - 1 - MARGIN


def sample_scene(rng: np.random.Generator) -> list[ShapeObject]:
    """1 to 4 objects in distinct cells, shape and colour uniform and independent; row-major order."""
    n = int(rng.integers(1, 5))
    cells = sorted(int(c) for c in rng.choice(9, size=n, replace=False))
    color_names = list(COLORS)
    return [
        ShapeObject(SHAPES[int(rng.integers(3))], color_names[int(rng.integers(6))], cell) for cell in cells
    ]


def render(scene: list[ShapeObject]) -> Image.Image:
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    for obj in scene:
        x0, y0, x1, y1 = cell_box(obj.cell)
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


def caption(scene: list[ShapeObject]) -> str:
    parts = [f"a {o.color} {o.shape} at the {o.position}" for o in scene]
    if len(parts) == 1:
        text = parts[0]
    else:
        text = ", ".join(parts[:-1]) + " and " + parts[-1]
    return text + "."


def allowed_types(scene: list[ShapeObject]) -> list[int]:
    """Type 1 needs a shape held by exactly one object; the others are always askable."""
    unique = any(sum(o.shape == s for o in scene) == 1 for s in SHAPES)
    return [1, 2, 3, 4, 5] if unique else [2, 3, 4, 5]


def ask(scene: list[ShapeObject], qtype: int, rng: np.random.Generator, balanced: bool = False) -> tuple[str, str]:
    """One question of type `qtype` about `scene` and its one-word answer.

    `balanced` (a training option, not the spec's distribution) asks about an occupied cell or a present
    shape half the time in types 2, 3 and 5, so fewer answers are `nothing` / `zero`.
    """
    by_cell = {o.cell: o for o in scene}

    def pick_cell() -> int:
        if balanced and rng.random() < 0.5:
            return scene[int(rng.integers(len(scene)))].cell
        return int(rng.integers(9))

    if qtype == 1:
        unique = [s for s in SHAPES if sum(o.shape == s for o in scene) == 1]
        shape = unique[int(rng.integers(len(unique)))]
        return f"What color is the {shape}?", next(o.color for o in scene if o.shape == shape)
    if qtype == 2:
        cell = pick_cell()
        return f"What shape is at the {POSITIONS[cell]}?", by_cell[cell].shape if cell in by_cell else "nothing"
    if qtype == 3:
        if balanced and rng.random() < 0.5:
            shape = scene[int(rng.integers(len(scene)))].shape
        else:
            shape = SHAPES[int(rng.integers(3))]
        return f"How many {shape}s are there?", COUNT_WORDS[sum(o.shape == shape for o in scene)]
    if qtype == 4:
        if rng.random() < 0.5:
            obj = scene[int(rng.integers(len(scene)))]
            color, shape = obj.color, obj.shape
        else:
            color, shape = list(COLORS)[int(rng.integers(6))], SHAPES[int(rng.integers(3))]
        present = any(o.color == color and o.shape == shape for o in scene)
        return f"Is there a {color} {shape}?", "yes" if present else "no"
    if qtype == 5:
        cell = pick_cell()
        return (
            f"What color is the object at the {POSITIONS[cell]}?",
            by_cell[cell].color if cell in by_cell else "nothing",
        )
    raise ValueError(f"unknown question type {qtype}")


def random_question(scene: list[ShapeObject], rng: np.random.Generator, balanced: bool = False) -> tuple[int, str, str]:
    """Type uniform over the five; a scene with no uniquely-held shape redraws among types 2-5."""
    types = allowed_types(scene)
    qtype = types[int(rng.integers(len(types)))]
    question, answer = ask(scene, qtype, rng, balanced)
    return qtype, question, answer


def _record(sample_id: str, image: str, qas: list[tuple[str, str]], qtype: int | None,
            kind: str = "questions") -> dict:
    """A LLaVA record; several (question, answer) pairs make a multi-turn conversation. `kind`
    (questions | captions) is what a recipe stage's `data:` selects by (vlmkd.data.select)."""
    conv = []
    for j, (prompt, answer) in enumerate(qas):
        conv.append({"from": "human", "value": f"<image>\n{prompt}" if j == 0 else prompt})
        conv.append({"from": "gpt", "value": answer})
    rec = {"id": sample_id, "image": image, "conversations": conv, "kind": kind}
    if qtype is not None:
        rec["question_type"] = QUESTION_TYPES[qtype]
    return rec


def generate_split(
    split: str, n_images: int, seed: int, questions_per_image: int = 1, caption_every: int = 0,
    turns: int = 1,
    balanced: bool = False,
) -> Iterator[tuple[int, Image.Image, list[dict]]]:
    """Yield (image index, image, records) for one split.

    Each image carries `questions_per_image` question samples, each a conversation of `turns`
    independent questions (turn 1 is exactly a single-question sample; more turns give a trainer
    more answers per image at little extra cost); with `caption_every` = m > 0, every m-th image also
    carries a caption sample (for pre-training, LLaVA-KD's DPT stage).
    """
    split_id = SPLITS.index(split)
    for i in range(n_images):
        rng = np.random.default_rng([seed, split_id, i])
        scene = sample_scene(rng)
        image_rel = f"images/{split}/{i:06d}.png"
        recs = []
        for q in range(questions_per_image):
            asked = [random_question(scene, rng, balanced) for _ in range(turns)]
            qas = [(question, answer) for _, question, answer in asked]
            recs.append(_record(f"shapes-{split}-{i:06d}-q{q}", image_rel, qas, asked[0][0] if turns == 1 else None))
        if caption_every and i % caption_every == 0:
            recs.append(_record(f"shapes-{split}-{i:06d}-cap", image_rel, [(CAPTION_PROMPT, caption(scene))], None,
                                "captions"))
        yield i, render(scene), recs


def text_records(split: str, n: int, seed: int, balanced: bool = False) -> list[dict]:
    """`n` text-only rows (`kind: text`): a scene written out as its caption where the image would be,
    then a question about it or the request to describe it (one in six), answered as the image rows are.
    The language-pretraining corpus of the pretrained-student regime: a language model that has read
    these can answer the questions from words, as a real VLM's LLM could before it saw an image; the
    VLM's image then stands where the caption stood. Scenes come from their own generator stream
    ([seed, split, i, 1]), so the image rows' bytes do not change."""
    split_id = SPLITS.index(split)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, split_id, i, 1])
        scene = sample_scene(rng)
        if rng.random() < 1 / 6:
            qtype, question, answer = None, CAPTION_PROMPT, caption(scene)
        else:
            qtype, question, answer = random_question(scene, rng, balanced)
        rec = {"id": f"shapes-{split}-text-{i:06d}", "kind": "text",
               "conversations": [{"from": "human", "value": f"{caption(scene)}\n{question}"},
                                 {"from": "gpt", "value": answer}]}
        if qtype is not None:
            rec["question_type"] = QUESTION_TYPES[qtype]
        out.append(rec)
    return out


def wrong_answer(question_type: str, answer: str, rng: np.random.Generator) -> str:
    """A plausible wrong one-word answer of the same kind (LLaVA-MoD preference pairs): another colour,
    shape or count word, "nothing" for an occupied cell (or a shape / colour for an empty one), and the
    other of yes / no."""
    if question_type == "exists_color_shape":
        return "no" if answer == "yes" else "yes"
    pool = {"color_of_shape": list(COLORS), "color_at_position": [*COLORS, "nothing"],
            "shape_at_position": [*SHAPES, "nothing"], "count_shape": list(COUNT_WORDS)}[question_type]
    others = [w for w in pool if w != answer]
    return others[int(rng.integers(len(others)))]


def add_preference_pairs(records: list[dict], seed: int) -> list[dict]:
    """Each single-question record gains `rejected`: a plausible wrong answer (its conversation's
    answer is the chosen one). Seeded per sample id, so a record's pair never depends on the others."""
    out = []
    for rec in records:
        qtype = rec.get("question_type")
        if qtype is not None and len(rec["conversations"]) == 2:
            rng = np.random.default_rng([seed, zlib.crc32(rec["id"].encode())])
            rec = {**rec, "rejected": wrong_answer(qtype, rec["conversations"][1]["value"], rng)}
        out.append(rec)
    return out


def write_dataset(
    out: str | Path,
    sizes: dict[str, int],
    seed: int = 0,
    questions_per_image: dict[str, int] | None = None,
    caption_every: dict[str, int] | None = None,
    progress=None,
    turns: dict[str, int] | None = None,
    balanced: set[str] | frozenset[str] = frozenset(),
    preference: set[str] | frozenset[str] = frozenset(),
    text_rows: dict[str, int] | None = None,
) -> dict[str, Path]:
    """Write `out/{split}.json` (LLaVA conversation JSON) and `out/images/{split}/*.png`; splits in
    `preference` get a `rejected` answer on every single-question record (`add_preference_pairs`);
    `text_rows` {split: n} adds n text-only rows after the image rows (`text_records`)."""
    text_rows = text_rows or {}
    out = Path(out)
    questions_per_image = questions_per_image or {}
    caption_every = caption_every or {}
    turns = turns or {}
    paths = {}
    for split, n in sizes.items():
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        records = []
        for i, img, recs in generate_split(
            split, n, seed, questions_per_image.get(split, 1), caption_every.get(split, 0), turns.get(split, 1),
            split in balanced,
        ):
            img.save(out / "images" / split / f"{i:06d}.png", optimize=False)
            records.extend(recs)
            if progress is not None:
                progress(split, 1)
        if split in preference:  # (the image rows' questions: the text rows are language pretraining)
            records = add_preference_pairs(records, seed)
        if text_rows.get(split):
            records.extend(text_records(split, text_rows[split], seed, split in balanced))
        path = out / f"{split}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(records, indent=0))
        tmp.replace(path)
        paths[split] = path
    return paths


def legacy_kind(prompt: str) -> str:
    """The `kind` of a sample in a cache written before samples kept their manifest fields, by the rule
    stages used then: a caption prompt asks for a description (only the shapes set's wording)."""
    return "captions" if prompt.lower().startswith("describe the image") else "questions"


def infer_question_type(question: str) -> str:
    """The question type from its text alone: other people's manifests carry no type field."""
    q = question.replace("<image>", "").strip().lower()
    if q.startswith("what color is the object at the"):
        return QUESTION_TYPES[5]
    if q.startswith("what color is the"):
        return QUESTION_TYPES[1]
    if q.startswith("what shape is at the"):
        return QUESTION_TYPES[2]
    if q.startswith("how many"):
        return QUESTION_TYPES[3]
    if q.startswith("is there a"):
        return QUESTION_TYPES[4]
    if q.startswith("describe the image"):
        return "caption"
    return "other"
