"""DVC stage `embed`: run the frozen backbone ONCE over every split; store all tokens (fp16) as Parquet shards.
Also embeds one blank image (the backbone's mean color) for the blind baseline of `evaluate`.

Run through `python -m vlm.launch` (VLM_NPROC=N for N processes). A rerun keeps the shards that are complete and
still match (see vlm/embed.py), so an interrupted run resumes where it stopped.
"""

from vlm import distributed
from vlm.artifacts import (
    BASE_MODELS_DIR,
    BLANK_EMBEDDING,
    DATASET_DIR,
    EMBEDDINGS_DIR,
    METRICS_DIR,
    SPLITS,
    write_json,
)
from vlm.config import load_params
from vlm.embed import embed_blank, embed_split, remove_all_but
from vlm.models.backbone import VisionBackbone
from vlm.stage_main import run_stage


def main() -> None:
    distributed.init()
    try:
        params = load_params()
        backbone = VisionBackbone.from_folder(BASE_MODELS_DIR / "vision", image_size=params.backbone.image_size,
                                             layer=params.backbone.layer)
        backbone.to(distributed.device())
        counts = {}
        for split in SPLITS:
            summary = embed_split(backbone, DATASET_DIR / f"{split}.parquet", EMBEDDINGS_DIR / split,
                                  batch_size=params.backbone.batch_size, precision=params.backbone.precision,
                                  skip_bad_images=params.data.skip_bad_images)
            counts.update({f"{split}_images": summary.images, f"{split}_skipped": summary.skipped})
        if distributed.is_main():
            embed_blank(backbone, BLANK_EMBEDDING, params.backbone.precision)
            remove_all_but(EMBEDDINGS_DIR, set(SPLITS))  # e.g. the single-file {split}.parquet of older runs
            write_json(METRICS_DIR / "embed.json", counts)
            print("embed:", counts)
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    run_stage(main)
