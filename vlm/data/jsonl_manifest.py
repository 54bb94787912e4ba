"""A generic dataset as a JSONL manifest: one image per line, its path relative to the manifest's folder.

    {"image": "images/0001.jpg", "captions": ["a cat on a red sofa."],
     "questions": [{"question": "what color is the sofa?", "answers": ["red", "red", "dark red"], "type": "color"}],
     "regions": [{"phrase": "cat", "box": [0.1, 0.2, 0.45, 0.8]}, {"phrase": "lamp", "point": [0.9, 0.1]}]}

`image` is required; `id` (default: the `image` path as written) must be unique; `captions` and `questions` are
optional but a line needs at least one of them; a question's `answers` are all the reference answers (one or
more), its `type` defaults to "other". `regions` (optional) are the image's objects, each a phrase with a `box`
[x0, y0, x1, y1] (top-left and bottom-right corners) or a `point` [x, y], in fractions of the image's width and
height (0..1, y = 0 at the top); `train_vlm.align.target: grid` needs them. Unknown fields are errors, so a typo
("caption") does not silently drop data. Blank lines are skipped.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

from vlm.data.dataset_io import DatasetError
from vlm.data.entry import Entry, Question, Region, box_region, jsonl_records, number, require, text
from vlm.data.image_files import ImageFolder

RECORD_FIELDS = ("image", "id", "captions", "questions", "regions")
QUESTION_FIELDS = ("question", "answers", "type")
REGION_FIELDS = ("phrase", "box", "point")
FRACTIONS = "coordinates are fractions of the image's width and height: divide pixel values by the image size"
DEFAULT_QUESTION_TYPE = "other"


def read_manifest(path: Path) -> list[Entry]:
    """The manifest's Entries in line order. Raises DatasetError naming the file and line of a bad record."""
    path = Path(path)
    folder = ImageFolder(path.parent)
    entries: list[Entry] = []
    lines_of: dict[str, int] = {}
    for line, record in jsonl_records(path):
        where = f"{path}:{line}"
        entry = _entry(record, where, folder)
        if entry.image_id in lines_of:
            raise DatasetError(f"{where}: id {entry.image_id!r} was already used on line "
                               f"{lines_of[entry.image_id]}; give each record a unique 'id'")
        lines_of[entry.image_id] = line
        entries.append(entry)
    return entries


def _entry(record: Any, where: str, folder: ImageFolder) -> Entry:
    image = text(require(record, "image", where), where, "image", empty_ok=False)
    _check_fields(record, RECORD_FIELDS, where)
    if PurePosixPath(image).is_absolute() or Path(image).is_absolute():
        raise DatasetError(f"{where}: image {image!r} must be a path relative to the manifest's folder")
    image_id = text(record.get("id", image), where, "id", empty_ok=False)
    captions = [text(caption, where, f"captions[{i}]", empty_ok=False)
                for i, caption in enumerate(_list(record, "captions", where))]
    questions = [_question(question, f"{where}: questions[{i}]")
                 for i, question in enumerate(_list(record, "questions", where))]
    if not captions and not questions:
        raise DatasetError(f"{where}: has neither captions nor questions")
    regions = [_region(region, f"{where}: regions[{i}]") for i, region in enumerate(_list(record, "regions", where))]
    return Entry(image_id, f"{where} (id {image_id!r})", folder, (image,), None, captions, questions, regions)


def _region(record: Any, where: str) -> Region:
    phrase = text(require(record, "phrase", where), where, "phrase", empty_ok=False)
    _check_fields(record, REGION_FIELDS, where)
    if ("box" in record) == ("point" in record):
        raise DatasetError(f"{where}: give either a 'box' [x0, y0, x1, y1] or a 'point' [x, y] "
                           f"({'not both' if 'box' in record else 'neither is there'})")
    key, layout = ("box", "[x0, y0, x1, y1]") if "box" in record else ("point", "[x, y]")
    values = record[key]
    if not isinstance(values, list) or len(values) != len(layout.split(",")):
        raise DatasetError(f"{where}: {key!r} must be {layout}, got {values!r}")
    values = [number(value, where, f"{key}[{i}]") for i, value in enumerate(values)]
    x0, y0, x1, y1 = values if key == "box" else values * 2
    return box_region(x0, y0, x1, y1, phrase, f"{where}: {key} {record[key]}", FRACTIONS)


def _question(record: Any, where: str) -> Question:
    question = text(require(record, "question", where), where, "question", empty_ok=False)
    _check_fields(record, QUESTION_FIELDS, where)
    answers = [text(answer, where, f"answers[{i}]", empty_ok=False)
               for i, answer in enumerate(_list(record, "answers", where))]
    if not answers:
        raise DatasetError(f"{where}: 'answers' is missing or empty; give every question at least one answer")
    kind = text(record.get("type", DEFAULT_QUESTION_TYPE), where, "type", empty_ok=False)
    return Question(question, tuple(answers), kind)


def _list(record: dict, key: str, where: str) -> list:
    values = record.get(key, [])
    if not isinstance(values, list):
        raise DatasetError(f"{where}: {key!r} must be a list, got {type(values).__name__}")
    return values


def _check_fields(record: dict, allowed: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(record) - set(allowed))
    if unknown:
        raise DatasetError(f"{where}: unknown field {unknown[0]!r}; allowed fields: {', '.join(allowed)}")
