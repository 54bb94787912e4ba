"""A few steps of a training stage on tiny data; run by test_distributed.py in 1 process or under torchrun.

    python tests/train_worker.py {qformer|vlm|qformer-gradients} WORK_DIR OUT_DIR

WORK_DIR holds what the test prepared once (dataset.parquet, bert/, qformer/, llm/), so every process and every
run starts from identical files. The per-step losses land in LOG_DIR (DVCLive), written by rank 0 only.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vlm import distributed
from vlm.config import LLMConfig, LoraConfig, QFormerConfig, QFormerLossWeights, QFormerTrainConfig, VLMTrainConfig
from vlm.data.embeddings import Embeddings
from vlm.losses import stage1_losses
from vlm.models.qformer import QFormer
from vlm.models.vlm import VisionLanguageModel
from vlm.train.stage1 import caption_batches, image_texts, train_qformer
from vlm.train.stage2 import train_vlm

IMAGE_TOKENS, IMAGE_WIDTH = 5, 12
STEPS, GLOBAL_BATCH = 4, 4
LORA = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))


def tiny_embeddings(dataset: Path) -> Embeddings:
    """Random but fixed image embeddings, one per image of the split (the same in every process)."""
    image_ids, _, _ = image_texts(dataset)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(len(image_ids), IMAGE_TOKENS, IMAGE_WIDTH, generator=generator).half()
    return Embeddings(image_ids, tokens, {})


def run_qformer(work: Path, log_dir: Path | None, checkpoint_dir: Path | None = None, checkpoint_every: int = 0,
                lr: float = 1e-3, new_lr: float | None = None, dropout: bool = False):
    dataset = work / "dataset.parquet"
    # ITC + ITG: ITM's hard negatives are drawn per rank, so it cannot match one process draw for draw.
    config = QFormerConfig(num_queries=4, cross_attention_freq=1, embed_dim=16, max_text_len=16,
                           losses=QFormerLossWeights(itc=1.0, itm=0.0, itg=1.0))
    train = QFormerTrainConfig(epochs=STEPS * GLOBAL_BATCH / len(image_texts(dataset)[0]), batch_size=GLOBAL_BATCH,
                               lr=lr, new_lr=new_lr, warmup_steps=1, precision="fp32", log_every=1,
                               checkpoint_every=checkpoint_every, dropout=dropout)
    return train_qformer(work / "bert", tiny_embeddings(dataset), dataset, config, train, log_dir, checkpoint_dir)


def run_vlm(work: Path, log_dir: Path | None, checkpoint_dir: Path | None = None, checkpoint_every: int = 0,
            qformer_lr: float = 1e-3, before_training=None):
    """`before_training(model)`, if given, runs on the fresh model (e.g. to hook into it)."""
    dataset = work / "dataset.parquet"
    torch.manual_seed(0)
    model = VisionLanguageModel.create(work / "qformer", work / "llm", projector_hidden=16, lora=LORA,
                                       system_prompt="Answer about the image.")
    if before_training is not None:
        before_training(model)
    train = VLMTrainConfig(epochs=STEPS * GLOBAL_BATCH / len(image_texts(dataset)[0]), batch_size=GLOBAL_BATCH,
                           lr=1e-3, projector_lr=1e-3, qformer_lr=qformer_lr, warmup_steps=1, precision="fp32",
                           log_every=1, checkpoint_every=checkpoint_every)
    metrics = train_vlm(model, tiny_embeddings(dataset), dataset, LLMConfig(), train, log_dir, checkpoint_dir)
    return model, metrics


def qformer_gradients(work: Path, out_dir: Path) -> None:
    """The stage-1 gradient of one global batch (ITC + ITG), averaged over ranks, saved by rank 0."""
    dataset = work / "dataset.parquet"
    qformer = QFormer.load(work / "qformer").train()
    image_ids, captions, _ = image_texts(dataset)
    batch = next(caption_batches(tiny_embeddings(dataset), image_ids, captions, qformer, GLOBAL_BATCH, seed=0))
    images, ids, mask, rows = (part[distributed.local_slice(GLOBAL_BATCH)] for part in batch)
    losses = stage1_losses(qformer, images, ids, mask, rows, {"itc": 1.0, "itg": 1.0},
                           gather_fn=distributed.all_gather_with_grad)
    losses["loss"].backward()
    parameters = [p for p in qformer.parameters() if p.requires_grad]
    distributed.average_gradients(parameters)
    if distributed.is_main():
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save({name: p.grad for name, p in qformer.named_parameters() if p.grad is not None},
                   out_dir / "gradients.pt")


def main() -> None:
    stage, work, out_dir = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    torch.set_num_threads(1)
    distributed.init()
    run = {"qformer": run_qformer, "vlm": run_vlm, "qformer-gradients": qformer_gradients}[stage]
    run(work, out_dir)
    distributed.shutdown()


if __name__ == "__main__":
    main()
