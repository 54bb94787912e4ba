"""DVC stage `embed`: run the frozen backbone ONCE over every split; store all tokens (fp16) in Parquet."""

from vlm.artifacts import BASE_MODELS_DIR, DATASET_DIR, EMBEDDINGS_DIR, SPLITS
from vlm.config import load_params
from vlm.data.embed import embed_split
from vlm.models.backbone import VisionBackbone


def main() -> None:
    params = load_params().backbone
    backbone = VisionBackbone.from_folder(BASE_MODELS_DIR / "vision", image_size=params.image_size)
    for split in SPLITS:
        embed_split(backbone, DATASET_DIR / f"{split}.parquet", EMBEDDINGS_DIR / f"{split}.parquet",
                    batch_size=params.batch_size, precision=params.precision)


if __name__ == "__main__":
    main()
