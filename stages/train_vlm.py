"""DVC stage `train_vlm`: Q-Former + MLP projector + LoRA on the frozen LLM, on captions and VQA together."""

from pathlib import Path

from vlm.artifacts import BASE_MODELS_DIR, DATASET_DIR, EMBEDDINGS_DIR, METRICS_DIR, QFORMER_DIR, VLM_DIR, write_json
from vlm.config import load_params
from vlm.data.embeddings import load_embeddings
from vlm.models.vlm import VisionLanguageModel
from vlm.precision import effective_precision
from vlm.train.stage2 import train_vlm


def main() -> None:
    params = load_params()
    model = VisionLanguageModel.create(QFORMER_DIR, BASE_MODELS_DIR / "llm", params.projector.hidden_dim,
                                       params.lora, params.llm.system_prompt)
    counts = model.trainable_parameter_counts()
    print("train_vlm: parameters", counts)
    embeddings = load_embeddings(EMBEDDINGS_DIR / "train.parquet")
    metrics = train_vlm(model, embeddings, DATASET_DIR / "train.parquet", params.llm, params.train_vlm,
                        log_dir=Path("dvclive/train_vlm"))
    model.save(VLM_DIR)
    metrics.update(counts, precision=effective_precision(params.train_vlm.precision))
    write_json(METRICS_DIR / "train_vlm.json", metrics)
    print("train_vlm:", metrics)


if __name__ == "__main__":
    main()
