"""Importers (COCO captions, VQAv2, JSONL manifests): tiny files in the real formats, through to dataset rows.

Each test writes its data under tmp_path/data/raw and runs from tmp_path, as the `data` stage runs from the
repository root. The last test runs a JSONL-manifest dataset through the whole pipeline with `dvc repro`.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image
from pipeline_repo import commit_all, init_pipeline_repo, run, set_params, stages_run

from vlm.config import CocoConfig, DataConfig, ParamsError, SplitCounts, SplitFiles, VQAv2Config
from vlm.data import imports
from vlm.data.coco import read_instances
from vlm.data.dataset_io import DatasetError, iter_split, read_metadata
from vlm.data.entry import RecordStream
from vlm.data.imports import import_entries

RAW = Path("data/raw")
COCO_IMAGES = RAW / "coco" / "images"


# --------------------------------------------------------------------------- fixtures in the real formats


def save_image(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> bytes:
    """A tiny image in the format its suffix names; returns the file's bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path.read_bytes()


def write_json(path: Path, data: object) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return str(path)


def coco_image(coco_id: int, folder: str = "train2014", size: tuple[int, int] = (24, 16)) -> bytes:
    """COCO 2014 naming: images/train2014/COCO_train2014_000000000001.jpg."""
    return save_image(COCO_IMAGES / folder / f"COCO_{folder}_{coco_id:012d}.jpg", (coco_id * 40 % 256, 90, 30), size)


def karpathy_file(images: list[tuple[int, str, str]]) -> str:
    """dataset_coco.json for (cocoid, folder, Karpathy split); two captions each, with stray white space."""
    records = [{"filepath": folder, "filename": f"COCO_{folder}_{coco_id:012d}.jpg", "imgid": index,
                "split": split, "cocoid": coco_id, "sentids": [2 * index, 2 * index + 1],
                "sentences": [{"tokens": ["a"], "raw": f"A photo of image {coco_id}. ", "imgid": index, "sentid": 0},
                              {"tokens": ["b"], "raw": f"image {coco_id} again", "imgid": index, "sentid": 1}]}
               for index, (coco_id, folder, split) in enumerate(images)]
    return write_json(RAW / "coco" / "dataset_coco.json", {"images": records, "dataset": "coco"})


def official_captions(name: str, images: list[tuple[int, str]]) -> str:
    """captions_*.json for (id, file_name), one caption each."""
    return write_json(RAW / "coco" / "annotations" / name, {
        "info": {}, "licenses": [],
        "images": [{"id": coco_id, "file_name": file_name, "height": 16, "width": 24} for coco_id, file_name in images],
        "annotations": [{"image_id": coco_id, "id": 100 + coco_id, "caption": f"official caption {coco_id}"}
                        for coco_id, _ in images]})


CATEGORIES = {18: "dog", 47: "cup", 1: "person"}


def instances_file(name: str, images: list[tuple[int, int, int]], objects: list[tuple[int, list[float], int, int]]
                   ) -> str:
    """instances_*.json for images (id, width, height) and objects (image_id, bbox [x, y, w, h] in pixels,
    category_id, iscrowd), with COCO's other fields (segmentation, area, ids)."""
    return write_json(RAW / "coco" / "annotations" / name, {
        "info": {}, "licenses": [],
        "images": [{"id": coco_id, "width": width, "height": height, "file_name": f"{coco_id:012d}.jpg",
                    "license": 1, "coco_url": "", "date_captured": ""} for coco_id, width, height in images],
        "annotations": [{"id": 900 + index, "image_id": image_id, "bbox": bbox, "category_id": category,
                         "iscrowd": crowd, "area": bbox[-1] * bbox[-2],
                         "segmentation": {"counts": [1], "size": [1, 1]} if crowd else [[0, 0, 1, 0, 1, 1]]}
                        for index, (image_id, bbox, category, crowd) in enumerate(objects)],
        "categories": [{"supercategory": "thing", "id": category, "name": name}
                       for category, name in CATEGORIES.items()]})


def box(x: float, y: float, w: float, h: float, phrase: str) -> dict:
    return {"x": x, "y": y, "w": w, "h": h, "phrase": phrase}


def rounded(regions: list[dict]) -> list[dict]:
    """Regions with their fractions rounded off (0.4 - 0.1 is 0.30000000000000004)."""
    return [{key: round(value, 9) if isinstance(value, float) else value for key, value in region.items()}
            for region in regions]


