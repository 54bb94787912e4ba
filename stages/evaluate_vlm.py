"""DVC stage `evaluate`: decode on the test split; CIDEr & co for captions, VQA accuracy for answers; the same
model blind (a blank image's tokens in place of every image's) as a baseline; on scenes with regions, how many of
the visual tokens name their grid cell's object; a gallery of the first test images.

Not named evaluate.py: run as a script (`python stages/<script>`, handy when debugging), a stage puts stages/ first
on sys.path, where a file named evaluate.py would shadow the Hugging Face `evaluate` library the metrics load with.
"""

import json

from vlm import distributed
from vlm.artifacts import (
    BLANK_EMBEDDING,
    DATASET_DIR,
    EMBEDDINGS_DIR,
    GALLERY_DIR,
    METRICS_DIR,
    PREDICTIONS_DIR,
    VLM_DIR,
    write_json,
)
from vlm.config import load_params
from vlm.data.dataset_io import image_regions
from vlm.data.embeddings import expected_metadata, load_embeddings, made_like
from vlm.data.tasks import load_tasks
from vlm.eval.gallery import gallery_ids, read_images, write_gallery
from vlm.eval.run import evaluate
from vlm.models.vlm import VisionLanguageModel
from vlm.stage_main import run_stage


def main() -> None:
    params = load_params()
    model = VisionLanguageModel.load(VLM_DIR).to(distributed.device())
    embeddings = load_embeddings(EMBEDDINGS_DIR / "test", expect=expected_metadata(params.backbone))
    blank = load_embeddings(BLANK_EMBEDDING, expect=made_like(embeddings))
    caption_tasks, vqa_tasks = load_tasks(DATASET_DIR / "test.parquet", params.llm)
    regions = image_regions(DATASET_DIR / "test.parquet")  # the objects' boxes, where the data has them
    metrics, records = evaluate(model, embeddings, caption_tasks, vqa_tasks, params.eval, blank, regions)
    PREDICTIONS_DIR.mkdir(exist_ok=True)
    tmp = PREDICTIONS_DIR / "test.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(PREDICTIONS_DIR / "test.jsonl")
    write_json(METRICS_DIR / "eval.json", metrics)
    images = read_images(DATASET_DIR / "test.parquet", gallery_ids(records, params.eval.gallery_images))
    write_gallery(records, images, GALLERY_DIR, params.llm.question_suffix)
    print("evaluate:", json.dumps(metrics, indent=2))


if __name__ == "__main__":
    run_stage(main)
