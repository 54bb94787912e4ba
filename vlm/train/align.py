"""Query alignment, between stage 1 and stage 2: make the visual tokens look like words before the LLM reads them.

Stage 1 leaves the Q-Former's queries nearly identical to one another (docs/experiments/qformer-frozen-in-stage2.md),
so the LLM receives one vector repeated,
and stage 2 is far too short on a CPU to undo that through the LLM. Here the Q-Former and the new projector
train, with no LLM pass at all, so that visual token k, read through the LLM's input embedding matrix E, is the
k-th token of its target: with `align.target: caption` (BLIP-2's plain queries, any data with captions) one of
the image's reference captions (`align.caption`), with `align.target: answers` (data without captions) the first
answers of its questions, joined, or with `align.target: grid` (the opt-in recipe for data with
regions, `train_vlm.grid`) the phrase of the object in the query's grid cell ("small red circle", the grid's
`empty_phrase` for an empty cell; vlm/models/spatial_prior.py):

    loss = cross-entropy(v_k @ E_vocab^T, caption token k)  +  |v_k - E[caption token k]|^2 / |E[caption token k]|^2

The cross-entropy makes each slot name its word against the others (over the vocabulary of the training
captions, which is the part of E that can be a target); the relative distance puts the token where the LLM's
own embedding of that word lies, in scale too. Slots beyond the caption's length are left free. Each step costs
a Q-Former forward/backward over the queries only, so a few hundred steps cost minutes on a CPU.

The pretrained Q-Former trains at its own, lower rate (`align.qformer_lr`): at the new projector's rate it never
gets past the slot prior (the most frequent words; docs/experiments/alignment-rate.md). It trains without its dropout
(`align.dropout`): a few hundred steps underfit rather than overfit.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from vlm import distributed
from vlm.config import GridConfig, VLMTrainConfig
from vlm.data.dataset_io import captions_or_replies, image_regions, read_split
from vlm.data.embeddings import Embeddings, available, gather
from vlm.models.empty_cells import EmptyCellRule
from vlm.models.prompt import IGNORE_INDEX
from vlm.models.grid_targets import grid_targets, phrase_ids
from vlm.models.visual_block import VisualBlock
from vlm.models.vlm import VisionLanguageModel
from vlm.train.checkpoint import Checkpointer
from vlm.train.loop import train


def caption_targets(tokenizer, captions: dict[str, str], num_slots: int) -> dict[str, list[int]]:
    """image id -> the caption's first `num_slots` token ids, padded with IGNORE_INDEX (a free slot)."""
    targets = {}
    for image_id, caption in captions.items():
        ids = tokenizer(caption, add_special_tokens=False)["input_ids"][:num_slots]
        targets[image_id] = ids + [IGNORE_INDEX] * (num_slots - len(ids))
    return targets


def alignment_losses(visual: torch.Tensor, targets: torch.Tensor, embedding_matrix: torch.Tensor,
                     vocab: torch.Tensor) -> dict[str, torch.Tensor]:
    """visual [B, Q, D] tokens, targets [B, Q] token ids (IGNORE_INDEX = free slot), embedding_matrix [V, D] the
    LLM's input embeddings, vocab [K] the token ids that can be targets -> {"loss", "ce", "distance", "accuracy"}."""
    supervised = targets != IGNORE_INDEX
    if not supervised.any():
        raise ValueError("alignment: no caption token to align in this batch (are the captions empty?)")
    position = torch.full((embedding_matrix.shape[0],), IGNORE_INDEX, dtype=torch.long, device=targets.device)
    position[vocab] = torch.arange(len(vocab), device=targets.device)
    ids = targets.clamp(min=0)
    local_targets = torch.where(supervised, position[ids], IGNORE_INDEX)
    if (local_targets[supervised] < 0).any():
        raise ValueError("alignment: a target token is missing from the vocabulary")
    vocab_embeddings = embedding_matrix[vocab]  # [K, D]
    logits = visual @ vocab_embeddings.T  # [B, Q, K]
    ce = F.cross_entropy(logits.flatten(0, 1), local_targets.flatten(), ignore_index=IGNORE_INDEX)
    wanted = embedding_matrix[ids]  # [B, Q, D]
    distance = ((visual - wanted).pow(2).sum(-1) / wanted.pow(2).sum(-1).clamp(min=1e-12))[supervised].mean()
    accuracy = (logits.argmax(-1) == local_targets)[supervised].float().mean()
    return {"loss": ce + distance, "ce": ce, "distance": distance, "accuracy": accuracy.detach()}


def reference_answers(dataset_path: Path) -> dict[str, str]:
    """image id -> the first answers of its questions, in order, joined by spaces ("moon brown gradient one yes"): a
    description of the image made of what its questions ask about, for data without captions; images without
    questions are left out."""
    rows = read_split(dataset_path, columns=["image_id", "answers"]).to_pylist()
    return {row["image_id"]: " ".join(answers[0] for answers in row["answers"]) for row in rows if row["answers"]}


def reference_captions(dataset_path: Path, index: int = 0) -> dict[str, str]:
    """image id -> its reference caption number `index` (its last if it has fewer; for an image without captions,
    the first reply of one of its conversations: `vlm.data.dataset_io.captions_or_replies`); images without
    either, e.g. VQA-only imports, are left out."""
    image_ids, texts = captions_or_replies(dataset_path)
    return {image_id: captions[min(index, len(captions) - 1)]
            for image_id, captions in zip(image_ids, texts) if captions}