ANSWER_TYPES = {"what color is": "other", "is there": "yes/no", "how many": "number"}


def vqa_files(name: str, questions: list[tuple[int, int, str]]) -> tuple[str, str]:
    """v2 questions + annotations files for (question_id, image_id, question start): ten answers each, with
    repeats, the answer type following the question's start."""
    answers = {"what color is": ["red"] * 6 + ["dark red"] * 3 + ["maroon"], "is there": ["yes"] * 9 + ["no"],
               "how many": ["2"] * 7 + ["3"] * 3}
    question_file = write_json(RAW / "vqav2" / f"v2_OpenEnded_mscoco_{name}_questions.json", {
        "info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": name,
        "questions": [{"image_id": image, "question": f"{start} thing {qid}?", "question_id": qid}
                      for qid, image, start in questions]})
    annotation_file = write_json(RAW / "vqav2" / f"v2_mscoco_{name}_annotations.json", {
        "info": {}, "data_subtype": name,
        "annotations": [{"question_id": qid, "image_id": image, "question_type": start,
                         "answer_type": ANSWER_TYPES[start], "multiple_choice_answer": answers[start][0],
                         "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                                     for i, a in enumerate(answers[start])]}
                        for qid, image, start in questions]})
    return question_file, annotation_file


def split_files(train: list[str], val: list[str], test: list[str]) -> SplitFiles:
    return SplitFiles(tuple(train), tuple(val), tuple(test))


def imported(config: DataConfig) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """({split: its dataset rows}, {split: images skipped}), as the data stage makes them."""
    rows, skipped = {}, {}
    for split, entries in import_entries(config).items():
        stream = RecordStream(entries, config.resize, config.skip_bad_images)
        rows[split] = list(stream)
        skipped[split] = stream.skipped
    return rows, skipped


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)  # params paths are relative to the repository root
    return tmp_path


@pytest.fixture
def coco_layout() -> dict[int, bytes]:
    """COCO ids 1-2 in train2014, 3-5 in val2014, and the Karpathy file: 1 train, 2 restval, 3 val, 4 test,
    5 test. Returns each image's file bytes."""
    files = {1: coco_image(1), 2: coco_image(2), 3: coco_image(3, "val2014"), 4: coco_image(4, "val2014"),
             5: coco_image(5, "val2014")}
    karpathy_file([(1, "train2014", "train"), (2, "train2014", "restval"), (3, "val2014", "val"),
                   (4, "val2014", "test"), (5, "val2014", "test")])
    return files


def karpathy_config(**overrides) -> DataConfig:
    path = str(RAW / "coco" / "dataset_coco.json")
    coco = CocoConfig(images=str(COCO_IMAGES), captions=split_files([path], [path], [path]))
    return DataConfig(**{"source": "coco", "coco": coco, **overrides})


# --------------------------------------------------------------------------- COCO captions


def test_karpathy_split_file_gives_each_image_its_split_with_original_bytes(coco_layout) -> None:
    rows, skipped = imported(karpathy_config())

    assert {split: [row["image_id"] for row in split_rows] for split, split_rows in rows.items()} == {
        "train": ["1", "2"], "val": ["3"], "test": ["4", "5"]}  # restval joins train
    first = rows["train"][0]
    assert first["captions"] == ["A photo of image 1.", "image 1 again"]  # white space stripped
    assert first["image"] == coco_layout[1]  # the file's bytes, not re-encoded
    assert (first["questions"], first["answers"], first["question_types"]) == ([], [], [])
    assert skipped == {"train": 0, "val": 0, "test": 0}


def test_official_captions_files_find_images_by_name_or_by_coco_id() -> None:
    coco_image(1)
    coco_image(2)
    two_thousand_seventeen = save_image(COCO_IMAGES / "val2017" / "000000000003.jpg", (1, 2, 3))
    coco_image(4, "val2014")
    train = official_captions("captions_train2014.json", [(1, "train2014/COCO_train2014_000000000001.jpg"),
                                                          (2, "COCO_train2014_000000000002.jpg")])
    val = official_captions("captions_val2017.json", [(3, "000000000003.jpg")])
    test = official_captions("captions_val2014.json", [(4, "COCO_val2014_000000000004.jpg")])
    config = DataConfig(source="coco", coco=CocoConfig(str(COCO_IMAGES), split_files([train], [val], [test])))

    rows, _ = imported(config)

    assert [row["image_id"] for row in rows["train"]] == ["1", "2"]
    assert rows["val"][0]["image"] == two_thousand_seventeen
    assert rows["test"][0]["captions"] == ["official caption 4"]


