"""DVC stage `train_qformer`: BLIP-2 stage 1 on the cached embeddings (the backbone is never run here)."""

from pathlib import Path

from vlm import distributed
from vlm.artifacts import (
    BASE_MODELS_DIR,
    CHECKPOINTS_DIR,
    DATASET_DIR,
    EMBEDDINGS_DIR,
    METRICS_DIR,
    QFORMER_DIR,
    write_json,
)
from vlm.config import load_params
from vlm.data.embeddings import expected_metadata, gather, load_embeddings
from vlm.eval.retrieval import retrieval_metrics
from vlm.precision import effective_precision
from vlm.stage_main import run_stage
from vlm.train.stage1 import image_texts, train_qformer


def main() -> None:
    distributed.init()  # under torchrun (VLM_NPROC > 1): join the process group; else a no-op
    params = load_params()
    train_embeddings = load_embeddings(EMBEDDINGS_DIR / "train", expect=expected_metadata(params.backbone))
    qformer, metrics = train_qformer(BASE_MODELS_DIR / "bert", train_embeddings, DATASET_DIR / "train.parquet",
                                     params.qformer, params.train_qformer, log_dir=Path("dvclive/train_qformer"),
                                     checkpoint_dir=CHECKPOINTS_DIR / "train_qformer")
    if not distributed.is_main():  # every rank holds the same weights; one writes them and evaluates
        distributed.shutdown()
        return
    qformer.save(QFORMER_DIR)

    # Retrieval on the held-out test split: every text (of the kind stage 1 trained on) against every image that
    # has one; images without are no candidates, so they cannot count as misses. ITM re-ranking only when ITM
    # trained (untrained, its head is noise, and the re-ranking is most of the evaluation's cost).
    test_embeddings = load_embeddings(EMBEDDINGS_DIR / "test", expect=expected_metadata(params.backbone))
    image_ids, texts_of, _ = image_texts(DATASET_DIR / "test.parquet", params.train_qformer.texts)
    if image_ids:
        texts = [text for image in texts_of for text in image]
        text_image_index = [index for index, image in enumerate(texts_of) for _ in image]
        k_rerank = 16 if params.qformer.losses.itm > 0 else 0
        metrics.update(retrieval_metrics(qformer, gather(test_embeddings, image_ids).float(), texts,
                                         text_image_index, k_rerank=k_rerank))
        metrics["retrieval_images"] = len(image_ids)
    else:
        print(f"train_qformer: retrieval skipped: no test image has {params.train_qformer.texts}")
    metrics["precision"] = effective_precision(params.train_qformer.precision)
    write_json(METRICS_DIR / "train_qformer.json", metrics)
    print("train_qformer:", metrics)
    distributed.shutdown()


if __name__ == "__main__":
    run_stage(main)
