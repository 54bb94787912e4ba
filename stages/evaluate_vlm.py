"""DVC stage `evaluate`: decode on the test split; CIDEr & co for captions, VQA accuracy for answers.

Not named evaluate.py: `python stages/<script>` puts stages/ first on sys.path, where a file named evaluate.py
would shadow the Hugging Face `evaluate` library that the metrics are loaded with.
"""

import json

from vlm import distributed
from vlm.artifacts import DATASET_DIR, EMBEDDINGS_DIR, METRICS_DIR, PREDICTIONS_DIR, VLM_DIR, write_json
from vlm.config import load_params
from vlm.data.embeddings import expected_metadata, load_embeddings
from vlm.eval.run import evaluate
from vlm.models.vlm import VisionLanguageModel
from vlm.train.stage2 import load_tasks


def main() -> None:
    params = load_params()
    model = VisionLanguageModel.load(VLM_DIR).to(distributed.device())
    embeddings = load_embeddings(EMBEDDINGS_DIR / "test", expect=expected_metadata(params.backbone))
    caption_tasks, vqa_tasks = load_tasks(DATASET_DIR / "test.parquet", params.llm)
    metrics, records = evaluate(model, embeddings, caption_tasks, vqa_tasks, params.eval)
    PREDICTIONS_DIR.mkdir(exist_ok=True)
    tmp = PREDICTIONS_DIR / "test.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(PREDICTIONS_DIR / "test.jsonl")
    write_json(METRICS_DIR / "eval.json", metrics)
    print("evaluate:", json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