def test_unknown_karpathy_split_names_the_file_the_record_and_the_known_splits(coco_layout) -> None:
    path = karpathy_file([(1, "train2014", "train"), (3, "val2014", "validation")])
    with pytest.raises(DatasetError) as error:
        imported(karpathy_config())
    message = str(error.value)
    assert path in message and "images[1]" in message and "cocoid 3" in message and "'validation'" in message
    assert "restval" in message


def test_missing_image_stops_naming_the_record_or_is_skipped_and_counted(coco_layout) -> None:
    (COCO_IMAGES / "val2014" / "COCO_val2014_000000000004.jpg").unlink()

    with pytest.raises(DatasetError) as error:
        imported(karpathy_config())
    message = str(error.value)
    assert "dataset_coco.json: images[3] (cocoid 4)" in message
    assert "COCO_val2014_000000000004.jpg" in message and "data.skip_bad_images" in message

    rows, skipped = imported(karpathy_config(skip_bad_images=True))
    assert [row["image_id"] for row in rows["test"]] == ["5"]
    assert skipped == {"train": 0, "val": 0, "test": 1}


def test_resize_shrinks_only_large_images_and_keeps_jpeg(coco_layout) -> None:
    big = coco_image(1, size=(200, 100))

    rows, _ = imported(karpathy_config(resize=50))

    shrunk = Image.open(io.BytesIO(rows["train"][0]["image"]))
    assert (shrunk.format, shrunk.size) == ("JPEG", (50, 25))
    assert rows["train"][0]["image"] != big
    assert rows["train"][1]["image"] == coco_layout[2]  # 24 x 16 fits: original bytes


def test_an_image_that_is_not_png_or_jpeg_is_a_bad_image_unless_resize_reencodes_it(coco_layout) -> None:
    path = COCO_IMAGES / "train2014" / "COCO_train2014_000000000001.jpg"
    Image.new("RGB", (8, 8), (9, 9, 9)).save(path, format="GIF")
    with pytest.raises(DatasetError, match="neither PNG nor JPEG"):
        imported(karpathy_config())
    rows, _ = imported(karpathy_config(resize=64))
    assert Image.open(io.BytesIO(rows["train"][0]["image"])).format == "PNG"


def test_max_images_caps_each_split(coco_layout) -> None:
    rows, _ = imported(karpathy_config(max_images=SplitCounts(train=1, val=0, test=1)))
    assert {split: [row["image_id"] for row in split_rows] for split, split_rows in rows.items()} == {
        "train": ["1"], "val": ["3"], "test": ["4"]}


def test_train_images_must_not_be_in_val_or_test() -> None:
    coco_image(1)
    coco_image(2)
    train = official_captions("captions_train2014.json", [(1, "COCO_train2014_000000000001.jpg"),
                                                          (2, "COCO_train2014_000000000002.jpg")])
    config = DataConfig(source="coco", coco=CocoConfig(str(COCO_IMAGES), split_files([train], [train], [train])))
    with pytest.raises(DatasetError, match=r"image '1' of split val is also in train"):
        imported(config)


# --------------------------------------------------------------------------- COCO instances: object boxes as regions


def test_instances_join_karpathy_captions_as_regions_and_crowds_are_left_out(coco_layout, capsys,
                                                                               monkeypatch) -> None:
    train = instances_file("instances_train2014.json", [(1, 200, 100), (2, 24, 16)], [
        (1, [20, 10, 60, 40], 18, 0),   # a dog: centre (50, 30) of 200 x 100
        (1, [0, 0, 200, 100], 1, 1),    # a crowd of people: left out
        (1, [150, 50, 10, 10], 47, 0)])  # a cup; image 2 has no objects
    val = instances_file("instances_val2014.json", [(3, 24, 16), (4, 24, 16), (5, 24, 16), (99, 24, 16)], [
        (4, [0, 0, 12, 8], 47, 0), (99, [0, 0, 1, 1], 18, 0)])  # image 99 is in no caption split
    reads = []

    def counted(path):
        reads.append(path)
        return read_instances(path)

    monkeypatch.setattr(imports, "read_instances", counted)
    config = karpathy_config(coco=CocoConfig(str(COCO_IMAGES), karpathy_config().coco.captions,
                                             split_files([train, val], [val], [val, train])))

    rows, _ = imported(config)

    by_id = {row["image_id"]: row for split_rows in rows.values() for row in split_rows}
    assert rounded(by_id["1"]["regions"]) == [box(0.25, 0.3, 0.3, 0.4, "dog"), box(0.775, 0.55, 0.05, 0.1, "cup")]
    assert by_id["1"]["captions"] == ["A photo of image 1.", "image 1 again"]  # joined to the caption row
    assert by_id["2"]["regions"] == by_id["3"]["regions"] == by_id["5"]["regions"] == []
    assert by_id["4"]["regions"] == [box(0.25, 0.25, 0.5, 0.5, "cup")]
    assert sorted(map(str, reads)) == sorted([train, val])  # each file read once, though several splits list it
    log = capsys.readouterr().out
    assert f"data test: 0 of the 1 images with objects in {train} are in this split; is the file listed for the " \
           "right split (param data.coco.instances.test)?" in log
    assert f"data val: 0 of the 2 images with objects in {val}" in log
    assert f"data test: 1 of the 2 images with objects in {val}" in log


