"""One imported image before its bytes are read: its text and objects, where its file is, where the record came from.

Importers (coco, vqav2, jsonl_manifest, llava, hf_datasets) turn annotation files into Entries, which hold only
text and boxes, so a whole split's annotations fit in memory while its images do not have to: a RecordStream reads
one image at a time and yields dataset rows (vlm.data.dataset_io) for `write_split` to stream into Parquet.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from vlm.data.dataset_io import DatasetError
from vlm.data.image_files import BadImage, ImageFolder, fit_image, read_image


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]  # every human answer, repeats included: VQA accuracy counts agreeing humans
    type: str


@dataclass(frozen=True)
class Region:
    """An object's box: centre (x, y) and size (w, h), fractions of the image's width and height (y = 0 at the top;
    a point has w = h = 0), and a short phrase naming it: one of the dataset's `regions` (vlm.data.dataset_io)."""

    x: float
    y: float
    w: float
    h: float
    phrase: str


# How far a box may reach past the image's edge, as a fraction of its side, and be clamped to it: annotation tools
# round (COCO boxes overshoot by a fraction of a pixel); a box further out is a wrong box, or pixels, not fractions.
OVERSHOOT = 0.01


def box_region(x0: float, y0: float, x1: float, y1: float, phrase: str, where: str, hint: str) -> Region:
    """The Region of the box from (x0, y0) (top left) to (x1, y1), fractions of the image; a corner at most OVERSHOOT
    outside the image is clamped to its edge. DatasetError naming `where` if a corner lies further out (with `hint`,
    what to do about it) or the box ends before it starts."""
    if not all(-OVERSHOOT <= value <= 1 + OVERSHOOT for value in (x0, y0, x1, y1)):  # NaN fails too
        raise DatasetError(f"{where}: reaches outside the image (0..1 on both axes, as fractions of its width and "
                           f"height): from ({x0:.4g}, {y0:.4g}) to ({x1:.4g}, {y1:.4g}); {hint}")
    if x1 < x0 or y1 < y0:
        raise DatasetError(f"{where}: the box ends before it starts ({'x1 < x0' if x1 < x0 else 'y1 < y0'}); "
                           "give its top-left corner first, then its bottom-right one")
    x0, y0, x1, y1 = (min(max(value, 0.0), 1.0) for value in (x0, y0, x1, y1))
    return Region((x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0, phrase)


Exchange = tuple[str, str]  # one turn of a conversation: (what the user says, what the assistant replies)


@dataclass
class Entry:
    image_id: str
    origin: str  # the file and record it came from, e.g. "dataset_coco.json: images[12] (cocoid 391895)"
    folder: ImageFolder | None  # None: the image comes from `read_image` instead of a file
    image_names: tuple[str, ...]  # where the file may be, relative to `folder`, most likely first
    coco_id: int | None = None  # else looked up by the number ending its file name (COCO naming)
    captions: list[str] = field(default_factory=list)
    questions: list[Question] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    conversations: list[tuple[Exchange, ...]] = field(default_factory=list)  # each: its exchanges in order
    # The image's encoded bytes where they live in no file of an image folder (a row of a `datasets` dataset);
    # may raise BadImage.
    read_image: Callable[[], bytes] | None = None

    @property
    def has_text(self) -> bool:
        """Whether the image comes with anything to learn from (an image without text teaches nothing)."""
        return bool(self.captions or self.questions or self.conversations)


class RecordStream:
    """Dataset rows made from `entries`, one image file read at a time, with a progress bar.

    A missing or unreadable image raises DatasetError naming its record, or with `skip_bad_images` is left out
    and counted in `skipped`.
    """

    def __init__(self, entries: Sequence[Entry], resize: int = 0, skip_bad_images: bool = False,
                 description: str = "import") -> None:
        self.entries = entries
        self.resize = resize
        self.skip_bad_images = skip_bad_images
        self.description = description
        self.skipped = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for entry in tqdm(self.entries, desc=self.description, unit="image"):
            try:
                if entry.read_image is not None:
                    image = fit_image(entry.read_image(), self.resize, "the image")
                else:
                    image = read_image(entry.folder.find(entry.image_names, entry.coco_id), self.resize)
            except BadImage as exc:
                if not self.skip_bad_images:
                    raise DatasetError(f"{entry.origin}: {exc} (set data.skip_bad_images: true to leave out and "
                                       "count such images)") from exc
                self.skipped += 1
                continue
            yield {
                "image_id": entry.image_id,
                "image": image,
                "captions": list(entry.captions),
                "questions": [q.question for q in entry.questions],
                "answers": [list(q.answers) for q in entry.questions],
                "question_types": [q.type for q in entry.questions],
                "regions": [asdict(region) for region in entry.regions],
                "conversations": [[{"user": user, "assistant": reply} for user, reply in conversation]
                                  for conversation in entry.conversations],
            }


def read_json(path: Path) -> Any:
    """A whole JSON annotation file; a missing or malformed one raises DatasetError naming it."""
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc})") from exc


def jsonl_records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed record) for every non-blank line of a JSONL file; a missing file or a line that is not
    JSON raises DatasetError naming the file (and line)."""
    try:
        file = open(path, encoding="utf-8")
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    with file:
        for number, line in enumerate(file, start=1):
            if line.strip():
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DatasetError(f"{path}:{number}: not valid JSON ({exc})") from exc


def text(value: Any, where: str, name: str, empty_ok: bool = True) -> str:
    """`value` stripped of surrounding white space; DatasetError naming `where` and `name` if it is no string
    (or, unless `empty_ok`, nothing but white space)."""
    if not isinstance(value, str):
        raise DatasetError(f"{where}: {name} must be a string, got {value!r}")
    if not value.strip() and not empty_ok:
        raise DatasetError(f"{where}: {name} is empty")
    return value.strip()


def integer(value: Any, where: str, name: str) -> int:
    """`value` if it is a non-negative integer (an id), else DatasetError naming `where` and `name`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DatasetError(f"{where}: {name} must be a non-negative integer, got {value!r}")
    return value


def number(value: Any, where: str, name: str) -> float:
    """`value` as a float if it is a finite JSON number, else DatasetError naming `where` and `name`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise DatasetError(f"{where}: {name} must be a number, got {value!r}")
    return float(value)


def require(record: Any, key: str, where: str) -> Any:
    """record[key], or a DatasetError naming the record and the missing field."""
    if not isinstance(record, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if key not in record:
        raise DatasetError(f"{where}: has no {key!r} field")
    return record[key]
