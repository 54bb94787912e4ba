"""Imported datasets, chosen by `data.source`: which images each split holds, with which text.

- coco: the images of each split's COCO captions files (vlm.data.coco).
- vqav2: the images of each split's VQAv2 questions files (vlm.data.vqav2); no captions.
- coco+vqav2: the COCO caption split decides which images a split holds; the questions of the split's VQAv2
  files join them by COCO id, so an image's captions and questions share one row. Questions about images that
  are not in the split's caption files are left out (counted in the log). With Karpathy's split, list the
  val2014 VQAv2 files for val and test, and both train2014 and val2014 for train (restval is val2014 images).
- jsonl: each split's manifests, concatenated (vlm.data.jsonl_manifest); a line may give its objects' boxes.

With coco, coco+vqav2 and vqav2, the objects of the split's COCO instances files (`data.coco.instances`, optional)
join the split's images by COCO id as their `regions`; how many images of each file are in the split is logged
(none: the file is listed for the wrong split, or the captions are a subset).
- llava: each split's LLaVA conversation files (vlm.data.llava); an image's records join one row.
- hf: each split's Hugging Face `datasets` folders or Parquet files, columns mapped by params (vlm.data.hf_datasets).

Annotations are read whole (text only); images are read one at a time by `vlm.data.entry.RecordStream`.
An image id may appear only once per split, and no image of `train` may appear in `val` or `test`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from vlm.artifacts import SPLITS
from vlm.config import DataConfig, SplitFiles
from vlm.data.checks import SplitSummary, summarize
from vlm.data.coco import ALL_SPLITS, read_captions, read_instances
from vlm.data.dataset_io import DatasetError
from vlm.data.entry import Entry, Question, Region
from vlm.data.hf_datasets import read_hf
from vlm.data.image_files import ImageFolder
from vlm.data.jsonl_manifest import read_manifest
from vlm.data.llava import read_llava
from vlm.data.vqav2 import read_questions, vqa_entries


def import_entries(config: DataConfig) -> dict[str, list[Entry]]:
    """{split: its entries}, capped at `config.max_images`, for every split in SPLITS."""
    # Several splits may list one file (Karpathy's serves all three; val2014 questions may serve train, val and
    # test): each is read once per import.
    read_coco, read_vqa = functools.cache(read_captions), functools.cache(read_questions)
    read_objects = functools.cache(read_instances)
    if config.source == "jsonl":
        splits = {split: [e for path in _paths(config.jsonl, split) for e in read_manifest(path)] for split in SPLITS}
    elif config.source == "llava":
        folder = ImageFolder(Path(config.llava.images))
        splits = {split: read_llava(_paths(config.llava, split), folder, split) for split in SPLITS}
    elif config.source == "hf":
        splits = {split: read_hf(_paths(config.hf, split), split, config.hf) for split in SPLITS}
    elif config.source == "coco":
        splits = _coco(config, read_coco)
    elif config.source == "vqav2":
        folder = ImageFolder(Path(config.vqav2.images))
        splits = {split: [entry for path, questions in _vqa(config, split, read_vqa)
                          for entry in vqa_entries(path, questions, folder)]
                  for split in SPLITS}
    elif config.source == "coco+vqav2":
        splits = {split: _with_questions(entries, _vqa(config, split, read_vqa), split)
                  for split, entries in _coco(config, read_coco).items()}
    else:
        raise ValueError(f"data.source {config.source!r} is not an import")
    if config.source != "jsonl":
        splits = {split: _with_regions(entries, _paths(config.coco.instances, split), read_objects, split)
                  for split, entries in splits.items()}
    for split, entries in splits.items():
        splits[split] = _with_text(entries, split)
        if not splits[split]:
            key = _SPLIT_KEYS[config.source]
            raise DatasetError(f"the import has no {split} images: the files of param {key}.{split} hold none")
    _check_ids(splits)
    return {split: entries[:cap] if (cap := getattr(config.max_images, split)) else entries
            for split, entries in splits.items()}


# The param whose files decide which images a split holds, by source.
_SPLIT_KEYS = {"jsonl": "data.jsonl", "coco": "data.coco.captions", "coco+vqav2": "data.coco.captions",
               "vqav2": "data.vqav2.questions", "llava": "data.llava", "hf": "data.hf"}


def _paths(files: SplitFiles, split: str) -> list[Path]:
    return [Path(path) for path in getattr(files, split)]


def _coco(config: DataConfig, read_coco: Callable[..., dict[str | None, list[Entry]]]) -> dict[str, list[Entry]]:
    folder = ImageFolder(Path(config.coco.images))
    splits: dict[str, list[Entry]] = {split: [] for split in SPLITS}
    for split in SPLITS:
        for path in _paths(config.coco.captions, split):
            by_split = read_coco(path, folder)
            splits[split] += by_split[ALL_SPLITS] if ALL_SPLITS in by_split else by_split[split]
    return splits


def _vqa(config: DataConfig, split: str, read_vqa: Callable[[Path, Path], dict[int, list[Question]]]
         ) -> list[tuple[Path, dict[int, list[Question]]]]:
    files = zip(_paths(config.vqav2.questions, split), _paths(config.vqav2.annotations, split))
    return [(questions, read_vqa(questions, annotations)) for questions, annotations in files]


def _with_questions(entries: list[Entry], vqa: list[tuple[Path, dict[int, list[Question]]]], split: str
                    ) -> list[Entry]:
    """New caption entries with the questions about their images added (the cached originals stay as read)."""
    by_image: dict[int, list[Question]] = {}
    for _path, questions in vqa:
        for image_id, image_questions in questions.items():
            by_image.setdefault(image_id, []).extend(image_questions)
    entries = [replace(entry, questions=entry.questions + by_image.pop(entry.coco_id, [])) for entry in entries]
    if by_image:
        print(f"data {split}: {len(by_image)} VQAv2 images are not in this split's caption files; their "
              f"{sum(map(len, by_image.values()))} questions are left out")
    return entries


def _with_regions(entries: list[Entry], paths: list[Path], read_objects: Callable[[Path], dict[int, list[Region]]],
                  split: str) -> list[Entry]:
    """New entries with the objects of `paths` (COCO instances files) about their images added, by COCO id."""
    if not paths:
        return entries
    ids = {entry.coco_id for entry in entries}
    by_image: dict[int, list[Region]] = {}
    for path in paths:
        objects = read_objects(path)
        found = ids & objects.keys()
        print(f"data {split}: {len(found)} of the {len(objects)} images with objects in {path} are in this split"
              + ("" if found else f"; is the file listed for the right split (param data.coco.instances.{split})?"))
        for image_id in found:
            by_image.setdefault(image_id, []).extend(objects[image_id])
    return [replace(entry, regions=entry.regions + by_image[entry.coco_id]) if entry.coco_id in by_image else entry
            for entry in entries]


def _with_text(entries: list[Entry], split: str) -> list[Entry]:
    """Entries with at least one caption, question or conversation: an image without text teaches nothing."""
    kept = [entry for entry in entries if entry.has_text]
    if len(kept) < len(entries):
        print(f"data {split}: left out {len(entries) - len(kept)} images without captions, questions or "
              "conversations")
    return kept


def _check_ids(splits: dict[str, list[Entry]]) -> None:
    """Each id once per split, and none of train's in val or test (that would score the model on training data)."""
    train: dict[str, Entry] = {}
    for split, entries in splits.items():
        seen: dict[str, Entry] = {}
        for entry in entries:
            if entry.image_id in seen:
                raise DatasetError(f"{entry.origin}: image {entry.image_id!r} is already in split {split} (from "
                                   f"{seen[entry.image_id].origin}); is a file listed twice?")
            seen[entry.image_id] = entry
            if split != "train" and entry.image_id in train:
                raise DatasetError(f"{entry.origin}: image {entry.image_id!r} of split {split} is also in train "
                                   f"(from {train[entry.image_id].origin}); splits must not share images")
        if split == "train":
            train = seen


def planned_summaries(config: DataConfig) -> dict[str, SplitSummary]:
    """What the `data` stage will write, from the params and the annotations alone (no image is read): for
    `vlm check` before the first `dvc repro`. The synthetic scenes give every image all three kinds of text."""
    if config.source == "synthetic":
        sizes = {"train": config.train_images, "val": config.val_images, "test": config.test_images}
        return {split: SplitSummary(n, n, n, n) for split, n in sizes.items()}
    return {split: summarize({"captions": e.captions, "questions": e.questions, "regions": e.regions,
                              "conversations": e.conversations} for e in entries)
            for split, entries in import_entries(config).items()}