def test_instances_join_official_captions_or_vqav2_and_small_overshoot_is_clamped() -> None:
    captions = [official_captions(f"captions_{name}.json", [(coco_id, f"{coco_id:012d}.jpg")])
                for name, coco_id in (("train2014", 2), ("val2014", 3), ("test", 4))]
    # 640 x 480 in the instances file: the box reaches 0.5 px past the right edge (COCO's rounding)
    objects = instances_file("instances_train2014.json", [(2, 640, 480), (3, 640, 480)],
                             [(2, [320, 240, 320.5, 240], 18, 0), (3, [0, 0, 64, 48], 47, 0)])
    train, val = vqa_files("train2014", [(10, 2, "is there")]), vqa_files("val2014", [(30, 3, "is there"),
                                                                                      (40, 4, "how many")])
    instances = split_files([objects], [objects], [])
    coco = DataConfig(source="coco", coco=CocoConfig(str(COCO_IMAGES), split_files(*([c] for c in captions)),
                                                     instances))
    vqav2 = DataConfig(source="vqav2", coco=CocoConfig(instances=instances), vqav2=VQAv2Config(
        str(COCO_IMAGES), split_files([train[0]], [val[0]], [val[0]]), split_files([train[1]], [val[1]], [val[1]])))
    for config in (coco, vqav2):
        splits = import_entries(config)  # reads annotations, no image
        regions = {split: {entry.image_id: rounded(map(vars, entry.regions)) for entry in entries}
                   for split, entries in splits.items()}
        assert regions["train"] == {"2": [box(0.75, 0.75, 0.5, 0.5, "dog")]}, config.source  # clamped to the image
        assert regions["val"]["3"] == [box(0.05, 0.05, 0.1, 0.1, "cup")]
        assert regions["test"]["4"] == []  # no instances file listed for test


@pytest.mark.parametrize(("objects", "expected"), [
    ([(1, [0, 0, 5, 5], 47, 0), (1, [0, 0, 5, 5], 7, 0)],
     r"annotations\[1\] \(image_id 1\): unknown category_id 7; the file's 'categories' have ids \[1, 18, 47\]"),
    ([(1, [0, 0, 5, 5], 47, 0), (8, [0, 0, 5, 5], 47, 0)],
     r"annotations\[1\] \(image_id 8\): image_id 8 is not in the file's 'images'"),
    ([(1, [0, 0, 5, 5], 47, 0), (1, [20, 10, 60, 40], 47, 0)],  # pixels of a bigger image
     r"annotations\[1\] \(image_id 1\): reaches outside the image .*bbox \[20, 10, 60, 40\] is \[x, y, width, "
     r"height\] in pixels of the 24 x 16 image of .*images\[0\] \(id 1\); correct the box"),
    ([(1, [0, 0, 5, 5], 47, 0), (1, [5, 5, -2, 3], 47, 0)], r"annotations\[1\] .*negative width or height"),
    ([(1, [0, 0, 5, 5], 47, 0), (1, [5, 5, 3], 47, 0)], r"annotations\[1\] .*bbox must be \[x, y, width, height\]"),
])
def test_bad_instances_name_the_file_the_annotation_and_what_to_fix(objects, expected) -> None:
    captions = official_captions("captions_train2014.json", [(1, "COCO_train2014_000000000001.jpg")])
    path = instances_file("instances_train2014.json", [(1, 24, 16)], objects)
    config = DataConfig(source="coco", coco=CocoConfig(str(COCO_IMAGES), split_files([captions], [captions],
                                                                                     [captions]),
                                                       split_files([path], [], [])))
    with pytest.raises(DatasetError, match=expected) as error:
        import_entries(config)
    assert path in str(error.value)


