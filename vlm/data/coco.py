"""COCO captions: Karpathy's split file (`dataset_coco.json`) or the official `captions_*.json`, as Entries; and
the objects of the official `instances_*.json`, as Regions.

Karpathy's file holds every image once with its own split: `train`, `restval` (val2014 images that the
Karpathy split gives to training, so they join `train` here), `val` and `test`. The official files have no
split of their own: all of their images go to the split the params list them for.
Image ids are the COCO ids as strings, so VQAv2 questions about the same image join the same row, and so do the
objects of an instances file (vlm/data/imports.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm.data.dataset_io import DatasetError
from vlm.data.entry import Entry, Region, box_region, integer, number, read_json, require, text
from vlm.data.image_files import ImageFolder

# Karpathy split -> the dataset split it lands in.
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
ALL_SPLITS = None  # the key under which an official captions file's entries come: it has no split of its own


def read_captions(path: Path, folder: ImageFolder) -> dict[str | None, list[Entry]]:
    """Entries of a COCO captions file, in file order: {split: entries} for a Karpathy file, {ALL_SPLITS:
    entries} for an official one. Raises DatasetError naming the file and record that do not fit."""
    data = read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: not a COCO captions file: expected an object with an 'images' list "
                           "(Karpathy's dataset_coco.json, or captions_*.json with 'images' and 'annotations')")
    if "annotations" in data:
        return {ALL_SPLITS: _official_entries(path, data, folder)}
    return _karpathy_entries(path, data["images"], folder)


def _karpathy_entries(path: Path, images: list[Any], folder: ImageFolder) -> dict[str | None, list[Entry]]:
    by_split: dict[str | None, list[Entry]] = {split: [] for split in dict.fromkeys(KARPATHY_SPLITS.values())}
    for index, image in enumerate(images):
        where = f"{path}: images[{index}]"
        coco_id = integer(require(image, "cocoid", where), where, "cocoid")
        where = f"{where} (cocoid {coco_id})"
        split = require(image, "split", where)
        if split not in KARPATHY_SPLITS:
            raise DatasetError(f"{where}: unknown split {split!r}; known splits: {', '.join(KARPATHY_SPLITS)}")
        filename = text(require(image, "filename", where), where, "filename")
        filepath = text(image.get("filepath", ""), where, "filepath")
        sentences = require(image, "sentences", where)
        if not isinstance(sentences, list):
            raise DatasetError(f"{where}: 'sentences' must be a list, got {type(sentences).__name__}")
        captions = [text(require(sentence, "raw", f"{where} sentences[{i}]"), where, f"sentences[{i}].raw")
                    for i, sentence in enumerate(sentences)]
        names = (f"{filepath}/{filename}", filename) if filepath else (filename,)
        by_split[KARPATHY_SPLITS[split]].append(
            Entry(str(coco_id), where, folder, names, coco_id, [c for c in captions if c]))
    return by_split


def _official_entries(path: Path, data: dict[str, Any], folder: ImageFolder) -> list[Entry]:
    entries: dict[int, Entry] = {}
    for index, image in enumerate(data["images"]):
        where = f"{path}: images[{index}]"
        coco_id = integer(require(image, "id", where), where, "id")
        file_name = text(require(image, "file_name", where), f"{where} (id {coco_id})", "file_name")
        if coco_id in entries:
            raise DatasetError(f"{where}: image id {coco_id} is listed twice")
        entries[coco_id] = Entry(str(coco_id), f"{where} (id {coco_id}, {file_name})", folder, (file_name,), coco_id)
    annotations = data["annotations"]
    if not isinstance(annotations, list):
        raise DatasetError(f"{path}: 'annotations' must be a list, got {type(annotations).__name__}")
    for index, annotation in enumerate(annotations):
        where = f"{path}: annotations[{index}]"
        coco_id = integer(require(annotation, "image_id", where), where, "image_id")
        if coco_id not in entries:
            raise DatasetError(f"{where}: image_id {coco_id} is not in the file's 'images'")
        caption = text(require(annotation, "caption", where), where, "caption")
        if caption:
            entries[coco_id].captions.append(caption)
    return list(entries.values())


def read_instances(path: Path) -> dict[int, list[Region]]:
    """{COCO image id: its objects}, from an official instances_*.json, in annotation order: each annotation's
    `bbox` ([x, y, width, height] in pixels from the top left) as fractions of its image's `width` and `height` in
    the file, named by its category ("dog"). Crowd annotations (iscrowd 1: one region around many objects, e.g. a
    crowd of people) are left out. Raises DatasetError naming the file and record that do not fit."""
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(key), list)
                                             for key in ("images", "annotations", "categories")):
        raise DatasetError(f"{path}: not a COCO instances file: expected an object with 'images', 'annotations' and "
                           "'categories' lists (the official instances_*.json)")
    categories: dict[int, str] = {}
    for index, category in enumerate(data["categories"]):
        where = f"{path}: categories[{index}]"
        categories[integer(require(category, "id", where), where, "id")] = text(
            require(category, "name", where), where, "name", empty_ok=False)
    sizes: dict[int, tuple[float, float, str]] = {}
    for index, image in enumerate(data["images"]):
        where = f"{path}: images[{index}]"
        coco_id = integer(require(image, "id", where), where, "id")
        where = f"{where} (id {coco_id})"
        width, height = (number(require(image, key, where), where, key) for key in ("width", "height"))
        if width <= 0 or height <= 0:
            raise DatasetError(f"{where}: width and height must be > 0 pixels, got {width} x {height}")
        sizes[coco_id] = (width, height, where)
    regions: dict[int, list[Region]] = {}
    for index, annotation in enumerate(data["annotations"]):
        where = f"{path}: annotations[{index}]"
        image_id = integer(require(annotation, "image_id", where), where, "image_id")
        where = f"{where} (image_id {image_id})"
        if integer(annotation.get("iscrowd", 0), where, "iscrowd"):
            continue
        if image_id not in sizes:
            raise DatasetError(f"{where}: image_id {image_id} is not in the file's 'images'; use the instances file "
                               "as published (its images and annotations belong together)")
        category = integer(require(annotation, "category_id", where), where, "category_id")
        if category not in categories:
            raise DatasetError(f"{where}: unknown category_id {category}; the file's 'categories' have ids "
                               f"{sorted(categories)}; use the instances file as published")
        bbox = require(annotation, "bbox", where)
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise DatasetError(f"{where}: bbox must be [x, y, width, height] in pixels, got {bbox!r}")
        x, y, w, h = (number(value, where, f"bbox[{i}]") for i, value in enumerate(bbox))
        if w < 0 or h < 0:
            raise DatasetError(f"{where}: bbox {bbox} has a negative width or height; it must be [x, y, width, "
                               "height] in pixels")
        width, height, image_where = sizes[image_id]
        hint = (f"bbox {bbox} is [x, y, width, height] in pixels of the {width:g} x {height:g} image of "
                f"{image_where}; correct the box or the image's size, or drop the annotation")
        regions.setdefault(image_id, []).append(
            box_region(x / width, y / height, (x + w) / width, (y + h) / height, categories[category], where, hint))
    return regions
