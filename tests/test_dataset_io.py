"""The dataset Parquet format: round trips, streaming, atomic writes and clear errors."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlm.data.dataset_io import (
    COLUMNS,
    DATASET_SCHEMA,
    DatasetError,
    count_split,
    decode_image,
    captions_or_replies,
    iter_split,
    read_metadata,
    read_split,
    write_split,
)


def encoded_image(size: tuple[int, int], color: tuple[int, int, int], fmt: str = "PNG", mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(buffer, format=fmt)
    return buffer.getvalue()


def make_record(index: int, **overrides: object) -> dict:
    """A record in the shape VQAv2/COCO importers produce: several answers per question, maybe no captions."""
    record = {
        "image_id": f"img-{index}",
        "image": encoded_image((20 + index, 10 + index), (index * 20 % 256, 100, 200), "PNG" if index % 2 else "JPEG"),
        "captions": [f"caption {index} a", f"caption {index} b"] if index % 3 else [],
        "questions": [f"question {index}?", "what is it?"],
        "answers": [["yes"] * 10, ["a cat", "cat", f"answer {index}"]],
        "question_types": ["yes/no", "what"],
        "regions": [{"x": 0.25, "y": 0.5, "w": 0.5, "h": 0.2, "phrase": f"object {index}"}] if index % 2 else [],
        # LLaVA-style: several conversations about one image, each with its exchanges in order
        "conversations": [[{"user": f"what is in image {index}?", "assistant": "a cat."},
                           {"user": "what color is it?", "assistant": "grey, with white paws."}],
                          [{"user": "describe it.", "assistant": f"picture {index}."}]] if index % 2 else [],
    }
    record.update(overrides)
    return record


def test_round_trip_keeps_every_value_and_streams_in_row_groups(tmp_path: Path) -> None:
    records = [make_record(i) for i in range(7)]
    path = tmp_path / "nested" / "train.parquet"

    written = write_split(iter(records), path, row_group_size=2, metadata={"source": "unit-test", "seed": "3"})

    assert written == 7
    assert read_split(path).to_pylist() == records
    assert list(iter_split(path, batch_size=3)) == records
    assert read_split(path, columns=["image_id", "answers"]).column_names == ["image_id", "answers"]
    assert read_metadata(path) == {"source": "unit-test", "seed": "3"}
    file_metadata = pq.ParquetFile(path).metadata
    assert file_metadata.num_row_groups == 4  # 2 + 2 + 2 + 1 rows: written incrementally, not in one block
    assert file_metadata.row_group(0).column(0).compression == "ZSTD"


def test_decoded_images_have_the_stored_size_and_are_rgb(tmp_path: Path) -> None:
    grey = make_record(0, image_id="grey", image=encoded_image((9, 5), (77, 0, 0), mode="L"))
    path = tmp_path / "split.parquet"
    write_split([make_record(3), grey], path)

    rows = list(iter_split(path, columns=["image_id", "image"]))
    first, second = (decode_image(row["image"], row["image_id"]) for row in rows)

    assert (first.size, first.mode) == ((23, 13), "RGB")
    assert (second.size, second.mode) == ((9, 5), "RGB")
    assert second.getpixel((0, 0)) == (77, 77, 77)


def test_failing_records_iterator_leaves_no_file_and_keeps_the_old_one(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"

    def records_that_fail_half_way():
        for index in range(5):
            yield make_record(index)
        raise RuntimeError("source went away")

    with pytest.raises(RuntimeError, match="source went away"):
        write_split(records_that_fail_half_way(), path, row_group_size=2)
    assert list(tmp_path.iterdir()) == []

    write_split([make_record(0)], path)
    with pytest.raises(RuntimeError):
        write_split(records_that_fail_half_way(), path, row_group_size=2)
    assert [row["image_id"] for row in iter_split(path)] == ["img-0"]
    assert list(tmp_path.iterdir()) == [path]


def test_empty_split_is_refused_and_not_written(tmp_path: Path) -> None:
    path = tmp_path / "val.parquet"
    with pytest.raises(DatasetError, match="no records"):
        write_split([], path)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"answers": [["yes"]]}, "answers"),  # one answer list for two questions
        ({"question_types": ["what"]}, "question_types"),
        ({"answers": [["yes"], []]}, "answers[1]"),
        ({"captions": "a single string"}, "captions"),
        ({"questions": ["ok?", 3]}, "questions"),
        ({"image": b"GIF89a not supported"}, "image"),
        ({"image": b""}, "image"),
        ({"extra_column": 1}, "extra_column"),
        ({"conversations": [[]]}, "conversations[0]"),
        ({"conversations": [{"user": "hi", "assistant": "hello"}]}, "conversations[0]"),  # not nested in a list
        ({"conversations": [[{"user": "hi", "assistant": "hello"}, {"user": "and?", "assistant": " "}]]},
         "conversations[0][1]"),
        ({"conversations": [[{"user": "hi", "assistant": "hello", "from": "gpt"}]]}, "conversations[0][0]"),
    ],
)
def test_bad_record_error_names_image_and_field(tmp_path: Path, overrides: dict, field: str) -> None:
    path = tmp_path / "train.parquet"
    with pytest.raises(DatasetError) as error:
        write_split([make_record(0), make_record(1, **overrides)], path)
    assert "'img-1'" in str(error.value)
    assert repr(field) in str(error.value)
    assert not path.exists()


def test_optional_columns_may_be_left_out_and_are_written_empty(tmp_path: Path) -> None:
    record = make_record(0)
    del record["regions"], record["conversations"]
    write_split([record], tmp_path / "a.parquet")
    row = read_split(tmp_path / "a.parquet").to_pylist()[0]
    assert (row["regions"], row["conversations"]) == ([], [])


def test_counts_include_conversations_and_their_turns(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    write_split([make_record(i) for i in range(4)], path)  # images 1 and 3: 2 conversations of 2 + 1 turns each
    assert count_split(path) == {"images": 4, "captions": 4, "questions": 8, "regions": 2, "conversations": 4,
                                 "turns": 6}


def test_image_texts_are_captions_or_else_the_first_replies_of_conversations(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    write_split([make_record(i) for i in range(4)], path)
    image_ids, texts = captions_or_replies(path)
    assert image_ids == ["img-0", "img-1", "img-2", "img-3"]
    assert texts == [[], ["caption 1 a", "caption 1 b"], ["caption 2 a", "caption 2 b"], ["a cat.", "picture 3."]]


def test_missing_field_and_duplicate_id_are_reported(tmp_path: Path) -> None:
    record = make_record(2)
    del record["question_types"]
    with pytest.raises(DatasetError, match=r"'img-2'.*'question_types' is missing"):
        write_split([record], tmp_path / "a.parquet")
    with pytest.raises(DatasetError, match=r"'img-1'.*duplicate"):
        write_split([make_record(1), make_record(1)], tmp_path / "b.parquet")


def test_non_string_metadata_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="metadata"):
        write_split([make_record(0)], tmp_path / "a.parquet", metadata={"seed": 3})  # type: ignore[dict-item]


def test_reading_a_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.parquet"
    with pytest.raises(DatasetError, match="nowhere.parquet does not exist"):
        read_split(path)
    with pytest.raises(DatasetError, match="does not exist"):
        next(iter_split(path))


def test_wrong_schema_names_file_and_missing_columns(tmp_path: Path) -> None:
    path = tmp_path / "other.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "captions": [1]}), path)
    with pytest.raises(DatasetError) as error:
        read_split(path)
    message = str(error.value)
    assert "other.parquet" in message
    for column in ("image", "questions", "answers", "question_types"):
        assert repr(column) in message
    assert "captions is int64" in message


def test_empty_file_and_unknown_columns_are_reported(tmp_path: Path) -> None:
    empty = tmp_path / "empty.parquet"
    pq.write_table(DATASET_SCHEMA.empty_table(), empty)
    with pytest.raises(DatasetError, match="empty.parquet has no rows"):
        read_split(empty)

    good = tmp_path / "good.parquet"
    write_split([make_record(0)], good)
    with pytest.raises(DatasetError, match="unknown columns requested \\['pixels'\\]"):
        read_split(good, columns=["image_id", "pixels"])
    assert set(COLUMNS) == set(read_split(good).column_names)


def test_corrupt_image_error_names_the_image() -> None:
    truncated = encoded_image((64, 64), (1, 2, 3))[:60]
    with pytest.raises(DatasetError, match="'train-000007'"):
        decode_image(truncated, "train-000007")
    with pytest.raises(DatasetError, match="'x'"):
        decode_image(b"not an image at all", "x")