def test_instances_paths_must_lie_under_data_raw() -> None:
    with pytest.raises(ParamsError, match=r"data\.coco\.instances\.val\[0\]='elsewhere/instances\.json' must be"):
        karpathy_config(coco=CocoConfig(str(COCO_IMAGES), karpathy_config().coco.captions,
                                        split_files([], ["elsewhere/instances.json"], [])))


# --------------------------------------------------------------------------- VQAv2, alone and merged with COCO


def test_vqav2_keeps_all_ten_answers_and_the_answer_type() -> None:
    coco_image(1)
    coco_image(2)
    coco_image(3, "val2014")
    train = vqa_files("train2014", [(10, 1, "what color is"), (11, 1, "is there"), (20, 2, "how many")])
    val = vqa_files("val2014", [(30, 3, "is there")])
    questions, annotations = split_files([train[0]], [val[0]], [val[0]]), split_files([train[1]], [val[1]], [val[1]])
    config = DataConfig(source="vqav2", vqav2=VQAv2Config(str(COCO_IMAGES), questions, annotations))

    rows, _ = imported(config)

    first = rows["train"][0]
    assert (first["image_id"], first["captions"]) == ("1", [])
    assert first["questions"] == ["what color is thing 10?", "is there thing 11?"]
    assert first["answers"][0] == ["red"] * 6 + ["dark red"] * 3 + ["maroon"]  # repeats kept: VQA accuracy counts
    assert len(first["answers"][1]) == 10
    assert first["question_types"] == ["other", "yes/no"]
    assert rows["train"][1]["question_types"] == ["number"]
    assert [row["image_id"] for row in rows["val"]] == [row["image_id"] for row in rows["test"]] == ["3"]


def test_vqav2_question_without_annotation_names_both_files() -> None:
    questions, _ = vqa_files("train2014", [(10, 1, "is there"), (11, 1, "how many")])
    _, annotations = vqa_files("other", [(10, 1, "is there")])
    config = DataConfig(source="vqav2", vqav2=VQAv2Config(
        str(COCO_IMAGES), split_files([questions], [questions], [questions]),
        split_files([annotations], [annotations], [annotations])))
    with pytest.raises(DatasetError) as error:
        imported(config)
    message = str(error.value)
    assert questions in message and "question_id 11" in message and annotations in message


def test_coco_and_vqav2_merge_into_one_row_per_image(coco_layout) -> None:
    train = vqa_files("train2014", [(10, 1, "how many"), (20, 2, "is there")])
    val = vqa_files("val2014", [(30, 3, "what color is"), (40, 4, "is there"), (41, 4, "how many"),
                                (60, 6, "is there")])  # image 6 has no captions: left out
    config = karpathy_config(source="coco+vqav2", vqav2=VQAv2Config(
        "data/raw/unused", split_files([train[0], val[0]], [val[0]], [val[0]]),
        split_files([train[1], val[1]], [val[1]], [val[1]])))

    rows, _ = imported(config)

    by_id = {row["image_id"]: row for split_rows in rows.values() for row in split_rows}
    assert sorted(by_id) == ["1", "2", "3", "4", "5"]
    assert by_id["1"]["captions"] == ["A photo of image 1.", "image 1 again"]
    assert by_id["1"]["questions"] == ["how many thing 10?"]
    assert by_id["4"]["questions"] == ["is there thing 40?", "how many thing 41?"]  # a test image: val2014 questions
    assert by_id["4"]["answers"][1] == ["2"] * 7 + ["3"] * 3
    assert by_id["4"]["question_types"] == ["yes/no", "number"]
    assert by_id["5"]["questions"] == [] and by_id["5"]["captions"]  # captions only
    assert by_id["4"]["image"] == coco_layout[4]


# --------------------------------------------------------------------------- JSONL manifests


