"""LLaVA conversation files (data.source: llava): tiny files in LLaVA's format, through to dataset rows.

Each test writes its data under tmp_path/data/raw and runs from tmp_path, as the `data` stage runs from the
repository root.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_importers import RAW, imported, save_image, split_files, write_json

from vlm.config import DataConfig, LlavaConfig
from vlm.data.dataset_io import DatasetError

IMAGES = RAW / "llava" / "images"


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def llava_config(train: str, val: str | None = None, test: str | None = None) -> DataConfig:
    """Source llava with these files; val and test default to a file of one other image (splits share none)."""
    if val is None or test is None:
        save_image(IMAGES / "held-out.png", (9, 9, 9))
        other = write_json(RAW / "llava" / "held-out.json", [record("h", "held-out.png", "<image>\nq?", "a.")])
    files = split_files([train], [val or other], [test or other])
    return DataConfig(source="llava", llava=LlavaConfig(files.train, files.val, files.test, images=str(IMAGES)))


def turn(speaker: str, value: str) -> dict:
    return {"from": speaker, "value": value}


def record(record_id: str, image: str | None, *values: str) -> dict:
    """A LLaVA record whose messages alternate human, gpt, ... (the values in order)."""
    messages = [turn("human" if index % 2 == 0 else "gpt", value) for index, value in enumerate(values)]
    return {"id": record_id, **({"image": image} if image else {}), "conversations": messages}


def test_llava_records_become_rows_of_conversations(capsys) -> None:
    bus = save_image(IMAGES / "coco" / "bus.jpg", (200, 30, 30))
    save_image(IMAGES / "coco" / "cat.png", (30, 30, 200))
    train = write_json(RAW / "llava" / "train.json", [
        record("1", "coco/bus.jpg", "<image>\nWhat color is the bus?", "Red.", "Is it moving?", "No, it is parked."),
        record("2", None, "Write a poem.", "Roses are red."),  # text-only (ShareGPT): skipped, counted
        record("3", "coco/bus.jpg", "How many wheels?\n<image>", "Four."),  # the same image: a second conversation
        {**record("4", "coco/cat.png", "<image>Describe it.", "A blue cat."), "model": "", "extra": 1},
    ])

    rows, _ = imported(llava_config(train))

    assert "skipped 1 text-only LLaVA records" in capsys.readouterr().out
    bus_row, cat_row = rows["train"]
    assert (bus_row["image_id"], bus_row["image"]) == ("coco/bus.jpg", bus)
    assert bus_row["conversations"] == [
        [{"user": "What color is the bus?", "assistant": "Red."},
         {"user": "Is it moving?", "assistant": "No, it is parked."}],
        [{"user": "How many wheels?", "assistant": "Four."}]]
    assert (bus_row["captions"], bus_row["questions"]) == ([], [])
    assert cat_row["conversations"] == [[{"user": "Describe it.", "assistant": "A blue cat."}]]


def test_jsonl_files_and_chat_style_messages_are_read_too() -> None:
    save_image(IMAGES / "a.png", (1, 2, 3))
    path = RAW / "llava" / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"id": 7, "image": "a.png", "conversations": [{"role": "user", "content": "<image>\nhi"},
                                                       {"role": "assistant", "content": "hello"}]}]) + "\n\n")
    rows, _ = imported(llava_config(str(path)))
    assert rows["train"][0]["conversations"] == [[{"user": "hi", "assistant": "hello"}]]


@pytest.mark.parametrize(("bad", "expected"), [
    (record("x", "a.png", "<image>\nq?"), r"train\.json: \[1\] \(id 'x'\): conversations: 1 turns, an odd number"),
    ({"id": "x", "image": "a.png", "conversations": [turn("gpt", "hi"), turn("human", "<image>\nq")]},
     r"\[1\] \(id 'x'\): conversations\[0\]: a gpt turn where a human turn belongs"),
    (record("x", "a.png", "<image>\nq?", "a", "again <image>", "b"), r"conversations\[2\]: <image> may appear only"),
    ({"id": "x", "image": "a.png", "conversations": [turn("human", "q"), turn("bot", "a")]},
     r"conversations\[1\]: unknown speaker 'bot'"),
    ({"id": "x", "image": "a.png", "conversations": [turn("human", "<image>\n"), turn("gpt", "a")]},
     r"conversations\[0\]: the text is empty"),
    ({"id": "x", "image": "a.png"}, r"\[1\] \(id 'x'\): has no 'conversations' field"),
    ({"id": "x", "image": ["a.png", "b.png"], "conversations": []}, r"\[1\] \(id 'x'\): image \(one path per record\)"),
    (record("x", "/abs/a.png", "q", "a"), r"\[1\] \(id 'x'\): image '/abs/a.png' must be a path relative"),
    ("just text", r"train\.json: \[1\]: expected a JSON object"),
])
def test_bad_records_name_the_file_and_record(bad: object, expected: str) -> None:
    save_image(IMAGES / "a.png", (1, 2, 3))
    path = write_json(RAW / "llava" / "train.json", [record("ok", "a.png", "<image>\nq?", "a."), bad])
    with pytest.raises(DatasetError, match=expected):
        imported(llava_config(path))


def test_bad_jsonl_line_and_missing_image_name_the_line_and_record() -> None:
    path = RAW / "llava" / "train.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(record("gone", "gone.png", "<image>q", "a")) + "\n{not json\n")
    with pytest.raises(DatasetError, match=r"train\.jsonl:2: not valid JSON"):
        imported(llava_config(str(path)))
    path.write_text(json.dumps(record("gone", "gone.png", "<image>q", "a")) + "\n")
    with pytest.raises(DatasetError, match=r"train\.jsonl:1 \(id 'gone'\): image file not found"):
        imported(llava_config(str(path)))


def test_a_split_of_only_text_records_is_an_error_naming_the_param() -> None:
    save_image(IMAGES / "a.png", (1, 2, 3))
    train = write_json(RAW / "llava" / "train.json", [record("1", "a.png", "<image>q", "a")])
    text_only = write_json(RAW / "llava" / "chat.json", [record("2", None, "q", "a")])
    with pytest.raises(DatasetError, match=r"no val images: the files of param data\.llava\.val hold none"):
        imported(llava_config(train, text_only))
