"""Hugging Face `datasets` data (data.source: hf): tiny datasets with an Image feature, saved with save_to_disk or
as Parquet, through to dataset rows.

Each test writes its data under tmp_path/data/raw and runs from tmp_path, as the `data` stage runs from the
repository root.
"""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
from PIL import Image
from test_importers import RAW, imported

from vlm.config import DataConfig, HFDatasetConfig
from vlm.data.dataset_io import DatasetError

MESSAGE = {"from": datasets.Value("string"), "value": datasets.Value("string")}
FEATURES = datasets.Features({
    "image": datasets.Image(), "image_id": datasets.Value("string"),
    "caption": datasets.Value("string"), "question": datasets.Value("string"),
    "answers": datasets.List(datasets.Value("string")), "kind": datasets.Value("string"),
    "messages": datasets.List(MESSAGE),
})


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def encoded(color: tuple[int, int, int], fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (12, 8), color).save(buffer, format=fmt)
    return buffer.getvalue()


def vqa_rows(prefix: str) -> dict[str, list]:
    """Four rows, VQA style (one question a row): images 'a' (twice: two questions) and 'b', and a row without an
    image. Row 'a' also brings a caption and a LLaVA-style conversation."""
    red, blue = encoded((200, 0, 0)), encoded((0, 0, 200), "JPEG")
    return {
        "image": [{"bytes": red, "path": None}, {"bytes": red, "path": None}, {"bytes": blue, "path": None}, None],
        "image_id": [f"{prefix}a", f"{prefix}a", f"{prefix}b", f"{prefix}c"],
        "caption": ["a red square.", None, "a blue square.", "nothing."],
        "question": ["what color is it?", "is it round?", None, "q?"],
        "answers": [["red", "red", "dark red"], ["no"], None, ["a"]],
        "kind": ["color", None, None, None],
        "messages": [[{"from": "human", "value": "<image>\nWhat shape?"}, {"from": "gpt", "value": "A square."},
                      {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}], None, None, None],
    }


def save(rows: dict[str, list], name: str, parquet: bool = False) -> str:
    dataset = datasets.Dataset.from_dict(rows, features=FEATURES)
    path = RAW / "hf" / (f"{name}.parquet" if parquet else name)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_parquet(str(path)) if parquet else dataset.save_to_disk(str(path))
    return str(path)


def hf_config(train: str, val: str, test: str, **columns) -> DataConfig:
    return DataConfig(source="hf", hf=HFDatasetConfig((train,), (val,), (test,), **columns))


VQA_COLUMNS = {"id_column": "image_id", "caption_column": "caption", "question_column": "question",
               "answer_column": "answers", "question_type_column": "kind", "conversations_column": "messages"}


@pytest.mark.parametrize("parquet", [False, True], ids=["save_to_disk", "parquet"])
def test_columns_map_onto_rows_and_rows_sharing_an_id_join(parquet: bool, capsys) -> None:
    train = save(vqa_rows("train-"), "train", parquet)
    val, test = save(vqa_rows("val-"), "val", parquet), save(vqa_rows("test-"), "test", parquet)

    rows, _ = imported(hf_config(train, val, test, **VQA_COLUMNS))

    assert "skipped 1 rows without an image" in capsys.readouterr().out
    a, b = rows["train"]
    assert (a["image_id"], a["image"], b["image"]) == ("train-a", encoded((200, 0, 0)), encoded((0, 0, 200), "JPEG"))
    assert a["captions"] == ["a red square."] and b["captions"] == ["a blue square."]
    assert a["questions"] == ["what color is it?", "is it round?"]
    assert a["answers"] == [["red", "red", "dark red"], ["no"]] and a["question_types"] == ["color", "other"]
    assert a["conversations"] == [[{"user": "What shape?", "assistant": "A square."},
                                   {"user": "Sure?", "assistant": "Yes."}]]
    assert (b["questions"], b["conversations"]) == ([], [])
    assert [row["image_id"] for row in rows["test"]] == ["test-a", "test-b"]


def test_without_an_id_column_every_row_is_an_image_named_by_file_and_row() -> None:
    rows = {"image": [{"bytes": encoded((i * 50, 0, 0)), "path": None} for i in range(3)],
            "captions": [["one", "uno"], ["two"], ["three"]]}
    features = datasets.Features({"image": datasets.Image(), "captions": datasets.List(datasets.Value("string"))})
    paths = []
    for name in ("train", "val", "test"):
        path = RAW / "hf" / name
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(path))
        paths.append(str(path))
    result, _ = imported(hf_config(*paths))  # the default columns: image, captions
    assert [row["image_id"] for row in result["train"]] == ["train:0", "train:1", "train:2"]
    assert result["train"][0]["captions"] == ["one", "uno"]


def test_every_missing_column_is_named_with_its_param_and_the_columns_there_are() -> None:
    path = save(vqa_rows(""), "train")
    config = hf_config(path, path, path, caption_column="text", question_column="q", answer_column="answers")
    with pytest.raises(DatasetError) as error:
        imported(config)
    message = str(error.value)
    assert "data/raw/hf/train" in message
    assert "data.hf.caption_column='text', data.hf.question_column='q'" in message
    assert "columns: image, image_id, caption, question, answers, kind, messages" in message


@pytest.mark.parametrize(("change", "expected"), [
    ({"messages": [[{"from": "gpt", "value": "hi"}], None, None, None]},
     r"train: row 0 \(id 'a'\): column 'messages'\[0\]: a gpt turn where a human turn belongs"),
    ({"answers": [[], ["no"], None, ["a"]]}, r"row 0 \(id 'a'\): question 0 needs one non-empty question"),
    ({"image": [{"bytes": b"GIF89a", "path": None}] + vqa_rows("")["image"][1:]},
     r"row 0 \(id 'a'\): the image is neither PNG nor JPEG"),
])
def test_bad_rows_name_the_dataset_and_row(change: dict, expected: str) -> None:
    path = save({**vqa_rows(""), **change}, "train")
    other = save(vqa_rows("other-"), "other")
    with pytest.raises(DatasetError, match=expected):
        imported(hf_config(path, other, other, **VQA_COLUMNS))


def test_a_dataset_dict_folder_and_an_image_column_of_text_are_refused() -> None:
    dataset = datasets.Dataset.from_dict(vqa_rows(""), features=FEATURES)
    datasets.DatasetDict({"train": dataset, "validation": dataset}).save_to_disk(str(RAW / "hf" / "both"))
    config = hf_config("data/raw/hf/both", "data/raw/hf/both", "data/raw/hf/both")
    with pytest.raises(DatasetError, match=r"both: holds a DatasetDict \(splits train, validation\); list the "
                                           r"folder of one of its splits, e.g. data/raw/hf/both/train"):
        imported(config)
    path = save(vqa_rows(""), "train")
    with pytest.raises(DatasetError, match=r"column 'caption' \(param data.hf.image_column\) is Value\('string'\)"):
        imported(replace(config, hf=replace(config.hf, train=(path,), val=(path,), test=(path,),
                                            image_column="caption", caption_column="caption")))
    with pytest.raises(DatasetError, match=r"data/raw/hf/none: neither a folder .* \(it does not exist\)"):
        imported(replace(config, hf=replace(config.hf, train=("data/raw/hf/none",))))
