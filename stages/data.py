"""DVC stage `data`: the dataset splits as Parquet (images as bytes beside their text), generated or imported.

`data.source` picks synthetic scenes or an import of COCO captions, VQAv2, both, JSONL manifests, LLaVA
conversations or Hugging Face datasets from data/raw (see vlm/data/imports.py). metrics/data.json counts images,
captions, questions, regions (object boxes), conversations, their turns and skipped images.
"""

from vlm.artifacts import DATASET_DIR, METRICS_DIR, write_json
from vlm.config import load_params
from vlm.data.dataset_io import count_split, write_split
from vlm.data.entry import RecordStream
from vlm.data.imports import import_entries
from vlm.data.synthetic import generate_splits
from vlm.stage_main import run_stage


def main() -> None:
    params = load_params().data
    counts = {}
    if params.source == "synthetic":
        sizes = {"train": params.train_images, "val": params.val_images, "test": params.test_images}
        splits = generate_splits(params.seed, sizes, image_size=params.image_size, max_objects=params.max_objects)
        for split, records in splits.items():
            metadata = {"source": params.source, "seed": str(params.seed), "split": split,
                        "image_size": str(params.image_size)}
            write_split(records, DATASET_DIR / f"{split}.parquet", metadata=metadata)
            counts[split] = 0
    else:
        for split, entries in import_entries(params).items():
            stream = RecordStream(entries, params.resize, params.skip_bad_images, description=f"data {split}")
            metadata = {"source": params.source, "split": split, "resize": str(params.resize)}
            write_split(stream, DATASET_DIR / f"{split}.parquet", metadata=metadata)
            counts[split] = stream.skipped
    summary = {}
    for split, skipped in counts.items():
        found = count_split(DATASET_DIR / f"{split}.parquet")
        summary.update({f"{split}_{key}": value for key, value in found.items()} | {f"{split}_skipped": skipped})
        print(f"data: {split}: {found['images']} images, {found['captions']} captions, {found['questions']} "
              f"questions, {found['regions']} regions, {found['conversations']} conversations ({found['turns']} "
              f"turns), {skipped} skipped -> {DATASET_DIR / f'{split}.parquet'}")
    write_json(METRICS_DIR / "data.json", summary)


if __name__ == "__main__":
    run_stage(main)