def write_manifest(path: Path, records: list[object]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def jsonl_config(train: str, val: str | None = None, test: str | None = None) -> DataConfig:
    return DataConfig(source="jsonl", jsonl=split_files([train], [val or train], [test or train]))


def test_jsonl_manifest_records_become_rows() -> None:
    folder = RAW / "manifest"
    cat = save_image(folder / "images" / "cat.png", (200, 10, 10))
    dog = save_image(folder / "images" / "dog.jpg", (10, 10, 200))
    save_image(folder / "images" / "bird.png", (10, 200, 10))
    train = write_manifest(folder / "train.jsonl", [
        {"image": "images/cat.png", "captions": ["a red cat.", "a cat"]},
        "",  # blank lines are skipped
        {"image": "images/dog.jpg", "id": "dog-1", "captions": [],
         "questions": [{"question": "what color?", "answers": ["blue", "blue", "navy"], "type": "color"},
                       {"question": "is it a dog?", "answers": ["yes"]}]},
    ])
    other = write_manifest(folder / "test.jsonl", [{"image": "images/bird.png", "captions": ["a green bird."]}])

    rows, _ = imported(jsonl_config(train, other, other))

    cat_row, dog_row = rows["train"]
    assert (cat_row["image_id"], cat_row["image"], cat_row["captions"]) == ("images/cat.png", cat, ["a red cat.",
                                                                                                    "a cat"])
    assert (dog_row["image_id"], dog_row["image"]) == ("dog-1", dog)
    assert dog_row["answers"] == [["blue", "blue", "navy"], ["yes"]]
    assert dog_row["question_types"] == ["color", "other"]
    assert rows["test"][0]["image_id"] == "images/bird.png"


def test_jsonl_regions_are_boxes_or_points_in_fractions_of_the_image() -> None:
    folder = RAW / "manifest"
    save_image(folder / "cat.png", (200, 10, 10))
    save_image(folder / "dog.png", (10, 10, 200))
    train = write_manifest(folder / "train.jsonl", [
        {"image": "cat.png", "captions": ["a cat."], "regions": [
            {"phrase": "cat", "box": [0.1, 0.2, 0.5, 1.0]}, {"phrase": " lamp ", "point": [0.9, 0.05]},
            {"phrase": "rug", "box": [-0.004, 0.5, 1.003, 1.0]}]},  # a rounding error past the edges: clamped
        {"image": "dog.png", "captions": ["a dog."]}])
    save_image(folder / "bird.png", (10, 200, 10))
    other = write_manifest(folder / "other.jsonl", [{"image": "bird.png", "captions": ["a bird."]}])

    rows, _ = imported(jsonl_config(train, other, other))

    cat, dog = rows["train"]
    assert rounded(cat["regions"]) == [box(0.3, 0.6, 0.4, 0.8, "cat"), box(0.9, 0.05, 0.0, 0.0, "lamp"),
                                       box(0.5, 0.75, 1.0, 0.5, "rug")]
    assert dog["regions"] == []


@pytest.mark.parametrize(("line", "expected"), [
    ('{"image": "a.png", "captions": ["x"]', r"train\.jsonl:2: not valid JSON"),
    ({"image": "a.png", "caption": ["x"]}, r"train\.jsonl:2: unknown field 'caption'; allowed fields: image"),
    ({"image": "a.png"}, r"train\.jsonl:2: has neither captions nor questions"),
    ({"image": "a.png", "questions": [{"question": "q?", "answers": []}]}, r":2: questions\[0\]: 'answers'"),
    ({"image": "/etc/a.png", "captions": ["x"]}, r":2: image '/etc/a.png' must be a path relative"),
    ({"image": "ok.png", "captions": ["y"]}, r":2: id 'ok.png' was already used on line 1"),
    ({"image": "a.png", "captions": ["x"], "regions": [{"phrase": "cat", "box": [0.1, 0.1, 0.2, 0.2]},
                                                       {"phrase": "dog", "box": [12, 30, 200, 180]}]},
     r":2: regions\[1\]: box \[12, 30, 200, 180\]: reaches outside the image .* coordinates are fractions of the "
     r"image's width and height: divide pixel values by the image size"),
    ({"image": "a.png", "captions": ["x"], "regions": [{"phrase": "cat", "box": [0.5, 0.1, 0.2, 0.2]}]},
     r":2: regions\[0\]: box \[0\.5, 0\.1, 0\.2, 0\.2\]: the box ends before it starts \(x1 < x0\)"),
    ({"image": "a.png", "captions": ["x"], "regions": [{"phrase": "cat", "box": [0, 0, 1, 1], "point": [0, 0]}]},
     r":2: regions\[0\]: give either a 'box' \[x0, y0, x1, y1\] or a 'point' \[x, y\] \(not both\)"),
    ({"image": "a.png", "captions": ["x"], "regions": [{"phrase": "cat"}]}, r":2: regions\[0\]: give either"),
    ({"image": "a.png", "captions": ["x"], "regions": [{"phrase": "cat", "bbox": [0, 0, 1, 1]}]},
     r":2: regions\[0\]: unknown field 'bbox'; allowed fields: phrase, box, point"),
    ({"image": "a.png", "captions": ["x"], "regions": [{"phrase": "cat", "point": [0.5]}]},
     r":2: regions\[0\]: 'point' must be \[x, y\], got \[0\.5\]"),
    ({"image": "a.png", "captions": ["x"], "regions": [{"box": [0, 0, 1, 1]}]}, r":2: regions\[0\]: has no 'phrase'"),
])
def test_bad_manifest_lines_are_reported_with_their_line_number(line: object, expected: str) -> None:
    path = write_manifest(RAW / "m" / "train.jsonl", [{"image": "ok.png", "captions": ["fine"]}, line])
    with pytest.raises(DatasetError, match=expected):
        imported(jsonl_config(path))


def test_manifest_missing_image_names_the_line() -> None:
    path = write_manifest(RAW / "m" / "train.jsonl", [{"image": "gone.png", "captions": ["x"]}])
    other = write_manifest(RAW / "m" / "other.jsonl", [{"image": "other.png", "captions": ["x"]}])
    with pytest.raises(DatasetError, match=r"train\.jsonl:1 \(id 'gone\.png'\): image file not found; looked for "
                                           r"data/raw/m/gone\.png"):
        imported(jsonl_config(path, other, other))


# --------------------------------------------------------------------------- end to end with dvc repro


def tiny_manifest_dataset(root: Path) -> dict[str, list[str]]:
    """A JSONL dataset of 8 train, 2 val and 3 test images under root/data/raw/shapes, a quarter of the train images
    and one test image without a caption, none with regions; returns the ids per split."""
    folder = root / "data" / "raw" / "shapes"
    colors = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "white": (250, 250, 250)}
    ids = {}
    for split, count in (("train", 8), ("val", 2), ("test", 3)):
        records = []
        for index in range(count):
            name, rgb = list(colors.items())[index % len(colors)]
            image = f"images/{split}-{index}.{'png' if index % 2 else 'jpg'}"
            save_image(folder / image, rgb, (40 + index, 32))
            captioned = not (split == "train" and index % 4 == 3 or split == "test" and index == 2)
            records.append({"image": image, "id": f"{split}-{index}", "captions": [f"a {name} square."] * captioned,
                            "questions": [{"question": "what color is it?", "answers": [name] * 3, "type": "color"}]})
        write_manifest(folder / f"{split}.jsonl", records)
        ids[split] = [record["id"] for record in records]
    return ids


