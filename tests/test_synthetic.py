"""The synthetic scenes: determinism, geometry, and texts that agree with the scene.

Answers and relations are recomputed here from the scene description with the test's own logic
(not with the generator's helpers), so a bug in the generator shows up as a disagreement.
"""

from __future__ import annotations

import io
import itertools
import re
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from vlm.data.dataset_io import write_split
from vlm.data.synthetic import (
    BACKGROUND,
    BORDER_GAP,
    COLORS,
    MAX_OBJECTS,
    OBJECT_GAP,
    QUESTION_TYPES,
    SHAPES,
    SIZE_FRACTIONS,
    Scene,
    SceneObject,
    generate_records,
    generate_splits,
    image_rng,
    sample_scene,
)

SEED = 11
NUM_IMAGES = 400  # enough for the rough distribution checks, ~1 s at 48 px
IMAGE_SIZE = 48
# A relation is only "clear" in these tests if centres differ by this much along that axis.
TEST_MARGIN = 0.1


@pytest.fixture(scope="module")
def records_and_scenes() -> list[tuple[dict, Scene]]:
    records = list(generate_records(SEED, NUM_IMAGES, image_size=IMAGE_SIZE))
    # The record for image i is drawn from image_rng(seed, i), scene first, so the scene can be recovered.
    scenes = [sample_scene(image_rng(SEED, index)) for index in range(NUM_IMAGES)]
    return list(zip(records, scenes))


def holds(relation: str, subject: SceneObject, reference: SceneObject) -> bool:
    dx, dy = subject.x - reference.x, subject.y - reference.y
    return {
        "left": dx <= -TEST_MARGIN,
        "right": dx >= TEST_MARGIN,
        "above": dy <= -TEST_MARGIN,
        "below": dy >= TEST_MARGIN,
    }[relation]


def by_name(scene: Scene) -> dict[str, SceneObject]:
    return {f"{obj.color} {obj.shape}": obj for obj in scene.objects}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    paths = [tmp_path / name for name in ("a.parquet", "b.parquet", "c.parquet")]
    for path, seed in zip(paths, (5, 5, 6)):
        write_split(generate_records(seed, 12, image_size=IMAGE_SIZE), path)
    first, second, other = (path.read_bytes() for path in paths)
    assert first == second
    assert first != other


def test_scenes_have_distinct_non_overlapping_objects_inside_the_canvas() -> None:
    for index in range(300):
        scene = sample_scene(image_rng(SEED, index), min_objects=1, max_objects=MAX_OBJECTS)
        objects = scene.objects
        assert 1 <= len(objects) <= MAX_OBJECTS
        assert len({(obj.color, obj.shape) for obj in objects}) == len(objects)
        for obj in objects:
            half = SIZE_FRACTIONS[obj.size] / 2
            assert BORDER_GAP <= obj.x - half and obj.x + half <= 1 - BORDER_GAP
            assert BORDER_GAP <= obj.y - half and obj.y + half <= 1 - BORDER_GAP
        for a, b in itertools.combinations(objects, 2):
            needed = (SIZE_FRACTIONS[a.size] + SIZE_FRACTIONS[b.size]) / 2 + OBJECT_GAP
            assert abs(a.x - b.x) >= needed or abs(a.y - b.y) >= needed, (index, a, b)


def test_rendered_image_shows_each_object_at_its_centre(records_and_scenes) -> None:
    for record, scene in records_and_scenes[:50]:
        image = Image.open(io.BytesIO(record["image"]))
        assert image.size == (IMAGE_SIZE, IMAGE_SIZE) and image.mode == "RGB"
        # Corners stay background: objects keep a border gap.
        assert image.getpixel((0, 0)) == BACKGROUND
        for obj in scene.objects:
            centre = (int(obj.x * IMAGE_SIZE), int(obj.y * IMAGE_SIZE))
            assert image.getpixel(centre) == COLORS[obj.color], (record["image_id"], obj)


