"""The default dataset: synthetic scenes of colored shapes, with captions and VQA pairs.

It exists so that the whole pipeline can be built, tested and demonstrated without downloading
anything. Every image is drawn from a seed, so the same seed always gives byte-identical files.

A scene holds 1-4 non-overlapping objects on a plain light background. Each object has a color,
a shape and a size, and no two objects in one scene share (color, shape), so "the red circle" always
names exactly one object. Captions and questions are computed from the scene description, never from
pixels, and relations such as "left of" are only stated when the object centres are clearly apart,
so every text is unambiguous and a model can in principle reach 100% accuracy.

All positions and sizes are fractions of the canvas (0..1, y grows downwards) so a scene does not
depend on the resolution it is rendered at.
"""

from __future__ import annotations

import io
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# Strongly distinct, saturated colors; all contrast with the light background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (35, 75, 220),
    "yellow": (235, 195, 0),
    "purple": (135, 40, 175),
    "orange": (245, 125, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
SHAPE_PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
}
# Side of an object's bounding square as a fraction of the canvas side; far enough apart to be
# told apart at a glance.
SIZE_FRACTIONS: dict[str, float] = {"small": 0.18, "large": 0.32}
BACKGROUND: tuple[int, int, int] = (242, 242, 236)
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "count", "exists", "spatial")

# More than four large objects often cannot be placed without overlap.
MAX_OBJECTS = 4
# Free space kept between the bounding squares of two objects, and between an object and the border.
OBJECT_GAP = 0.04
BORDER_GAP = 0.02
# Two centres must be at least this far apart along an axis before "left of"/"above" is stated.
# Placement guarantees it along at least one axis for every pair (0.18 + OBJECT_GAP > 0.15).
CLEAR_MARGIN = 0.15
# A lone object is described relative to the canvas in thirds ("top left"); its centre is kept this
# far away from the third lines so that the description is never a borderline call.
THIRD_LINE_GAP = 0.05

RELATION_PHRASES = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
SIDE_PHRASES = {"left": "on its left", "right": "on its right", "above": "above it", "below": "below it"}
QUESTION_RELATION_PHRASES = {"left": "left of", "right": "right of", "above": "above", "below": "below"}
OPPOSITE_RELATIONS = {"left": "right", "right": "left", "above": "below", "below": "above"}
NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene; x, y is its centre as a fraction of the canvas (y = 0 is the top)."""

    color: str
    shape: str
    size: str
    x: float
    y: float

    @property
    def extent(self) -> float:
        """Side of the object's bounding square as a fraction of the canvas."""
        return SIZE_FRACTIONS[self.size]

    @property
    def name(self) -> str:
        """Color and shape, e.g. "red circle"; unique within a scene."""
        return f"{self.color} {self.shape}"

    @property
    def full_name(self) -> str:
        """Size, color and shape, e.g. "large red circle"."""
        return f"{self.size} {self.name}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class QuestionAnswer:
    question: str
    answer: str
    question_type: str


# --------------------------------------------------------------------------- scene sampling


def sample_scene(rng: np.random.Generator, min_objects: int = 1, max_objects: int = MAX_OBJECTS) -> Scene:
    """Draw a scene of min_objects..max_objects objects with distinct (color, shape) and no overlap."""
    count = int(rng.integers(min_objects, max_objects + 1))
    combinations = [(color, shape) for color in COLORS for shape in SHAPES]
    picked = rng.choice(len(combinations), size=count, replace=False)
    sizes = [str(size) for size in rng.choice(list(SIZE_FRACTIONS), size=count)]
    centres = _place_objects(rng, [SIZE_FRACTIONS[size] for size in sizes])
    objects = tuple(
        SceneObject(color=combinations[index][0], shape=combinations[index][1], size=size, x=x, y=y)
        for index, size, (x, y) in zip(picked, sizes, centres)
    )
    return Scene(objects)


def _place_objects(rng: np.random.Generator, extents: Sequence[float]) -> list[tuple[float, float]]:
    """Random centres for objects of the given extents so that no two bounding squares come close.

    Objects are placed one after another by rejection sampling. An early object can leave too little
    room for the later ones, so after a run of failures the whole layout starts over; the sizes are
    never changed, which keeps the size distribution unbiased.
    """
    for _layout_attempt in range(1000):
        centres: list[tuple[float, float]] = []
        for extent in extents:
            low = extent / 2 + BORDER_GAP
            for _position_attempt in range(100):
                x, y = (float(value) for value in rng.uniform(low, 1 - low, size=2))
                if len(extents) == 1 and (_near_third_line(x) or _near_third_line(y)):
                    continue
                if all(_apart(x, y, extent, *other, extents[i]) for i, other in enumerate(centres)):
                    centres.append((x, y))
                    break
            else:
                break  # no room left for this object: start the layout over
        if len(centres) == len(extents):
            return centres
    raise RuntimeError(f"could not place objects of extents {list(extents)} without overlap")