def test_jsonl_dataset_runs_through_the_whole_pipeline(tmp_path: Path) -> None:
    """As the README's "Your own data" says: data.source and its files, `vlm recipe own-data`, `dvc repro`. Under
    the scenes' grid recipe the same data stops at `check`, before `embed`, naming the recipe that fits."""
    repo = tmp_path / "repo"
    repo.mkdir()
    init_pipeline_repo(repo)
    ids = tiny_manifest_dataset(repo)
    set_params(repo, {"data": {"source": "jsonl", "jsonl": {
        split: [f"data/raw/shapes/{split}.jsonl"] for split in ("train", "val", "test")}}})
    run(["dvc", "add", "data/raw/shapes"], repo)  # as README says: DVC tracks the raw data, git the .dvc file
    commit_all(repo, "sources, tiny models, a JSONL dataset")

    failed = run(["dvc", "repro"], repo, check=False)
    assert failed.returncode != 0 and stages_run(failed) == ["data", "check"]
    assert "train_vlm.align.target" in failed.stderr and "vlm recipe own-data" in failed.stderr
    run([sys.executable, "-m", "vlm.cli", "recipe", "own-data"], repo)
    first = run(["dvc", "repro"], repo)

    assert stages_run(first) == ["check", "weights", "embed", "train_qformer", "train_vlm", "evaluate"]
    test_rows = list(iter_split(repo / "data" / "dataset" / "test.parquet"))
    assert [row["image_id"] for row in test_rows] == ids["test"]
    assert test_rows[1]["answers"] == [["green"] * 3]
    assert read_metadata(repo / "data" / "dataset" / "train.parquet")["source"] == "jsonl"
    counts = json.loads((repo / "metrics" / "data.json").read_text())
    assert (counts["train_images"], counts["train_captions"], counts["train_questions"]) == (8, 6, 8)
    stage1 = json.loads((repo / "metrics" / "train_qformer.json").read_text())
    assert (stage1["images"], stage1["images_without_captions"]) == (6, 2)
    assert stage1["retrieval_images"] == 2  # the caption-less test image is no candidate, so it is no miss
    evaluation = json.loads((repo / "metrics" / "eval.json").read_text())
    assert 0.0 <= evaluation["vqa_accuracy_color"] <= 1.0 and "cider" in evaluation
    assert (evaluation["caption_images"], evaluation["question_images"]) == (2, 3)
    predictions = [json.loads(line) for line in (repo / "predictions" / "test.jsonl").read_text().splitlines()]
    assert {p["image_id"] for p in predictions} == set(ids["test"])
    commit_all(repo, "reproduced")

    # A changed manifest, re-added to DVC, makes `data` (and so everything downstream) out of date.
    manifest = repo / "data" / "raw" / "shapes" / "val.jsonl"
    manifest.write_text(manifest.read_text().replace("a red square.", "a bright red square."))
    run(["dvc", "add", "data/raw/shapes"], repo)
    status = run(["dvc", "status", "dvc.yaml:data"], repo).stdout
    assert "data/raw" in status and "modified" in status


