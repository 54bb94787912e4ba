"""DVC stage `train_vlm`: Q-Former + MLP projector + LoRA on the frozen LLM, on captions and VQA together."""

from dataclasses import asdict
from pathlib import Path

import torch

from vlm import distributed
from vlm.artifacts import (
    BASE_MODELS_DIR,
    CHECKPOINTS_DIR,
    DATASET_DIR,
    EMBEDDINGS_DIR,
    METRICS_DIR,
    QFORMER_DIR,
    VLM_DIR,
    write_json,
)
from vlm.config import load_params
from vlm.weights.wheels import sha256_of
from vlm.data.embeddings import expected_metadata, load_embeddings
from vlm.models.vlm import VisionLanguageModel
from vlm.precision import effective_precision
from vlm.stage_main import run_stage
from vlm.train.align import align_queries
from vlm.train.stage2 import train_vlm


def main() -> None:
    distributed.init()  # under torchrun (VLM_NPROC > 1): join the process group; else a no-op
    params = load_params()
    torch.manual_seed(params.train_vlm.seed)  # the new projector and LoRA start identical on every rank
    model = VisionLanguageModel.create(QFORMER_DIR, BASE_MODELS_DIR / "llm", params.projector.hidden_dim,
                                       params.lora, params.llm.system_prompt)
    embeddings = load_embeddings(EMBEDDINGS_DIR / "train", expect=expected_metadata(params.backbone))
    fingerprint = {"projector": asdict(params.projector), "lora": asdict(params.lora),
                   "qformer_sha256": sha256_of(QFORMER_DIR / "model.safetensors")}
    aligned, align_log = {}, Path("dvclive/align")
    if params.train_vlm.align.steps:
        aligned = align_queries(model, embeddings, DATASET_DIR / "train.parquet", params.train_vlm,
                                log_dir=align_log, checkpoint_dir=CHECKPOINTS_DIR / "align", fingerprint=fingerprint)
    elif distributed.is_main():
        (align_log / "plots" / "metrics").mkdir(parents=True, exist_ok=True)  # a declared plots output; no curve
    metrics = train_vlm(model, embeddings, DATASET_DIR / "train.parquet", params.llm, params.train_vlm,
                        log_dir=Path("dvclive/train_vlm"), checkpoint_dir=CHECKPOINTS_DIR / "train_vlm",
                        fingerprint=fingerprint)
    counts = model.trainable_parameter_counts()  # after training set up which parts train (see train_vlm)
    if not distributed.is_main():
        distributed.shutdown()
        return
    model.save(VLM_DIR)
    metrics.update(aligned, **counts, precision=effective_precision(params.train_vlm.precision))
    write_json(METRICS_DIR / "train_vlm.json", metrics)
    print("train_vlm:", metrics)
    distributed.shutdown()


if __name__ == "__main__":
    run_stage(main)