def test_captions_name_every_object_and_only_true_relations(records_and_scenes) -> None:
    relation = r"(to the left of|to the right of|above|below)"
    pair_patterns = [
        # "a large red circle to the left of a small blue square" / "... below the blue square"
        re.compile(rf"\b(?:a|the) (?:small |large )?(\w+ \w+) {relation} (?:a|the) (?:small |large )?(\w+ \w+)"),
        # "the red circle is above the blue square"
        re.compile(rf"\bthe (\w+ \w+) is {relation} the (\w+ \w+)"),
    ]
    # "there is a small blue square and, on its left, a large red circle": the second object is the subject.
    anchor_pattern = re.compile(
        r"there is a (?:small|large) (\w+ \w+) and, (on its left|on its right|above it|below it), "
        r"a (?:small|large) (\w+ \w+)"
    )
    phrase_to_relation = {
        "to the left of": "left", "to the right of": "right", "above": "above", "below": "below",
        "on its left": "left", "on its right": "right", "above it": "above", "below it": "below",
    }
    for record, scene in records_and_scenes:
        captions = record["captions"]
        objects = by_name(scene)
        assert len(captions) >= 2 and len(set(captions)) == len(captions)
        for caption in captions:
            assert caption == caption.lower() and caption.endswith(".")
            for obj in scene.objects:
                assert f"{obj.size} {obj.color} {obj.shape}" in caption, (caption, obj)
            if len(scene.objects) == 1:
                assert_canvas_position_is_right(caption, scene.objects[0])
                continue
            statements = [match.groups() for pattern in pair_patterns for match in pattern.finditer(caption)]
            statements += [(s, p, r) for r, p, s in (m.groups() for m in anchor_pattern.finditer(caption))]
            assert statements, caption
            for subject, phrase, reference in statements:
                assert holds(phrase_to_relation[phrase], objects[subject], objects[reference]), (caption, scene)


def assert_canvas_position_is_right(caption: str, obj: SceneObject) -> None:
    horizontal = "left" if obj.x < 1 / 3 else "right" if obj.x > 2 / 3 else None
    vertical = "top" if obj.y < 1 / 3 else "bottom" if obj.y > 2 / 3 else None
    words = set(re.findall(r"\w+", caption))
    assert {"left", "right"} & words == ({horizontal} if horizontal else set()), (caption, obj)
    assert {"top", "bottom"} & words == ({vertical} if vertical else set()), (caption, obj)
    assert ("center" in words) == (horizontal is None and vertical is None), (caption, obj)


def recompute_answer(question: str, scene: Scene) -> tuple[str, str]:
    """(question type, answer) computed from the scene for every question form the generator may ask."""
    objects = scene.objects
    if match := re.fullmatch(r"what color is the (\w+)\?", question):
        (obj,) = [obj for obj in objects if obj.shape == match[1]]  # must be unambiguous
        return "color", obj.color
    if match := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (obj,) = [obj for obj in objects if obj.color == match[1]]
        return "shape", obj.shape
    if question == "how many objects are there?":
        return "count", str(len(objects))
    if match := re.fullmatch(r"how many (\w+) are there\?", question):
        shape = match[1].removesuffix("es") if match[1] == "crosses" else match[1].removesuffix("s")
        assert shape in SHAPES, question
        return "count", str(sum(obj.shape == shape for obj in objects))
    if match := re.fullmatch(r"is there a (\w+) (\w+)\?", question):
        present = any((obj.color, obj.shape) == (match[1], match[2]) for obj in objects)
        return "exists", "yes" if present else "no"
    if match := re.fullmatch(r"is the (\w+ \w+) (left of|right of|above|below) the (\w+ \w+)\?", question):
        subject, reference = by_name(scene)[match[1]], by_name(scene)[match[3]]
        relation = match[2].removesuffix(" of")
        opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}[relation]
        # The question must be decidable: the relation or its opposite clearly holds.
        assert holds(relation, subject, reference) or holds(opposite, subject, reference), (question, scene)
        return "spatial", "yes" if holds(relation, subject, reference) else "no"
    raise AssertionError(f"unexpected question form: {question!r}")