def test_coco_with_instances_trains_the_grid_target_through_the_whole_pipeline(tmp_path: Path, monkeypatch) -> None:
    """Karpathy's captions and the two official instances files, in their real layout: the boxes become regions,
    the grid alignment trains on them, and the evaluation reads the slots back against the test images' boxes."""
    repo = tmp_path / "repo"
    repo.mkdir()
    init_pipeline_repo(repo)
    monkeypatch.chdir(repo)  # the fixture helpers write under ./data/raw
    images = ([(i, "train2014", "train") for i in range(1, 7)] + [(7, "val2014", "restval"), (8, "val2014", "restval")]
              + [(9, "val2014", "val"), (10, "val2014", "val")] + [(i, "val2014", "test") for i in (11, 12, 13)])
    objects = {"train2014": [], "val2014": []}
    for coco_id, folder, _ in images:
        coco_image(coco_id, folder, (48, 32))
        # a dog or a cup in the top-left cell, every third image a person on the right too; image 13 only a crowd
        if coco_id != 13:
            objects[folder].append((coco_id, [2, 2, 18, 12], 18 if coco_id % 2 else 47, 0))
        if coco_id % 3 == 0:
            objects[folder].append((coco_id, [28, 4, 16, 24], 1, 1 if coco_id == 12 else 0))
    karpathy_file(images)
    train, val = (instances_file(f"instances_{folder}.json", [(i, 48, 32) for i, f, _ in images if f == folder],
                                 objects[folder]) for folder in ("train2014", "val2014"))
    set_params(repo, {"data": {"source": "coco", "coco": {"instances": {"train": [train, val], "val": [val],
                                                                         "test": [val]}}},
                      "train_vlm": {"align": {"target": "grid"}, "grid": {"size": 2}}})  # 4 queries: one per cell
    run(["dvc", "add", "data/raw/coco"], repo)
    commit_all(repo, "sources, tiny models, a COCO dataset with instances")

    result = run(["dvc", "repro"], repo)

    assert stages_run(result) == ["data", "check", "weights", "embed", "train_qformer", "train_vlm", "evaluate"]
    counts = json.loads((repo / "metrics" / "data.json").read_text())
    assert (counts["train_images"], counts["train_regions"], counts["test_regions"]) == (8, 10, 2)
    test_rows = {row["image_id"]: row for row in iter_split(repo / "data" / "dataset" / "test.parquet")}
    assert rounded(test_rows["11"]["regions"]) == [box(0.229166667, 0.25, 0.375, 0.375, "dog")]
    assert test_rows["12"]["regions"][0]["phrase"] == "cup" and test_rows["13"]["regions"] == []  # crowds left out
    assert "align_accuracy" in json.loads((repo / "metrics" / "train_vlm.json").read_text())
    evaluation = json.loads((repo / "metrics" / "eval.json").read_text())
    assert 0.0 <= evaluation["slot_accuracy"] <= 1.0  # the slots scored against the test images' boxes
