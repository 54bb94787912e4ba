"""Run the frozen backbone over a dataset split and stream its tokens into the embedding store."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from vlm.data.dataset_io import decode_image, iter_split, read_split
from vlm.data.embeddings import EmbeddingWriter
from vlm.models.backbone import VisionBackbone
from vlm.precision import autocast, effective_precision


def embed_split(backbone: VisionBackbone, dataset_path: Path, out_path: Path, batch_size: int,
                precision: str) -> int:
    """Embed every image of `dataset_path` into `out_path`; memory is bounded by one batch. Returns the count."""
    total = read_split(dataset_path, columns=["image_id"]).num_rows
    metadata = {**backbone.metadata(), "precision": effective_precision(precision)}
    with EmbeddingWriter(out_path, backbone.num_tokens, backbone.hidden_size, metadata) as writer:
        progress = tqdm(total=total, desc=f"embed {Path(dataset_path).stem}", unit="img")
        ids: list[str] = []
        images = []
        for row in iter_split(dataset_path, columns=["image_id", "image"], batch_size=batch_size):
            ids.append(row["image_id"])
            images.append(decode_image(row["image"], row["image_id"]))
            if len(ids) == batch_size:
                _embed_batch(backbone, writer, ids, images, precision)
                progress.update(len(ids))
                ids, images = [], []
        if ids:
            _embed_batch(backbone, writer, ids, images, precision)
            progress.update(len(ids))
        progress.close()
    return total


def _embed_batch(backbone: VisionBackbone, writer: EmbeddingWriter, ids: list[str], images: list,
                 precision: str) -> None:
    with torch.inference_mode(), autocast(precision):
        tokens = backbone(backbone.preprocess(images))
    writer.write(ids, tokens.float())
