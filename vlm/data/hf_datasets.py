"""Hugging Face `datasets` data as Entries: a folder written by `Dataset.save_to_disk`, or a Parquet file (as
`Dataset.to_parquet` writes it, or a hub dataset's Parquet shards), read offline with the `datasets` library.

The params name the columns (`data.hf`, vlm/config.py): the image (an `Image` feature, or encoded bytes), and the
text: captions (a string or a list of strings), questions with their answers (a string, or a list parallel to
a list of questions; an answer a string or a list of human answers), question types, and conversations (LLaVA
style: a list of {"from": "human" | "gpt", "value"} messages, or of {"role", "content"} messages, or of
{"user", "assistant"} exchanges; vlm.data.llava). A mapped column the dataset lacks is an error that names the
param and the columns it has, raised before any image is read.

Rows become images in order; with `id_column`, rows that share an id join one image (a VQA dataset with one
question a row), else a row's id is its file's name and its index. Rows without an image are skipped and counted
in the log. Images stay encoded bytes (never decoded here) and are read one at a time, when the split is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from vlm.config import HFDatasetConfig
from vlm.data.dataset_io import DatasetError
from vlm.data.entry import Entry, Question
from vlm.data.image_files import BadImage
from vlm.data.llava import exchanges

DEFAULT_QUESTION_TYPE = "other"
_BATCH_ROWS = 1024


def read_hf(paths: Sequence[Path], split: str, config: HFDatasetConfig) -> list[Entry]:
    """The Entries of a split's datasets, in row order. Raises DatasetError naming the dataset, the param and the
    row that do not fit."""
    entries: dict[str, Entry] = {}
    no_image = 0
    for path in map(Path, paths):
        dataset = _load(path)
        _check_columns(dataset, path, config)
        read = _image_reader(dataset, path, config.image_column)
        text_columns = [column for column in (config.id_column, config.caption_column, config.question_column,
                                              config.answer_column, config.question_type_column,
                                              config.conversations_column) if column]
        index = 0
        for batch in dataset.select_columns([config.image_column, *text_columns]).with_format("arrow").iter(
                _BATCH_ROWS):
            has_image = _has_image(batch.column(config.image_column))
            for row, present in zip(batch.select(text_columns).to_pylist(), has_image):
                if not present:
                    no_image += 1
                else:
                    entry = _entry(row, index, path, split, config, read)
                    if entry.image_id in entries:
                        _join(entries[entry.image_id], entry)
                    else:
                        entries[entry.image_id] = entry
                index += 1
    if no_image:
        print(f"data {split}: skipped {no_image} rows without an image of {', '.join(map(str, paths))}")
    return list(entries.values())


def _load(path: Path):
    import datasets  # ~6 s to import: only an import from `datasets` pays for it

    if path.is_dir():
        try:
            dataset = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise DatasetError(f"{path}: not a folder written by Dataset.save_to_disk ({exc})") from exc
        if isinstance(dataset, datasets.DatasetDict):
            raise DatasetError(f"{path}: holds a DatasetDict (splits {', '.join(dataset)}); list the folder of one "
                               f"of its splits, e.g. {path / next(iter(dataset))}")
        return dataset
    if path.suffix == ".parquet" and path.is_file():
        try:
            return datasets.Dataset.from_parquet(str(path))
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise DatasetError(f"{path}: not a readable Parquet file ({exc})") from exc
    raise DatasetError(f"{path}: neither a folder written by Dataset.save_to_disk nor a .parquet file"
                       + ("" if path.exists() else " (it does not exist)"))


# The params that name columns, and whether each must be set.
_COLUMN_PARAMS = ("image_column", "id_column", "caption_column", "question_column", "answer_column",
                  "question_type_column", "conversations_column")


def _check_columns(dataset, path: Path, config: HFDatasetConfig) -> None:
    missing = [f"data.hf.{name}={getattr(config, name)!r}" for name in _COLUMN_PARAMS
               if getattr(config, name) and getattr(config, name) not in dataset.column_names]
    if missing:
        raise DatasetError(f"{path}: no such column for param {', '.join(missing)}; the dataset's columns: "
                           f"{', '.join(dataset.column_names)} (set the param to one of them, or null for a text "
                           "column the dataset does not have)")


def _image_reader(dataset, path: Path, column: str) -> Callable[[int], bytes]:
    """row index -> the encoded bytes of its image (read when called; BadImage if there are none)."""
    import datasets

    feature = dataset.features[column]
    if isinstance(feature, datasets.Image):
        images = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    elif isinstance(feature, datasets.Value) and feature.dtype in ("binary", "large_binary"):
        images = dataset.select_columns([column])
    else:
        raise DatasetError(f"{path}: column {column!r} (param data.hf.image_column) is {feature}, not an Image "
                           "feature or encoded image bytes")

    def read(index: int) -> bytes:
        value = images[index][column]
        if isinstance(value, dict):  # an Image feature: {"bytes", "path"}, the bytes or else the file's path
            if value.get("bytes"):
                return value["bytes"]
            if value.get("path"):
                try:
                    return Path(value["path"]).read_bytes()
                except OSError as exc:
                    raise BadImage(f"cannot read the image's file {value['path']} ({exc.strerror or exc})") from exc
            raise BadImage("has neither bytes nor a file path")
        return value

    return read


def _has_image(values: pa.ChunkedArray) -> list[bool]:
    present = pc.is_valid(values)
    if pa.types.is_struct(values.type):  # an Image feature: a null struct, or neither bytes nor path
        fields = [name for name in ("bytes", "path") if values.type.get_field_index(name) >= 0]
        if fields:
            any_field = pc.or_(*(pc.is_valid(pc.struct_field(values, name)) for name in fields)) \
                if len(fields) == 2 else pc.is_valid(pc.struct_field(values, fields[0]))
            present = pc.and_(present, any_field)
    return present.to_pylist()


def _entry(row: dict[str, Any], index: int, path: Path, split: str, config: HFDatasetConfig,
           read: Callable[[int], bytes]) -> Entry:
    where = f"{path}: row {index}"
    if config.id_column:
        value = row[config.id_column]
        if isinstance(value, bool) or not isinstance(value, str | int) or not str(value).strip():
            raise DatasetError(f"{where}: column {config.id_column!r} (param data.hf.id_column) must be a non-empty "
                               f"string or an integer, got {value!r}")
        image_id = str(value).strip()
    else:
        image_id = f"{path.name}:{index}"
    where = f"{where} (id {image_id!r})"
    captions = _strings(row[config.caption_column], where, config.caption_column) if config.caption_column else []
    questions = _questions(row, where, config) if config.question_column else []
    conversations = []
    if config.conversations_column and row[config.conversations_column] is not None:
        value = row[config.conversations_column]
        # one conversation (a list of messages), or several (a list of such lists)
        several = isinstance(value, list) and bool(value) and all(isinstance(item, list) for item in value)
        conversations = [exchanges(conversation, f"{where}: column {config.conversations_column!r}"
                                   + (f"[{number}]" if several else ""))
                         for number, conversation in enumerate(value if several else [value])]
    return Entry(image_id, where, None, (), captions=captions, questions=questions, conversations=conversations,
                 read_image=lambda: read(index))


def _strings(value: Any, where: str, column: str) -> list[str]:
    """A text cell (a string, a list of strings, or null) as its non-empty stripped strings."""
    values = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(item, str) for item in values):
        raise DatasetError(f"{where}: column {column!r} must hold a string or a list of strings, got {value!r}")
    return [item.strip() for item in values if item.strip()]


def _questions(row: dict[str, Any], where: str, config: HFDatasetConfig) -> list[Question]:
    asked, answered = row[config.question_column], row[config.answer_column]
    kinds = row[config.question_type_column] if config.question_type_column else None
    if asked is None:
        return []
    if isinstance(asked, str):  # one question a row: its answer(s) and type are the cells themselves
        asked, answered, kinds = [asked], [answered], [kinds]
    if not isinstance(asked, list) or not isinstance(answered, list) or len(answered) != len(asked):
        raise DatasetError(f"{where}: column {config.answer_column!r} must hold the answers to column "
                           f"{config.question_column!r}'s questions, one per question; got {asked!r} and {answered!r}")
    if kinds is None:
        kinds = [None] * len(asked)
    elif not isinstance(kinds, list) or len(kinds) != len(asked):
        raise DatasetError(f"{where}: column {config.question_type_column!r} must hold one type per question, got "
                           f"{kinds!r}")
    questions = []
    for number, (question, answers, kind) in enumerate(zip(asked, answered, kinds)):
        texts = _strings([question] if isinstance(question, str) else question, f"{where}: question {number}",
                         config.question_column)
        answers = _strings(answers, f"{where}: question {number}", config.answer_column)
        if len(texts) != 1 or not answers:
            raise DatasetError(f"{where}: question {number} needs one non-empty question (column "
                               f"{config.question_column!r}) and at least one answer (column "
                               f"{config.answer_column!r}), got {question!r} and {answered[number]!r}")
        kind = _strings(kind, f"{where}: question {number}", config.question_type_column or "")
        questions.append(Question(texts[0], tuple(answers), kind[0] if kind else DEFAULT_QUESTION_TYPE))
    return questions


def _join(entry: Entry, other: Entry) -> None:
    """Rows that share an id are one image: their text joins the first row's (whose image is kept)."""
    entry.captions += other.captions
    entry.questions += other.questions
    entry.conversations += other.conversations
