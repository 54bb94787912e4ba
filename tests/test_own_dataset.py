"""tools/make_own_dataset.py: a user-style JSONL dataset that the manifest reader and the `data` stage's import
accept, with captions on only part of the images, no regions, and the same bytes from the same arguments."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from tools.make_own_dataset import main as make_own_dataset
from vlm.config import DataConfig, SplitFiles
from vlm.data.dataset_io import count_split, iter_split, write_split
from vlm.data.entry import RecordStream
from vlm.data.imports import import_entries
from vlm.data.jsonl_manifest import read_manifest

SPLITS = ("train", "val", "test")
SIZES = {"train": 12, "val": 3, "test": 5}
ARGS = ["--train", "12", "--val", "3", "--test", "5", "--seed", "7"]


def make(out: Path, *extra: str) -> None:
    make_own_dataset(["--out", str(out), *ARGS, *extra])


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_manifests_are_read_and_imported_as_the_data_stage_does(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # the data stage runs from the repository root; params point under data/raw
    make(Path("data/raw/own"), "--caption-fraction", "0.75")
    for split, count in SIZES.items():
        lines = [json.loads(line) for line in Path(f"data/raw/own/{split}.jsonl").read_text().splitlines()]
        assert len(lines) == count and all("regions" not in line for line in lines)
        assert sum("captions" not in line for line in lines) == count - round(0.75 * count)
        entries = read_manifest(Path(f"data/raw/own/{split}.jsonl"))
        assert [e.image_id for e in entries] == [line["id"] for line in lines]
        assert all(e.questions and 1 <= len(e.questions) <= 5 for e in entries)  # caption-less images keep theirs
        assert all(len(e.captions) <= 2 for e in entries)
        for line in lines:
            with Image.open(Path("data/raw/own") / line["image"]) as image:
                assert (image.format, image.size) == ("JPEG", (64, 64))

    config = DataConfig(source="jsonl", jsonl=SplitFiles(*((f"data/raw/own/{split}.jsonl",) for split in SPLITS)))
    imported = import_entries(config)
    assert {split: len(entries) for split, entries in imported.items()} == SIZES
    write_split(RecordStream(imported["test"]), tmp_path / "test.parquet")
    rows = list(iter_split(tmp_path / "test.parquet"))
    assert [row["image_id"] for row in rows] == [f"test-{i:05d}" for i in range(5)]
    assert all(row["regions"] == [] for row in rows)
    types = {t for row in rows for t in row["question_types"]}
    assert types <= {"shape", "color", "background", "count", "yes/no"} and len(types) >= 3
    assert count_split(tmp_path / "test.parquet")["images"] == 5
    assert Image.open(io.BytesIO(rows[0]["image"])).format == "JPEG"


def test_same_arguments_same_bytes_and_no_overwrite(tmp_path: Path) -> None:
    make(tmp_path / "a")
    make(tmp_path / "b")
    first = tree_digest(tmp_path / "a")
    assert first == tree_digest(tmp_path / "b") and len(first) == 3 + 1 + sum(SIZES.values())
    make_own_dataset(["--out", str(tmp_path / "c"), *ARGS[:-1], "8"])
    assert tree_digest(tmp_path / "c") != first  # another seed draws other pictures

    with pytest.raises(SystemExit, match="is not empty; pass --force"):
        make(tmp_path / "a")
    (tmp_path / "a" / "train.jsonl").write_text("edited by hand\n")
    make(tmp_path / "a", "--force")
    assert tree_digest(tmp_path / "a") == first


def test_no_captions_makes_a_question_only_dataset(tmp_path: Path) -> None:
    make(tmp_path / "q", "--no-captions")
    for split in SPLITS:
        entries = read_manifest(tmp_path / "q" / f"{split}.jsonl")
        assert len(entries) == SIZES[split]
        assert all(not e.captions and e.questions for e in entries)
    with pytest.raises(SystemExit):
        make(tmp_path / "bad", "--no-captions", "--caption-fraction", "0.5")


def test_synonym_answers_each_score_full_vqa_accuracy() -> None:
    from tools.make_own_dataset import answers
    from vlm.eval.metrics.vqa_accuracy.vqa_accuracy import answer_accuracy

    grey = answers(("grey", "gray"))
    assert answer_accuracy("grey", grey) == answer_accuracy("gray", grey) == 1.0
    assert answer_accuracy("black", grey) == 0.0
    assert answers(("heart",)) == ["heart"]
