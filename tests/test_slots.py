"""Slot accuracy (vlm/eval/slots.py): the visual tokens read back as words and scored against the scene."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_VLM_QUERIES, image_embeds, tiny_vlm, tiny_vlm_folders
from tiny_qformer import single_torch_thread  # noqa: F401 (autouse fixture)

from vlm.data.embeddings import Embeddings
from vlm.eval.slots import reads_grid_slots, slot_metrics, slots_right
from vlm.models.empty_cells import EmptyCellRule
from vlm.models.grid_targets import grid_targets, phrase_ids
from vlm.models.prompt import IGNORE_INDEX
from vlm.models.visual_block import VisualBlock

# a 2 x 2 grid, one query per cell: the red circle's cell names " red", the others " none"
REGIONS = {"a": [{"x": 0.2, "y": 0.2, "w": 0.1, "h": 0.1, "phrase": "red circle"}],
           "b": [{"x": 0.8, "y": 0.8, "w": 0.1, "h": 0.1, "phrase": "blue square"}]}


def test_slots_that_name_the_scene_are_right_and_a_misnamed_one_is_not(tmp_path: Path, monkeypatch) -> None:
    model = tiny_vlm(tiny_vlm_folders(tmp_path))
    assert not reads_grid_slots(model)  # plain queries: nothing to read
    model.set_visual_block(VisualBlock(grid=2, cell_labels=True, spare_label="count"))
    none_ids = tuple(phrase_ids(model.tokenizer, "none"))
    targets = grid_targets(model.tokenizer, REGIONS, TINY_VLM_QUERIES, 2, list(none_ids))
    assert TINY_VLM_QUERIES == 4 and IGNORE_INDEX not in sum(targets.values(), [])
    vocab = sorted(set(sum(targets.values(), [])))
    assert len(vocab) == 3  # " none" (unknown to the tiny tokenizer, but one id all the same), " red", " blue"
    model.set_visual_block(replace(model.visual, empty_cells=EmptyCellRule(none_ids, tuple(vocab))))
    assert reads_grid_slots(model)
    embedding = model.llm.get_input_embeddings().weight
    with torch.no_grad():  # the vocabulary's words one-hot, so a slot names exactly the word it is set to
        embedding[vocab] = 5.0 * torch.eye(embedding.shape[1])[:len(vocab)]
    slots = {image_id: embedding[ids].clone() for image_id, ids in targets.items()}
    wrong_word = next(t for t in vocab if t != targets["b"][3])
    slots["b"][3] = embedding[wrong_word]  # image b's object cell names another word
    order = ["a", "b"]
    monkeypatch.setattr(model, "query_tokens", lambda images: torch.stack([slots[order[int(i)]] for i in images[:, 0, 0]]))
    embeddings = Embeddings(order, torch.arange(2.0)[:, None, None].expand(2, 5, 8).contiguous(), {})

    right = slots_right(model, embeddings, REGIONS, batch_size=1)
    assert right["a"].tolist() == [True] * 4 and right["b"].tolist() == [True, True, True, False]

    records = [{"image_id": "a", "type": "color", "prediction": "red", "references": ["red"]},
               {"image_id": "b", "type": "color", "prediction": "red", "references": ["blue"]},
               {"image_id": "b", "type": "caption", "prediction": "x", "references": ["y"]}]
    metrics = slot_metrics(right, records)
    assert metrics["slot_accuracy"] == pytest.approx(7 / 8)
    assert metrics["slot_images_all_right"] == 0.5
    assert metrics["vqa_accuracy_slots_right"] == 1.0 and metrics["vqa_accuracy_slot_misnamed"] == 0.0
