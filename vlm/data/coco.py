"""COCO captions: Karpathy's split file (`dataset_coco.json`) or the official `captions_*.json`, as Entries.

Karpathy's file holds every image once with its own split: `train`, `restval` (val2014 images that the
Karpathy split gives to training, so they join `train` here), `val` and `test`. The official files have no
split of their own: all of their images go to the split the params list them for.
Image ids are the COCO ids as strings, so VQAv2 questions about the same image join the same row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vlm.data.dataset_io import DatasetError
from vlm.data.entry import Entry, integer, read_json, require, text
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