def _apart(x: float, y: float, extent: float, other_x: float, other_y: float, other_extent: float) -> bool:
    needed = (extent + other_extent) / 2 + OBJECT_GAP
    return abs(x - other_x) >= needed or abs(y - other_y) >= needed


def _near_third_line(coordinate: float) -> bool:
    return min(abs(coordinate - 1 / 3), abs(coordinate - 2 / 3)) < THIRD_LINE_GAP


# --------------------------------------------------------------------------- geometry in words


def clear_relations(subject: SceneObject, reference: SceneObject) -> set[str]:
    """Every relation ("left", "right", "above", "below") of `subject` to `reference` that clearly holds."""
    dx, dy = subject.x - reference.x, subject.y - reference.y
    relations = set()
    if dx <= -CLEAR_MARGIN:
        relations.add("left")
    if dx >= CLEAR_MARGIN:
        relations.add("right")
    if dy <= -CLEAR_MARGIN:
        relations.add("above")
    if dy >= CLEAR_MARGIN:
        relations.add("below")
    return relations


def main_relation(subject: SceneObject, reference: SceneObject) -> str:
    """The relation along the axis where the two centres are furthest apart (what a person would say)."""
    dx, dy = subject.x - reference.x, subject.y - reference.y
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def canvas_position(obj: SceneObject) -> str:
    """Where an object sits on the canvas, by thirds, e.g. "in the top left of the image"."""
    horizontal = ("left", "center", "right")[min(int(obj.x * 3), 2)]
    vertical = ("top", "middle", "bottom")[min(int(obj.y * 3), 2)]
    if (vertical, horizontal) == ("middle", "center"):
        return "in the center of the image"
    if vertical == "middle":
        return f"on the {horizontal} of the image"
    if horizontal == "center":
        return f"at the {vertical} of the image"
    return f"in the {vertical} {horizontal} of the image"


# --------------------------------------------------------------------------- captions


def write_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Three differently phrased references that each name every object and at least one relation."""
    objects = scene.objects
    if len(objects) == 1:
        (obj,) = objects
        where = canvas_position(obj)
        return [f"a {obj.full_name} {where}.", f"there is a {obj.full_name} {where}.",
                f"the image shows a {obj.full_name} {where}."]
    return [
        _chain_caption(_shuffled(objects, rng)),
        _inventory_caption(_shuffled(objects, rng)),
        _anchor_caption(_shuffled(objects, rng)),
    ]


def _chain_caption(objects: Sequence[SceneObject]) -> str:
    """ "a large red circle to the left of a small blue square and a small green star below the blue square." """
    first, second = objects[0], objects[1]
    clauses = [f"a {first.full_name} {RELATION_PHRASES[main_relation(first, second)]} a {second.full_name}"]
    for previous, current in zip(objects[1:], objects[2:]):
        relation = RELATION_PHRASES[main_relation(current, previous)]
        clauses.append(f"a {current.full_name} {relation} the {previous.name}")
    return _join_list(clauses) + "."


def _inventory_caption(objects: Sequence[SceneObject]) -> str:
    """ "there are two objects: a large red circle and a small blue square. the red circle is above the
    blue square." """
    listing = _join_list([f"a {obj.full_name}" for obj in objects])
    subject, reference = objects[0], objects[1]
    relation = RELATION_PHRASES[main_relation(subject, reference)]
    return (
        f"there are {NUMBER_WORDS[len(objects)]} objects: {listing}. "
        f"the {subject.name} is {relation} the {reference.name}."
    )


def _anchor_caption(objects: Sequence[SceneObject]) -> str:
    """ "there is a small blue square and, on its left, a large red circle." plus one sentence per extra object."""
    anchor, neighbour = objects[0], objects[1]
    sentences = [
        f"there is a {anchor.full_name} and, {SIDE_PHRASES[main_relation(neighbour, anchor)]}, "
        f"a {neighbour.full_name}."
    ]
    for obj in objects[2:]:
        sentences.append(
            f"there is also a {obj.full_name} {RELATION_PHRASES[main_relation(obj, anchor)]} the {anchor.name}."
        )
    return " ".join(sentences)


