"""DVC stage `data`: generate the dataset splits as Parquet (images as bytes beside their text)."""

from vlm.artifacts import DATASET_DIR
from vlm.config import load_params
from vlm.data.dataset_io import write_split
from vlm.data.synthetic import generate_splits


def main() -> None:
    params = load_params().data
    sizes = {"train": params.train_images, "val": params.val_images, "test": params.test_images}
    splits = generate_splits(params.seed, sizes, image_size=params.image_size, max_objects=params.max_objects)
    for split, records in splits.items():
        metadata = {"source": params.source, "seed": str(params.seed), "split": split,
                    "image_size": str(params.image_size)}
        rows = write_split(records, DATASET_DIR / f"{split}.parquet", metadata=metadata)
        print(f"data: {split}: {rows} images -> {DATASET_DIR / f'{split}.parquet'}")


if __name__ == "__main__":
    main()