def test_vqa_answers_agree_with_the_scene(records_and_scenes) -> None:
    for record, scene in records_and_scenes:
        questions = record["questions"]
        assert 4 <= len(questions) <= 6 and len(set(questions)) == len(questions)
        assert len(record["answers"]) == len(questions) == len(record["question_types"])
        for question, answers, question_type in zip(questions, record["answers"], record["question_types"]):
            assert len(answers) == 1 and re.fullmatch(r"\w+", answers[0])
            assert (question_type, answers[0]) == recompute_answer(question, scene), (question, scene)


def assert_roughly_uniform(counts: Counter, values: list[str], tolerance: float = 0.5) -> None:
    total = sum(counts[value] for value in values)
    for value in values:
        share = counts[value] / total
        assert abs(share - 1 / len(values)) <= tolerance / len(values), (value, dict(counts))


def test_attributes_and_answers_are_roughly_balanced(records_and_scenes) -> None:
    objects = [obj for _, scene in records_and_scenes for obj in scene.objects]
    assert_roughly_uniform(Counter(obj.color for obj in objects), list(COLORS))
    assert_roughly_uniform(Counter(obj.shape for obj in objects), list(SHAPES))
    assert_roughly_uniform(Counter(obj.size for obj in objects), list(SIZE_FRACTIONS))
    assert_roughly_uniform(Counter(str(len(scene.objects)) for _, scene in records_and_scenes), ["1", "2", "3", "4"])

    answers: dict[str, Counter] = {question_type: Counter() for question_type in QUESTION_TYPES}
    for record, _ in records_and_scenes:
        for question_type, (answer,) in zip(record["question_types"], record["answers"]):
            answers[question_type][answer] += 1
    type_totals = Counter({question_type: sum(counts.values()) for question_type, counts in answers.items()})
    assert_roughly_uniform(type_totals, list(QUESTION_TYPES), tolerance=0.6)
    assert_roughly_uniform(answers["exists"], ["yes", "no"], tolerance=0.2)
    assert_roughly_uniform(answers["spatial"], ["yes", "no"], tolerance=0.2)
    assert_roughly_uniform(answers["color"], list(COLORS))
    assert_roughly_uniform(answers["shape"], list(SHAPES))
    counts = answers["count"]
    assert set(counts) == {"0", "1", "2", "3", "4"}
    assert max(counts.values()) <= 0.5 * sum(counts.values()), dict(counts)


def test_splits_are_disjoint_and_independent_of_each_other() -> None:
    splits = {name: list(records) for name, records in
              generate_splits(SEED, {"train": 20, "val": 8, "test": 8}, image_size=IMAGE_SIZE).items()}
    ids = [record["image_id"] for records in splits.values() for record in records]
    assert len(set(ids)) == len(ids)
    assert all(record["image_id"].startswith(f"{name}-") for name, records in splits.items() for record in records)
    images = {name: {record["image"] for record in records} for name, records in splits.items()}
    assert not images["test"] & (images["train"] | images["val"])
    assert not images["train"] & images["val"]
    # A split depends only on the seed and its own name, not on which other splits are generated.
    test_alone = list(generate_splits(SEED, {"test": 8}, image_size=IMAGE_SIZE)["test"])
    assert test_alone == splits["test"]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"seed": -1}, "seed"),
        ({"num_images": 0}, "num_images"),
        ({"image_size": 8}, "image_size"),
        ({"max_objects": MAX_OBJECTS + 1}, "max_objects"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"id_prefix": ""}, "id_prefix"),
    ],
)
def test_bad_arguments_fail_immediately_with_the_parameter_name(arguments: dict, message: str) -> None:
    call = {"seed": 0, "num_images": 2} | arguments
    with pytest.raises(ValueError, match=message):
        generate_records(**call)  # no iteration: the error must not wait for the first record


def test_empty_split_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="sizes"):
        generate_splits(0, {})
