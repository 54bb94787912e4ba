"""Empty cells left out (vlm/models/empty_cells.py): which cells the rule finds empty, and what the LLM then reads."""

from pathlib import Path

import pytest
import torch
from tiny_models import TINY_VLM_QUERIES, image_embeds, tiny_vlm, tiny_vlm_folders
from tiny_qformer import single_torch_thread  # noqa: F401 (autouse fixture)
from test_vlm import greedy_without_cache

from vlm.models.cell_labels import labelled_slots
from vlm.models.empty_cells import EmptyCellRule
from vlm.models.visual_block import VisualBlock
from vlm.models.vlm import VisionLanguageModel

NONE, RED, CIRCLE, OTHER = 0, 1, 2, 3  # token ids of a 4-word embedding table (one-hot rows)


def slots_naming(words: list[int]) -> torch.Tensor:
    """[1, Q, 4] queries, each pointing at one word of the one-hot table."""
    return torch.eye(4)[words][None] * 5.0


def test_a_cell_is_empty_only_when_all_of_its_slots_name_none() -> None:
    rule = EmptyCellRule(none_ids=(NONE,), vocab=(NONE, RED, CIRCLE))
    query_cell = torch.tensor([0, 0, 1, 1, 2, 2, -1])  # 3 cells of 2 slots, then a spare query
    words = [NONE, NONE, NONE, RED, RED, CIRCLE, NONE]
    empty = rule.empty(slots_naming(words), torch.eye(4), query_cell, num_cells=4)
    # cell 0: both none; cell 1: one slot names red (an object might be there); cell 2: an object; cell 3: no slots
    assert empty.tolist() == [[True, False, False, False]]
    # a word outside the alignment's vocabulary is never the slot's word: the nearest in the vocabulary is
    assert rule.empty(slots_naming([OTHER, OTHER, NONE, NONE, RED, RED, RED]) + torch.eye(4)[NONE],
                      torch.eye(4), query_cell, 4).tolist() == [[True, True, False, False]]


def test_the_rule_round_trips_and_needs_none_in_its_vocabulary() -> None:
    rule = EmptyCellRule(none_ids=(NONE,), vocab=(NONE, RED))
    assert EmptyCellRule.from_dict(rule.to_dict()) == rule
    with pytest.raises(ValueError, match="not all in the slot vocabulary"):
        EmptyCellRule(none_ids=(NONE,), vocab=(RED, CIRCLE))


def labelled_model(tmp_path: Path) -> VisionLanguageModel:
    """The tiny VLM on a 2 x 2 grid (a query per cell), with a rule whose 'none' is one of two words: random
    queries then name it about half the time, so images lose different cells."""
    model = tiny_vlm(tiny_vlm_folders(tmp_path), perturb_seed=1)
    model.set_visual_block(VisualBlock(grid=2, cell_labels=True, spare_label="count",
                                       empty_cells=EmptyCellRule(none_ids=(5,), vocab=(5, 6))))
    return model


def test_the_llm_reads_only_the_cells_found_empty_not(tmp_path: Path) -> None:
    model = labelled_model(tmp_path)
    images = image_embeds(6, seed=2)
    rows = [[model.prompt.example("Describe the image.", "a red circle")]] * len(images)
    layout = labelled_slots(model.tokenizer, TINY_VLM_QUERIES, 2, "count")
    with torch.no_grad():
        full = model.visual_tokens(images)
        queries = model.query_tokens(images)
        empty = model.cells_found_empty(queries)
        embeds, packed = model.build_inputs(images, rows, left_pad=False)
        loss = model(images, rows)
    kept_cells = (~empty).sum(1)
    assert int(kept_cells.min()) < int(kept_cells.max()), "the seed should give blocks of different lengths"
    tokens_per_cell = len(layout) // 4  # one label word and one query per cell here
    assert packed.is_visual.sum(1).tolist() == (kept_cells * tokens_per_cell).tolist()
    for row in range(len(images)):
        kept = [p for p in range(len(layout)) if not empty[row, p // tokens_per_cell]]
        assert torch.equal(embeds[row][packed.is_visual[row]], full[row, kept])  # in order, labels with their slots
    model.save(tmp_path / "vlm")
    loaded = VisionLanguageModel.load(tmp_path / "vlm")
    assert loaded.empty_cells == model.empty_cells
    with torch.no_grad():
        assert torch.equal(loaded(images, rows), loss)


def test_generation_with_blocks_of_different_lengths_answers_each_image_as_if_alone(tmp_path: Path) -> None:
    model = labelled_model(tmp_path)
    images = image_embeds(4, seed=2)
    instructions = ["Describe the image.", "how many objects are there?", "what color is the star?"]
    index = [0, 1, 3]
    batched = model.generate(images, instructions, max_new_tokens=6, image_index=index)
    alone = [model.generate(images[i:i + 1], [text], max_new_tokens=6)[0] for i, text in zip(index, instructions)]
    assert batched == alone
    assert batched[1] == greedy_without_cache(model, images[1:2], instructions[1], steps=6)
    assert any(batched)