def _batches(embeddings: Embeddings, targets: dict[str, list[int]], batch_size: int, seed: int
             ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless shuffled (image embeddings, caption targets) batches."""
    rng = random.Random(seed)
    image_ids = sorted(targets)
    while True:
        rng.shuffle(image_ids)
        for start in range(0, len(image_ids) - batch_size + 1, batch_size):
            chunk = image_ids[start:start + batch_size]
            yield gather(embeddings, chunk).float(), torch.tensor([targets[i] for i in chunk])


def grid_block(grid: GridConfig) -> VisualBlock:
    """The visual block the `train_vlm.grid` params ask for (saved with the model); its empty-cell rule comes
    after the alignment, from what the queries learnt to name."""
    labels = grid.cell_labels and grid.size > 0
    return VisualBlock(grid.size, grid.width, labels, grid.spare_label if labels else "")


def align_queries(model: VisionLanguageModel, embeddings: Embeddings, dataset_path: Path,
                  config: VLMTrainConfig, log_dir: Path | None, checkpoint_dir: Path | None = None,
                  fingerprint: dict | None = None) -> dict[str, float]:
    """Train the projector (at `align.lr`) and the Q-Former's image path (at `align.qformer_lr`; 0 leaves it frozen)
    for `config.align.steps` steps (see the module doc);
    the rest of stage 2's config (seed, precision, logging, checkpoints) applies as well.
    Returns the final (smoothed) losses and slot accuracy, prefixed `align_`."""
    align, grid = config.align, config.grid
    loop_config = replace(config, lr=align.lr, batch_size=align.batch_size, warmup_steps=align.warmup_steps)
    model.set_visual_block(grid_block(grid))
    empty_ids = phrase_ids(model.tokenizer, grid.empty_phrase)
    if align.target == "grid":
        targets = grid_targets(model.tokenizer, image_regions(dataset_path), model.qformer.config.num_queries,
                               model.qformer.config.spatial_grid, empty_ids)
        targets = {i: targets[i] for i in available(embeddings, targets)}
        if not targets:
            raise ValueError(f"train_vlm.align.target 'grid': no training image of {dataset_path} has both regions "
                             "and an embedding; use train_vlm.align.target: caption with train_vlm.grid.size: 0 "
                             "(`vlm recipe own-data`), or give the images regions (data.coco.instances, a JSONL "
                             "manifest's `regions`)")
    else:
        texts = (reference_captions(dataset_path, align.caption) if align.target == "caption"
                 else reference_answers(dataset_path))
        texts = {i: texts[i] for i in available(embeddings, texts)}
        if not texts:
            raise ValueError(f"train_vlm.align.target {align.target!r}: no training image of {dataset_path} has "
                             f"both {'a caption' if align.target == 'caption' else 'questions'} and an embedding; "
                             "`vlm check` says what the data holds")
        targets = caption_targets(model.tokenizer, texts, model.qformer.config.num_queries)
    device = distributed.device()
    model.to(device).train()  # first: the embedding matrix below must come from the model on its device
    vocab = torch.tensor(sorted({t for ids in targets.values() for t in ids if t != IGNORE_INDEX}), device=device)
    embedding_matrix = model.llm.get_input_embeddings().weight.detach().float()  # once, not per step
    batch_size = min(align.batch_size, len(targets))
    local = distributed.local_slice(batch_size)

    train_qformer = align.qformer_lr > 0
    if not (train_qformer and align.dropout):
        model.qformer.eval()  # no dropout (eval mode changes nothing else in it: LayerNorm only); gradients still flow

    def step_losses(batch):
        images, slot_targets = batch
        # `model.query_tokens` in two parts, so that a frozen Q-Former runs without autograd: no backward through
        # it, and no gradients left on it that no optimizer clears
        with torch.set_grad_enabled(train_qformer):
            queries = model.qformer.encode_image(images[local].to(device))
        visual = model.projector(queries)
        return alignment_losses(visual.float(), slot_targets[local].to(device), embedding_matrix, vocab)

    groups = [{"params": list(model.projector.parameters()), "lr": align.lr}]
    if train_qformer:
        groups.append({"params": [p for p in model.qformer.parameters() if p.requires_grad], "lr": align.qformer_lr})
    checkpointer = None
    if checkpoint_dir is not None:
        run = {"stage": "train_vlm.align", "train": asdict(loop_config), **(fingerprint or {})}
        checkpointer = Checkpointer(checkpoint_dir, config.checkpoint_every, model, run)
    batches = _batches(embeddings, targets, batch_size, config.seed)
    final = train(groups, step_losses, batches, align.steps, loop_config, log_dir, description="align",
                  checkpointer=checkpointer)
    model.eval()
    learnt_empty = set(empty_ids) <= set(vocab.tolist())  # False when every training image fills every cell
    if grid.drop_empty_cells and align.target == "grid" and model.cell_labels and learnt_empty:
        # from here on, the cells whose slots all name the empty phrase are left out of the LLM's prompt
        rule = EmptyCellRule(tuple(empty_ids), tuple(vocab.tolist()))
        model.set_visual_block(replace(model.visual, empty_cells=rule))
    return {f"align_{name}": round(value, 4) for name, value in final.items()}
