"""The one Parquet format every dataset split is stored in.

Every source (the synthetic scenes, and COCO captions, VQAv2 and JSONL imports) lands in the same
layout so that embedding, training and evaluation code never needs to know where the data came from:
one Parquet file per split, one row per image, with all of the image's captions, question/answer pairs and
multi-turn conversations (LLaVA-style: each a list of user/assistant exchanges about the image; a caption or a
single question is a one-turn conversation too, but stays in its own column, where evaluation scores it).
Images are kept as the original encoded PNG/JPEG bytes (not decoded pixels) because that is ~10x smaller and
lets each consumer resize however its backbone wants.

Writing streams row groups through a ParquetWriter, so a split of any size needs only one row group
in memory, and it is atomic: the file appears under its final name only once it is complete.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

# One exchange of a conversation: what the user says and what the assistant replies.
CONVERSATION_TURN = pa.struct([("user", pa.string()), ("assistant", pa.string())])
TEXT_COLUMNS = ("captions", "questions", "conversations")  # a row with none of these teaches nothing

DATASET_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        # Encoded PNG/JPEG bytes, exactly as produced by the source.
        pa.field("image", pa.binary(), nullable=False),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("questions", pa.list_(pa.string()), nullable=False),
        # One or more human answers per question (VQAv2 has 10, synthetic data has 1).
        pa.field("answers", pa.list_(pa.list_(pa.string())), nullable=False),
        # Parallel to `questions`, e.g. "color", "count", "yes/no".
        pa.field("question_types", pa.list_(pa.string()), nullable=False),
        # Objects where the source knows them, as boxes: the centre (x, y) and the size (w, h), all fractions of
        # the image's width and height (0..1, y = 0 at the top; a point has w = h = 0), and a short phrase
        # ("small red circle", "dog"). The synthetic scenes fill it, as do COCO instances files
        # (`data.coco.instances`) and a JSONL manifest's `regions`. `train_vlm.align.target: grid` reads it.
        pa.field("regions", pa.list_(pa.struct([(key, pa.float64()) for key in ("x", "y", "w", "h")]
                                               + [("phrase", pa.string())])),
                 nullable=False),
        # Multi-turn conversations about the image (LLaVA's, or a datasets column): an image may have several,
        # each a list of exchanges in order; stage 2 trains every reply with the earlier exchanges in context.
        pa.field("conversations", pa.list_(pa.list_(CONVERSATION_TURN)), nullable=False),
    ]
)
REGION_KEYS = ("x", "y", "w", "h", "phrase")
COLUMNS: tuple[str, ...] = tuple(DATASET_SCHEMA.names)
# A record may leave these out; they are written empty.
OPTIONAL_COLUMNS: dict[str, Any] = {"regions": [], "conversations": []}

# File signatures of the accepted encodings; checking them at write time is cheap and turns a
# confusing decode failure deep inside training into an error at import time.
IMAGE_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG"}


class DatasetError(ValueError):
    """A dataset split or record does not follow the format described in this module."""


def write_split(
    records: Iterable[Mapping[str, Any]],
    path: Path,
    row_group_size: int = 256,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Stream `records` (dicts with exactly the COLUMNS keys) into the Parquet file `path`.

    `metadata` is stored as the file's key-value metadata (e.g. the generator seed), readable with
    `read_metadata`. Returns the number of rows written. If anything fails, including the records
    iterator raising half-way, no file is left at `path` (and a previous file there is untouched).
    """
    path = Path(path)
    if row_group_size < 1:
        raise DatasetError(f"write_split({path}): row_group_size must be >= 1, got {row_group_size}")
    schema = DATASET_SCHEMA.with_metadata(_checked_metadata(metadata, path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.with_name(f".{path.name}.tmp-{os.getpid()}")

    seen_ids: set[str] = set()
    buffer: list[Mapping[str, Any]] = []
    writer: pq.ParquetWriter | None = None
    try:
        writer = pq.ParquetWriter(tmp_path, schema, compression="zstd")
        for record in records:
            record = {**OPTIONAL_COLUMNS, **record} if isinstance(record, Mapping) else record
            validate_record(record)
            image_id = record["image_id"]
            if image_id in seen_ids:
                raise DatasetError(f"record {image_id!r}: duplicate image_id in split {path}")
            seen_ids.add(image_id)
            buffer.append(record)
            if len(buffer) == row_group_size:
                writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
                buffer.clear()
        if buffer:
            writer.write_table(pa.Table.from_pylist(buffer, schema=schema))
        if not seen_ids:
            raise DatasetError(
                f"write_split({path}): got no records; an empty split is almost always a bug "
                "upstream (wrong filter or source path), so nothing was written"
            )
        writer.close()
        writer = None
        os.replace(tmp_path, path)
    finally:
        if writer is not None:
            writer.close()
        tmp_path.unlink(missing_ok=True)
    return len(seen_ids)


def validate_record(record: Mapping[str, Any]) -> None:
    """Raise DatasetError naming the image_id and field if `record` does not fit DATASET_SCHEMA."""
    if not isinstance(record, Mapping):
        raise DatasetError(f"a record must be a dict with fields {list(COLUMNS)}, got {type(record).__name__}")
    image_id = record.get("image_id")
    if not isinstance(image_id, str) or not image_id:
        raise DatasetError(f"record {image_id!r}: field 'image_id' must be a non-empty string")

    def fail(field: str, problem: str) -> DatasetError:
        return DatasetError(f"record {image_id!r}: field {field!r} {problem}")

    missing = [name for name in COLUMNS if name not in record and name not in OPTIONAL_COLUMNS]
    if missing:
        raise fail(missing[0], f"is missing (missing fields: {missing}; expected {list(COLUMNS)})")
    unexpected = sorted(set(record) - set(COLUMNS))
    if unexpected:
        raise fail(unexpected[0], f"is not part of the dataset format (expected only {list(COLUMNS)})")

    image = record["image"]
    if not isinstance(image, bytes | bytearray) or not image:
        raise fail("image", "must be non-empty encoded PNG/JPEG bytes")
    if not any(bytes(image[: len(sig)]) == sig for sig in IMAGE_SIGNATURES):
        raise fail("image", "is neither PNG nor JPEG bytes; re-encode the image as PNG or JPEG")

    for field in ("captions", "questions", "question_types"):
        _check_string_list(record[field], fail, field)
    questions, answers, types = record["questions"], record["answers"], record["question_types"]
    if not isinstance(answers, list | tuple):
        raise fail("answers", f"must be a list (one answer list per question), got {type(answers).__name__}")
    for field, values in (("answers", answers), ("question_types", types)):
        if len(values) != len(questions):
            raise fail(field, f"has {len(values)} entries but there are {len(questions)} questions")
    for index, question_answers in enumerate(answers):
        _check_string_list(question_answers, fail, f"answers[{index}]")
        if not question_answers:
            raise fail(f"answers[{index}]", "is empty; every question needs at least one answer")
    regions = record.get("regions", [])
    if not isinstance(regions, list | tuple):
        raise fail("regions", f"must be a list of {{'x', 'y', 'w', 'h', 'phrase'}} dicts, got {type(regions).__name__}")
    for index, region in enumerate(regions):
        if not (isinstance(region, Mapping) and set(region) == set(REGION_KEYS)
                and all(_fraction(region[key]) for key in ("x", "y", "w", "h"))
                and isinstance(region["phrase"], str) and region["phrase"]):
            raise fail(f"regions[{index}]", "must be {'x': 0..1, 'y': 0..1, 'w': 0..1, 'h': 0..1, 'phrase': non-empty "
                       "text} (a box's centre and size as fractions of the image; a point has w = h = 0), got "
                       f"{region!r}")
        if not all(-1e-9 <= region[c] - region[s] / 2 and region[c] + region[s] / 2 <= 1 + 1e-9
                   for c, s in (("x", "w"), ("y", "h"))):
            raise fail(f"regions[{index}]", f"is a box that reaches outside the image, got {region!r}")

    conversations = record.get("conversations", [])
    if not isinstance(conversations, list | tuple):
        raise fail("conversations", f"must be a list of conversations, got {type(conversations).__name__}")
    for index, conversation in enumerate(conversations):
        if not isinstance(conversation, list | tuple) or not conversation:
            raise fail(f"conversations[{index}]", f"must be a non-empty list of {{'user', 'assistant'}} exchanges, "
                                                  f"got {conversation!r}")
        for turn_index, turn in enumerate(conversation):
            if not (isinstance(turn, Mapping) and set(turn) == {"user", "assistant"}
                    and all(isinstance(turn[key], str) and turn[key].strip() for key in ("user", "assistant"))):
                raise fail(f"conversations[{index}][{turn_index}]",
                           f"must be {{'user': non-empty text, 'assistant': non-empty text}}, got {turn!r}")


def _fraction(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 1


def _check_string_list(values: Any, fail: Callable[[str, str], DatasetError], field: str) -> None:
    if not isinstance(values, list | tuple):
        raise fail(field, f"must be a list of strings, got {type(values).__name__}")
    for value in values:
        if not isinstance(value, str) or not value:
            raise fail(field, f"must contain only non-empty strings, found {value!r}")


def read_split(path: Path, columns: list[str] | None = None) -> pa.Table:
    """Read a whole split (or only `columns`) into memory after checking its format."""
    parquet_file = _open_split(path, columns)
    return parquet_file.read(columns=columns)


def iter_split(
    path: Path, columns: list[str] | None = None, batch_size: int = 256
) -> Iterator[dict[str, Any]]:
    """Stream a split as one dict per row, holding only `batch_size` rows in memory at a time."""
    parquet_file = _open_split(path, columns)
    for batch in parquet_file.iter_batches(batch_size=batch_size, columns=columns):
        yield from batch.to_pylist()


def count_split(path: Path) -> dict[str, int]:
    """How many images, captions, questions, regions, conversations and conversation turns (user/assistant
    exchanges) a split holds (reads only the text columns, not the images)."""
    table = read_split(path, columns=[*TEXT_COLUMNS, "regions"])

    def total(values: pa.ChunkedArray) -> int:
        return int(pc.sum(pc.list_value_length(values)).as_py() or 0)

    return {"images": table.num_rows, "captions": total(table["captions"]), "questions": total(table["questions"]),
            "regions": total(table["regions"]), "conversations": total(table["conversations"]),
            "turns": total(pc.list_flatten(table["conversations"]))}


def captions_or_replies(path: Path) -> tuple[list[str], list[list[str]]]:
    """(image ids, texts that describe each image) of a split: its captions, or for an image without any, the
    first reply of each of its conversations (the reply to the turn that shows the image: in LLaVA's caption data,
    LCS-558K, that reply is the caption). What stage 1 pairs with an image and the caption alignment spells."""
    table = read_split(path, columns=["image_id", "captions", "conversations"])
    texts = [captions or [conversation[0]["assistant"] for conversation in conversations]
             for captions, conversations in zip(table["captions"].to_pylist(), table["conversations"].to_pylist())]
    return table["image_id"].to_pylist(), texts


def read_metadata(path: Path) -> dict[str, str]:
    """The key-value metadata that `write_split` stored in the file."""
    raw = _open_split(path, None).schema_arrow.metadata or {}
    # pyarrow keeps its own bookkeeping under "ARROW:" keys; those are not ours.
    return {
        key.decode(): value.decode() for key, value in raw.items() if not key.startswith(b"ARROW:")
    }


def decode_image(data: bytes, image_id: str = "<unknown>") -> Image.Image:
    """Decode stored image bytes to an RGB PIL image; corrupt data raises DatasetError naming `image_id`."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # Image.open is lazy; force the full decode so truncation is caught here.
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DatasetError(
            f"image {image_id!r}: cannot decode its {len(data)} stored bytes ({exc}); the split is "
            "corrupt, re-create it"
        ) from exc
    return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image


def _open_split(path: Path, columns: list[str] | None) -> pq.ParquetFile:
    """Open `path` and check that it is a non-empty split in DATASET_SCHEMA."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset split {path} does not exist; run the stage that creates it (e.g. `dvc repro`)")
    try:
        parquet_file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"dataset split {path} is not a readable Parquet file ({exc})") from exc

    schema = parquet_file.schema_arrow
    missing = [name for name in COLUMNS if name not in schema.names]
    mistyped = [
        f"{field.name} is {schema.field(field.name).type}, expected {field.type}"
        for field in DATASET_SCHEMA
        if field.name in schema.names and not schema.field(field.name).type.equals(field.type)
    ]
    if missing or mistyped:
        raise DatasetError(
            f"dataset split {path} does not have the dataset schema: missing columns {missing}, "
            f"wrong types {mistyped}; it was written by an older version or another tool: re-create it with the "
            "`data` stage (`dvc repro data`), which writes it with vlm.data.dataset_io.write_split"
        )
    unknown = [name for name in columns or [] if name not in schema.names]
    if unknown:
        raise DatasetError(f"dataset split {path}: unknown columns requested {unknown}; available: {schema.names}")
    if parquet_file.metadata.num_rows == 0:
        raise DatasetError(f"dataset split {path} has no rows; re-create it")
    return parquet_file


def _checked_metadata(metadata: Mapping[str, str] | None, path: Path) -> dict[str, str]:
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise DatasetError(
                f"write_split({path}): metadata must map str to str, got {key!r}: {value!r}; "
                "serialise values first (e.g. json.dumps)"
            )
    return dict(metadata or {})


def image_regions(dataset_path: Path) -> dict[str, list[dict]]:
    """image id -> its regions ({x, y, w, h, phrase}: boxes, vlm.data.dataset_io); images without any are left out."""
    rows = read_split(dataset_path, columns=["image_id", "regions"]).to_pylist()
    return {row["image_id"]: row["regions"] for row in rows if row["regions"]}
