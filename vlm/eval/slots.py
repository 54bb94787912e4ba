"""Slot accuracy: how much of each test scene reaches the LLM intact, read back from the visual tokens as words.

After the grid alignment (vlm/train/align.py, `target: grid`) the slots of a grid cell name the object there
("small red circle"), " none" for an empty cell, and the spare slots the number of objects. A slot is read as the
word whose LLM embedding has the largest dot product with it, among the words the slots were aligned to name: how
the alignment scores a slot, and how `EmptyCellRule` decides that a cell is empty.

On data with regions (the synthetic scenes, imports with boxes) this scores every slot against the scene. Nearly
all wrong answers to non-spatial questions come from images with a misnamed slot (docs/experiments/grid-width.md), so
the VQA accuracy is also given for the two groups of images: `vqa_accuracy_slots_right` and
`vqa_accuracy_slot_misnamed`.
"""

from __future__ import annotations

import torch

from vlm.data.embeddings import Embeddings, gather
from vlm.eval.scoring import score_vqa
from vlm.models.empty_cells import slot_words
from vlm.models.prompt import IGNORE_INDEX
from vlm.models.vlm import VisionLanguageModel
from vlm.models.grid_targets import grid_targets


def reads_grid_slots(model: VisionLanguageModel) -> bool:
    """Whether the model's slots were aligned to name grid cells: a spatial grid, and the rule that knows which
    words the slots name (`drop_empty_cells`, which the grid alignment sets)."""
    return bool(model.qformer.config.spatial_grid) and model.empty_cells is not None


@torch.inference_mode()
def slots_right(model: VisionLanguageModel, embeddings: Embeddings, regions: dict[str, list[dict]],
                batch_size: int = 64) -> dict[str, torch.Tensor]:
    """image id -> [S] bool, for each of the image's S slots with a grid target (a phrase longer than its cell's
    slots leaves some free), True where the slot names it; for every image of `regions` (boxes: x, y, w, h,
    phrase)."""
    if not reads_grid_slots(model):
        raise ValueError("slot accuracy needs a model whose slots name grid cells (train_vlm.align.target: grid, "
                         "with train_vlm.grid.drop_empty_cells: true)")
    config = model.qformer.config
    targets = grid_targets(model.tokenizer, regions, config.num_queries, config.spatial_grid,
                           list(model.empty_cells.none_ids))
    vocab = torch.tensor(model.empty_cells.vocab)
    embedding_matrix = model.llm.get_input_embeddings().weight
    image_ids = sorted(regions)
    right = {}
    for start in range(0, len(image_ids), batch_size):
        chunk = image_ids[start:start + batch_size]
        queries = model.query_tokens(gather(embeddings, chunk).float())
        words = slot_words(queries, embedding_matrix, vocab.to(queries.device)).cpu()  # [B, Q]
        wanted = torch.tensor([targets[image_id] for image_id in chunk])
        right.update((image_id, hit[target != IGNORE_INDEX]) for image_id, hit, target
                     in zip(chunk, words == wanted, wanted))
    return right


def slot_metrics(right: dict[str, torch.Tensor], records: list[dict]) -> dict[str, float]:
    """`slot_accuracy` (slots that name their target, of those with one), `slot_images_all_right`, and the VQA
    accuracy of the questions about each group of images (the official scorer)."""
    if not right:
        return {}
    metrics = {"slot_accuracy": float(torch.cat(list(right.values())).float().mean()),
               "slot_images_all_right": sum(bool(hits.all()) for hits in right.values()) / len(right)}
    for name, wanted in (("slots_right", True), ("slot_misnamed", False)):
        group = [r for r in records if r["type"] != "caption" and r["image_id"] in right
                 and bool(right[r["image_id"]].all()) == wanted]
        if group:
            scored = score_vqa([r["prediction"] for r in group], [r["references"] for r in group])
            metrics[f"vqa_accuracy_{name}"] = float(scored["vqa_accuracy"])
    return metrics
