"""Stage 1: train the Q-Former on cached image embeddings with BLIP-2's ITC / ITM / ITG losses."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import torch

from vlm import distributed
from vlm.config import QFormerConfig, QFormerTrainConfig
from vlm.data.dataset_io import captions_or_replies, read_split
from vlm.data.embeddings import Embeddings, available, gather
from vlm.losses import stage1_losses
from vlm.models.qformer import QFormer
from vlm.train.checkpoint import Checkpointer
from vlm.train.loop import train


def image_texts(dataset_path: Path, texts: str = "captions") -> tuple[list[str], list[list[str]], int]:
    """(image ids, texts per image, images left out) of a split, read without the image bytes.

    `texts` "captions": each image's captions, or for an image without any the first reply of each of its
    conversations (`vlm.data.dataset_io.captions_or_replies`); "questions": each of its questions followed by its
    first answer ("what color is the heart? teal"), for data without captions. Images with no such text are left
    out and counted."""
    if texts == "captions":
        image_ids, per_image = captions_or_replies(dataset_path)
    elif texts == "questions":
        table = read_split(dataset_path, columns=["image_id", "questions", "answers"])
        image_ids = table.column("image_id").to_pylist()
        per_image = [[f"{question} {answers[0]}" for question, answers in zip(questions, answer_lists)]
                     for questions, answer_lists in zip(table.column("questions").to_pylist(),
                                                        table.column("answers").to_pylist())]
    else:
        raise ValueError(f"train_qformer.texts must be 'captions' or 'questions', got {texts!r}")
    kept = [(image_id, texts_of) for image_id, texts_of in zip(image_ids, per_image) if texts_of]
    return [image_id for image_id, _ in kept], [t for _, t in kept], len(image_ids) - len(kept)


def caption_batches(embeddings: Embeddings, image_ids: list[str], captions: list[list[str]], qformer: QFormer,
                    batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless (image embeds, input ids, attention mask, image index) batches, one random caption per image.

    All captions are tokenised once up front; an epoch is a fresh permutation of the images.
    """
    images = gather(embeddings, image_ids)
    flat = [c for caps in captions for c in caps]
    owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps])
    first = torch.tensor([0] + [len(c) for c in captions]).cumsum(0)[:-1]
    counts = torch.tensor([len(c) for c in captions])
    if (counts == 0).any():
        missing = image_ids[int((counts == 0).nonzero()[0])]
        raise ValueError(f"image {missing!r} has no caption (nor a conversation); stage 1 trains on image-caption "
                         "pairs")
    tokens = qformer.tokenizer(flat, padding="max_length", truncation=True, max_length=qformer.config.max_text_len,
                               return_tensors="pt")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(image_ids), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):  # full batches only: stable ITC
            rows = order[start:start + batch_size]
            pick = first[rows] + (torch.rand(len(rows), generator=generator) * counts[rows]).long()
            assert bool((owner[pick] == rows).all())
            ids, mask = tokens["input_ids"][pick], tokens["attention_mask"][pick]
            used = int(mask.sum(1).max())  # trim padding shared by the whole batch
            yield images[rows].float(), ids[:, :used], mask[:, :used], rows


def new_qformer(bert_dir: Path, config: QFormerConfig, image_hidden_size: int) -> QFormer:
    """A Q-Former built from `bert_dir` as the `qformer` params section describes it (untrained new parts)."""
    return QFormer.from_bert(bert_dir, num_queries=config.num_queries, cross_attention_freq=config.cross_attention_freq,
                             image_hidden_size=image_hidden_size, separate_query_ffn=config.separate_query_ffn,
                             embed_dim=config.embed_dim, max_text_len=config.max_text_len)


def train_qformer(bert_dir: Path, embeddings: Embeddings, dataset_path: Path, qformer_config: QFormerConfig,
                  train_config: QFormerTrainConfig, log_dir: Path | None, checkpoint_dir: Path | None = None
                  ) -> tuple[QFormer, dict[str, float]]:
    """Train a Q-Former from `bert_dir`. Under torchrun each rank takes its share of every global batch and ITC
    contrasts against the gathered global batch. With `checkpoint_dir`, a killed run resumes where it stopped."""
    torch.manual_seed(train_config.seed)  # the same initial weights on every rank
    qformer = new_qformer(bert_dir, qformer_config, image_hidden_size=embeddings.tokens.shape[-1])
    image_ids, captions, without_text = image_texts(dataset_path, train_config.texts)
    keep = set(available(embeddings, image_ids))  # images `embed` skipped as unreadable have no embedding
    image_ids, captions = [i for i in image_ids if i in keep], [c for i, c in zip(image_ids, captions) if i in keep]
    if not image_ids:
        raise ValueError(f"stage 1: no train image of {dataset_path} has {train_config.texts} (and an embedding); "
                         "set train_qformer.texts to what the data has (`vlm check` lists what it holds)")
    batch_size = min(train_config.batch_size, len(image_ids))
    steps = max(1, math.ceil(train_config.epochs * (len(image_ids) // batch_size)))
    batches = caption_batches(embeddings, image_ids, captions, qformer, batch_size, train_config.seed)
    weights = {"itc": qformer_config.losses.itc, "itm": qformer_config.losses.itm, "itg": qformer_config.losses.itg}
    generator = torch.Generator().manual_seed(train_config.seed + 1)  # ITM's hard-negative sampling
    local = distributed.local_slice(batch_size)
    device = distributed.device()
    qformer.to(device)

    def step_losses(batch):
        images, ids, mask, rows = (part[local].to(device) for part in batch)
        return stage1_losses(qformer, images, ids, mask, rows, weights, generator=generator,
                             gather_fn=distributed.all_gather_with_grad)

    # Dropout only with `dropout: true`: eval mode turns it off and changes nothing else (LayerNorm only).
    qformer.train(train_config.dropout)
    parameters = [p for p in qformer.parameters() if p.requires_grad]
    if train_config.new_lr is not None:  # the parts BERT lacks train at their own rate
        new = qformer.new_parameters()
        new_ids = {id(p) for p in new}
        parameters = [{"params": [p for p in parameters if id(p) not in new_ids], "lr": train_config.lr},
                      {"params": new, "lr": train_config.new_lr}]
    checkpointer = None
    if checkpoint_dir is not None:
        fingerprint = {"stage": "train_qformer", "qformer": asdict(qformer_config), "train": asdict(train_config),
                       "steps": steps, "images": len(image_ids)}
        checkpointer = Checkpointer(checkpoint_dir, train_config.checkpoint_every, qformer, fingerprint,
                                    generators={"itm": generator})
    final = train(parameters, step_losses, batches, steps, train_config, log_dir, description="train_qformer",
                  checkpointer=checkpointer)
    qformer.eval()
    return qformer, {"steps": steps, "images": len(image_ids), f"images_without_{train_config.texts}": without_text,
                     **{f"final_{k}": round(v, 4) for k, v in final.items()}}
