"""The visual block's layout as one frozen config (vlm/models/visual_block.py): checked whole, saved whole."""

import json
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_vlm, tiny_vlm_folders
from tiny_qformer import single_torch_thread  # noqa: F401 (autouse fixture)

from vlm.models.empty_cells import EmptyCellRule
from vlm.models.visual_block import VisualBlock
from vlm.models.vlm import VLM_CONFIG, VisionLanguageModel

RULE = EmptyCellRule(none_ids=(5,), vocab=(5, 6))


def test_parts_that_need_each_other_are_refused_alone() -> None:
    with pytest.raises(ValueError, match="train_vlm.grid.cell_labels: false"):
        VisualBlock(grid=0, cell_labels=True, spare_label="count")
    with pytest.raises(ValueError, match="spare_label"):
        VisualBlock(grid=2, cell_labels=True)
    with pytest.raises(ValueError, match="drop_empty_cells: false"):
        VisualBlock(grid=2, empty_cells=RULE)
    block = VisualBlock(grid=2, width=0.3, cell_labels=True, spare_label="count", empty_cells=RULE)
    assert VisualBlock.from_dict(json.loads(json.dumps(block.to_dict()))) == block


def test_the_model_saves_its_block_once_and_loads_old_configs(tmp_path: Path) -> None:
    model = tiny_vlm(tiny_vlm_folders(tmp_path))
    block = VisualBlock(grid=2, width=0.3, cell_labels=True, spare_label="count", empty_cells=RULE)
    model.set_visual_block(block)
    assert (model.qformer.config.spatial_grid, model.qformer.config.spatial_width) == (2, 0.3)
    model.save(tmp_path / "vlm")
    config = json.loads((tmp_path / "vlm" / VLM_CONFIG).read_text())
    assert config["visual_block"] == block.to_dict() and "cell_labels" not in config
    loaded = VisionLanguageModel.load(tmp_path / "vlm")
    assert loaded.visual == block and loaded.num_visual_tokens == model.num_visual_tokens
    # a model saved before the block existed: its parts at the top of the config, the grid in the Q-Former's
    legacy = {**config, "cell_labels": True, "empty_cells": RULE.to_dict()}
    del legacy["visual_block"]
    (tmp_path / "vlm" / VLM_CONFIG).write_text(json.dumps(legacy))
    assert VisionLanguageModel.load(tmp_path / "vlm").visual == block  # spare label: the one of then, "count"
    model.set_visual_block(VisualBlock())  # back to plain queries: labels and rule go with it
    assert not model.cell_labels and model.empty_cells is None and model.qformer.config.spatial_grid == 0
    with torch.no_grad():
        assert model.visual_tokens(torch.randn(1, 17, model.qformer.config.image_hidden_size)).shape[1] == \
            model.qformer.config.num_queries