def _join_list(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _shuffled(objects: Sequence[SceneObject], rng: np.random.Generator) -> list[SceneObject]:
    return [objects[index] for index in rng.permutation(len(objects))]


# --------------------------------------------------------------------------- questions


def ask_questions(scene: Scene, rng: np.random.Generator) -> list[QuestionAnswer]:
    """4-6 distinct questions with single-word answers, covering every type the scene allows.

    One question of each type comes first (a type is skipped when the scene cannot support an
    unambiguous question of it, e.g. "spatial" with a single object), then random extra questions.
    """
    questions = [qa for qa in (_ASKERS[kind](scene, rng) for kind in QUESTION_TYPES) if qa is not None]
    target = int(rng.integers(4, 7))
    # Small scenes have only a few distinct questions, so the extra draws are capped, not looped forever.
    for _attempt in range(20):
        if len(questions) >= target:
            break
        extra = _ASKERS[str(rng.choice(QUESTION_TYPES))](scene, rng)
        if extra is not None and extra.question not in {qa.question for qa in questions}:
            questions.append(extra)
    return [questions[index] for index in rng.permutation(len(questions))]


def _color_question(scene: Scene, rng: np.random.Generator) -> QuestionAnswer | None:
    """ "what color is the circle?" -- only for a shape that occurs once, so the answer is unique."""
    shape_counts = Counter(obj.shape for obj in scene.objects)
    candidates = [obj for obj in scene.objects if shape_counts[obj.shape] == 1]
    if not candidates:
        return None
    obj = candidates[int(rng.integers(len(candidates)))]
    return QuestionAnswer(f"what color is the {obj.shape}?", obj.color, "color")


def _shape_question(scene: Scene, rng: np.random.Generator) -> QuestionAnswer | None:
    """ "what shape is the red object?" -- only for a color that occurs once."""
    color_counts = Counter(obj.color for obj in scene.objects)
    candidates = [obj for obj in scene.objects if color_counts[obj.color] == 1]
    if not candidates:
        return None
    obj = candidates[int(rng.integers(len(candidates)))]
    return QuestionAnswer(f"what shape is the {obj.color} object?", obj.shape, "shape")


def _count_question(scene: Scene, rng: np.random.Generator) -> QuestionAnswer:
    """Half ask for all objects; the rest ask for one shape, now and then an absent one (answer "0").

    The shape is that of a random object, so shapes occurring several times are asked about more
    often; otherwise almost every per-shape answer would be "1".
    """
    if rng.random() < 0.5:
        return QuestionAnswer("how many objects are there?", str(len(scene.objects)), "count")
    shape_counts = Counter(obj.shape for obj in scene.objects)
    if rng.random() < 0.2:
        shape = str(rng.choice([shape for shape in SHAPES if shape not in shape_counts]))
    else:
        shape = scene.objects[int(rng.integers(len(scene.objects)))].shape
    return QuestionAnswer(f"how many {SHAPE_PLURALS[shape]} are there?", str(shape_counts[shape]), "count")


def _exists_question(scene: Scene, rng: np.random.Generator) -> QuestionAnswer:
    """ "is there a green triangle?" with "yes" and "no" equally likely."""
    present = {(obj.color, obj.shape) for obj in scene.objects}
    if rng.random() < 0.5:
        obj = scene.objects[int(rng.integers(len(scene.objects)))]
        color, shape, answer = obj.color, obj.shape, "yes"
    else:
        absent = [(color, shape) for color in COLORS for shape in SHAPES if (color, shape) not in present]
        color, shape = absent[int(rng.integers(len(absent)))]
        answer = "no"
    return QuestionAnswer(f"is there a {color} {shape}?", answer, "exists")


def _spatial_question(scene: Scene, rng: np.random.Generator) -> QuestionAnswer | None:
    """ "is the red circle left of the blue square?" -- asked about a clear relation or its opposite, 50/50."""
    if len(scene.objects) < 2:
        return None
    first, second = rng.choice(len(scene.objects), size=2, replace=False)
    subject, reference = scene.objects[first], scene.objects[second]
    true_relation = str(rng.choice(sorted(clear_relations(subject, reference))))
    if rng.random() < 0.5:
        asked, answer = true_relation, "yes"
    else:
        asked, answer = OPPOSITE_RELATIONS[true_relation], "no"
    question = f"is the {subject.name} {QUESTION_RELATION_PHRASES[asked]} the {reference.name}?"
    return QuestionAnswer(question, answer, "spatial")


_ASKERS = {
    "color": _color_question,
    "shape": _shape_question,
    "count": _count_question,
    "exists": _exists_question,
    "spatial": _spatial_question,
}


# --------------------------------------------------------------------------- rendering and records


def render_scene(scene: Scene, image_size: int) -> Image.Image:
    """Draw the scene as an RGB image of image_size x image_size pixels."""
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, image_size)
    return image


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, image_size: int) -> None:
    x, y, r = obj.x * image_size, obj.y * image_size, obj.extent * image_size / 2
    fill = COLORS[obj.color]
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    elif obj.shape == "star":
        # Five points; a fat inner radius keeps the star recognisable at small sizes.
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        draw.polygon([(x + float(rad * np.cos(a)), y + float(rad * np.sin(a))) for rad, a in zip(radii, angles)],
                     fill=fill)
    elif obj.shape == "cross":
        arm = r / 3
        draw.rectangle((x - r, y - arm, x + r, y + arm), fill=fill)
        draw.rectangle((x - arm, y - r, x + arm, y + r), fill=fill)
    else:
        raise ValueError(f"unknown shape {obj.shape!r}; known shapes: {SHAPES}")


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of image `index`: independent per image, so any image can be regenerated alone."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def scene_record(scene: Scene, rng: np.random.Generator, image_id: str, image_size: int) -> dict[str, Any]:
    """Render a scene and describe it as one row of the dataset format (vlm.data.dataset_io)."""
    buffer = io.BytesIO()
    render_scene(scene, image_size).save(buffer, format="PNG")
    captions = write_captions(scene, rng)
    questions = ask_questions(scene, rng)
    return {
        "image_id": image_id,
        "image": buffer.getvalue(),
        "captions": captions,
        "questions": [qa.question for qa in questions],
        "answers": [[qa.answer] for qa in questions],
        "question_types": [qa.question_type for qa in questions],
        "regions": [{"x": obj.x, "y": obj.y, "w": obj.extent, "h": obj.extent, "phrase": obj.full_name}
                    for obj in scene.objects],  # boxes: each object's bounding square
    }


def generate_records(
    seed: int,
    num_images: int,
    image_size: int = 224,
    min_objects: int = 1,
    max_objects: int = MAX_OBJECTS,
    id_prefix: str = "synthetic",
) -> Iterator[dict[str, Any]]:
    """Lazily yield `num_images` records with ids "{id_prefix}-000000", ...; same arguments, same bytes."""
    _check_arguments(seed, num_images, image_size, min_objects, max_objects, id_prefix)
    return _records(seed, num_images, image_size, min_objects, max_objects, id_prefix)


def _records(
    seed: int, num_images: int, image_size: int, min_objects: int, max_objects: int, id_prefix: str
) -> Iterator[dict[str, Any]]:
    for index in range(num_images):
        rng = image_rng(seed, index)
        scene = sample_scene(rng, min_objects, max_objects)
        yield scene_record(scene, rng, f"{id_prefix}-{index:06d}", image_size)


def split_seed(seed: int, split: str) -> int:
    """A seed for one split, derived from the dataset seed and the split's name.

    Keying by name (not by position in a dict) means that adding or reordering splits never changes
    an existing split, and that the test split never shares a random stream with train or val.
    """
    key = zlib.crc32(split.encode())  # stable across runs, unlike hash()
    return int(np.random.SeedSequence(seed, spawn_key=(key,)).generate_state(1, np.uint64)[0])


def generate_splits(
    seed: int,
    sizes: Mapping[str, int],
    image_size: int = 224,
    min_objects: int = 1,
    max_objects: int = MAX_OBJECTS,
) -> dict[str, Iterator[dict[str, Any]]]:
    """Lazy record iterators per split (e.g. {"train": 2000, "val": 200, "test": 200}).

    Image ids are prefixed with the split name ("train-000123"), so they are unique across splits.
    """
    if not sizes:
        raise ValueError("generate_splits: `sizes` is empty; give at least one split, e.g. {'train': 1000}")
    return {
        split: generate_records(split_seed(seed, split), count, image_size, min_objects, max_objects, split)
        for split, count in sizes.items()
    }


def _check_arguments(
    seed: int, num_images: int, image_size: int, min_objects: int, max_objects: int, id_prefix: str
) -> None:
    problems = []
    if not isinstance(seed, int | np.integer) or seed < 0:
        problems.append(f"seed must be a non-negative integer, got {seed!r}")
    if num_images < 1:
        problems.append(f"num_images must be >= 1, got {num_images}")
    if image_size < 32:
        problems.append(f"image_size must be >= 32 pixels so small shapes stay recognisable, got {image_size}")
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        problems.append(
            f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS}, got min_objects={min_objects}, "
            f"max_objects={max_objects}"
        )
    if not id_prefix:
        problems.append("id_prefix (the split name) must be a non-empty string")
    if problems:
        raise ValueError("synthetic dataset: " + "; ".join(problems))
