"""Queries that start out spatial (vlm/models/spatial_prior.py) and the grid alignment target that uses them."""

from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_models import tiny_vlm, tiny_vlm_folders
from tiny_qformer import IMAGE_WIDTH, tiny_qformer

from vlm.config import AlignConfig, GridConfig, ParamsError, VLMTrainConfig
from vlm.data.dataset_io import DATASET_SCHEMA, DatasetError, read_split, write_split
from vlm.data.embeddings import Embeddings, gather
from vlm.data.synthetic import generate_records
from vlm.models.prompt import IGNORE_INDEX
from vlm.models.qformer import QFormer, QFormerConfig
from vlm.models.spatial_prior import (LEGACY_WIDTH_IN_CELLS, cross_attention_bias, patch_grid, query_cells,
                                     region_cell)
from vlm.data.dataset_io import image_regions
from vlm.models.grid_targets import grid_targets, phrase_ids
from vlm.train.align import align_queries


def test_queries_are_dealt_out_cell_by_cell_and_the_rest_get_none() -> None:
    assert query_cells(32, 3) == [q // 3 for q in range(27)] + [None] * 5
    assert query_cells(4, 2) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="needs at least 9 queries"):
        query_cells(8, 3)
    with pytest.raises(ParamsError, match="train_vlm.grid.size"):
        VLMTrainConfig(align=AlignConfig(target="grid"), grid=GridConfig(size=0))


def test_bias_peaks_at_each_querys_own_cell() -> None:
    assert patch_grid(65) == (1, 8) and patch_grid(64) == (0, 8) and patch_grid(69) == (5, 8)
    bias = cross_attention_bias(4, 1 + 16, 2, 0.45)  # CLS + 4 x 4 patches, 2 x 2 cells of 2 x 2 patches
    for query, cell in enumerate(query_cells(4, 2)):
        patches = bias[query, 1:].view(4, 4)
        row, col = divmod(int(patches.argmax()), 4)
        assert (row // 2) * 2 + col // 2 == cell  # the highest logits lie inside the query's cell
        assert patches.max() > bias[query, 0]  # above the CLS token's
    assert region_cell(0.1, 0.9, 3) == 6 and region_cell(1.0, 0.0, 3) == 2


def test_a_narrower_width_keeps_a_query_closer_to_its_cell() -> None:
    """Query 0 sits on the top-left cell of a 2 x 2 grid over 8 x 8 patches: the patch in the opposite corner falls
    further below its cell's centre when the Gaussian is narrower; the peak stays where it was."""
    wide, narrow = cross_attention_bias(4, 1 + 64, 2, 0.45), cross_attention_bias(4, 1 + 64, 2, 0.25)
    far = 1 + 63  # the bottom-right patch
    assert narrow[0, far] < wide[0, far] < 0
    assert narrow[0, 1:].argmax() == wide[0, 1:].argmax()  # the same peak, inside the cell
    with pytest.raises(ValueError, match="train_vlm.grid.width"):
        cross_attention_bias(4, 1 + 64, 2, 0.0)
    with pytest.raises(ParamsError, match="train_vlm.grid.width"):
        GridConfig(width=0.0)


def test_the_width_is_saved_with_the_qformer_and_old_configs_keep_theirs(tmp_path: Path) -> None:
    qformer = tiny_qformer(tmp_path / "bert", num_queries=4)
    qformer.use_spatial_grid(2, 0.3)
    qformer.save(tmp_path / "saved")
    loaded = QFormer.load(tmp_path / "saved")
    assert (loaded.config.spatial_grid, loaded.config.spatial_width) == (2, 0.3)
    images = torch.randn(1, 17, IMAGE_WIDTH, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(loaded.eval().encode_image(images), qformer.encode_image(images))
    # a Q-Former saved before the width was a param was trained with the old width, and loads with it
    legacy = qformer.config.to_dict()
    del legacy["spatial_width"]
    assert QFormerConfig.from_dict(legacy).spatial_width == LEGACY_WIDTH_IN_CELLS == 0.45


def test_a_spatial_query_reads_its_own_cell(tmp_path: Path) -> None:
    """Changing the patches of cell 0 moves cell 0's query far more than the query of the opposite cell; without
    the prior both move alike."""
    images = torch.randn(1, 17, IMAGE_WIDTH, generator=torch.Generator().manual_seed(0))
    changed = images.clone()
    changed[:, 1:].view(1, 4, 4, IMAGE_WIDTH)[:, :2, :2] += 3.0  # the 2 x 2 patches of the top-left cell
    shift = {}
    for grid in (0, 2):
        qformer = tiny_qformer(tmp_path / f"g{grid}", num_queries=4, spatial_grid=grid)
        with torch.no_grad():
            moved = (qformer.encode_image(changed) - qformer.encode_image(images)).norm(dim=-1)[0]
        shift[grid] = float(moved[0] / moved[3])  # query 0 sits on cell 0, query 3 on the opposite cell
    assert shift[2] > 2.0 and shift[2] > 2 * shift[0], shift


def test_grid_targets_name_each_cells_object_and_none_elsewhere() -> None:
    class Words:  # a word-level tokenizer: one id per word
        vocab = {"none": 0, "small": 1, "red": 2, "circle": 3, "large": 4, "blue": 5, "square": 6, "2": 7}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [self.vocab[w] for w in text.split()]}

    regions = {"a": [{"x": 0.1, "y": 0.1, "w": 0.1, "h": 0.1, "phrase": "small red circle"},
                     {"x": 0.9, "y": 0.9, "w": 0.2, "h": 0.2, "phrase": "large blue square"}]}
    slots = grid_targets(Words(), regions, num_slots=14, grid=2, empty_ids=[0])["a"]  # 3 per cell, 2 left over: the count
    assert slots == [1, 2, 3, 0, 0, 0, 0, 0, 0, 4, 5, 6, 7, 7]
    with pytest.raises(ValueError, match="train_vlm.grid.size"):
        grid_targets(Words(), regions, num_slots=14, grid=0, empty_ids=[0])


def test_of_several_objects_in_one_cell_the_largest_box_names_it_and_the_later_of_equal_ones() -> None:
    class Words:
        vocab = {"none": 0, "dog": 1, "cup": 2, "cat": 3, "ball": 4, "2": 5, "3": 6}

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [self.vocab[w] for w in text.split()]}

    def box(x, y, side, phrase):
        return {"x": x, "y": y, "w": side, "h": side, "phrase": phrase}

    # top left: the dog (0.3 x 0.3) before a smaller cup, then equal cat and ball at the bottom right
    regions = {"a": [box(0.2, 0.2, 0.3, "dog"), box(0.1, 0.3, 0.05, "cup")],
               "b": [box(0.8, 0.8, 0.1, "cat"), box(0.7, 0.6, 0.1, "ball"), box(0.3, 0.2, 0.0, "cup")]}
    targets = grid_targets(Words(), regions, num_slots=4, grid=2, empty_ids=[0])  # one slot per cell, none left over
    assert targets["a"] == [1, 0, 0, 0]  # the larger box wins though it comes first
    assert targets["b"] == [2, 0, 0, 4]  # a point (w = h = 0) names an empty cell; of equal boxes the later wins


def test_regions_round_trip_and_bad_regions_name_the_record(tmp_path: Path) -> None:
    records = list(generate_records(seed=1, num_images=3, image_size=32, id_prefix="train"))
    write_split(records, tmp_path / "train.parquet")
    stored = read_split(tmp_path / "train.parquet", columns=["regions"]).column("regions").to_pylist()
    assert [len(r) for r in stored] == [len(r["regions"]) for r in records] and all(stored)
    assert image_regions(tmp_path / "train.parquet").keys() == {r["image_id"] for r in records}
    plain = [{k: v for k, v in r.items() if k != "regions"} for r in records]  # imports may leave it out
    write_split(plain, tmp_path / "plain.parquet")
    assert image_regions(tmp_path / "plain.parquet") == {}
    assert stored[0][0]["w"] == stored[0][0]["h"] > 0  # the synthetic objects' bounding squares
    bad = dict(records[0], regions=[{"x": 1.5, "y": 0.2, "w": 0.1, "h": 0.1, "phrase": "red circle"}])
    with pytest.raises(DatasetError, match=r"'train-000000'.*regions\[0\]"):
        write_split([bad], tmp_path / "bad.parquet")
    old_format = dict(records[0], regions=[{"x": 0.5, "y": 0.2, "phrase": "red circle"}])  # a centre, no size
    with pytest.raises(DatasetError, match=r"regions\[0\].*'w': 0\.\.1.*a point has w = h = 0"):
        write_split([old_format], tmp_path / "bad.parquet")
    outside = dict(records[0], regions=[{"x": 0.9, "y": 0.5, "w": 0.4, "h": 0.1, "phrase": "red circle"}])
    with pytest.raises(DatasetError, match=r"regions\[0\]' is a box that reaches outside the image"):
        write_split([outside], tmp_path / "bad.parquet")


def test_a_split_written_before_regions_were_boxes_is_refused_with_what_to_do(tmp_path: Path) -> None:
    old_schema = pa.schema([field if field.name != "regions" else pa.field(
        "regions", pa.list_(pa.struct([("x", pa.float64()), ("y", pa.float64()), ("phrase", pa.string())])))
        for field in DATASET_SCHEMA])
    record = next(iter(generate_records(seed=1, num_images=1, image_size=32, id_prefix="train")))
    record["regions"] = [{"x": r["x"], "y": r["y"], "phrase": r["phrase"]} for r in record["regions"]]
    pq.write_table(pa.Table.from_pylist([record], schema=old_schema), tmp_path / "train.parquet")
    with pytest.raises(DatasetError, match=r"train\.parquet does not have the dataset schema.*regions is .*"
                                           r"re-create it with the `data` stage \(`dvc repro data`\)"):
        image_regions(tmp_path / "train.parquet")


def test_grid_alignment_teaches_each_cells_queries_their_object(tmp_path: Path) -> None:
    records = list(generate_records(seed=3, num_images=4, image_size=32, id_prefix="train"))
    write_split(records, tmp_path / "train.parquet")
    ids = [r["image_id"] for r in records]
    embeddings = Embeddings(ids, torch.randn(4, 17, IMAGE_WIDTH, generator=torch.Generator().manual_seed(0)).half(), {})
    model = tiny_vlm(tiny_vlm_folders(tmp_path, num_queries=12))  # plain queries, as stage 1 leaves them
    targets = grid_targets(model.tokenizer, image_regions(tmp_path / "train.parquet"), 12, 2,
                           phrase_ids(model.tokenizer, "none"))
    target = torch.tensor([targets[i] for i in ids])

    def slot_accuracy() -> float:
        with torch.no_grad():
            predicted = (model.query_tokens(gather(embeddings, ids).float())
                         @ model.llm.get_input_embeddings().weight.T).argmax(-1)
        return float((predicted == target)[target != IGNORE_INDEX].float().mean())

    before = slot_accuracy()
    config = replace(VLMTrainConfig(precision="fp32", checkpoint_every=0, seed=0),
                     grid=GridConfig(size=2),
                     align=AlignConfig(steps=400, target="grid", batch_size=4, lr=3e-3,
                                       qformer_lr=3e-3, warmup_steps=5))
    align_queries(model, embeddings, tmp_path / "train.parquet", config, log_dir=None)
    assert model.qformer.config.spatial_grid == 2  # the queries keep their cells in the saved model
    assert slot_accuracy() > max(0.8, before + 0.5), (before, slot_accuracy())
    # the LLM will read only the cells the slots find occupied: those are the cells that hold an object
    truly_empty = torch.tensor([[targets[i][cell * 3] == model.empty_cells.none_ids[0] for cell in range(4)]
                                for i in ids])
    with torch.no_grad():
        found_empty = model.cells_found_empty(model.query_tokens(gather(embeddings, ids).float()))
    assert truly_empty.any() and (found_empty == truly_empty).float().mean() > 0.8
    plain = [{k: v for k, v in r.items() if k != "regions"} for r in records]
    write_split(plain, tmp_path / "plain.parquet")
    with pytest.raises(ValueError, match="target: caption"):
        align_queries(model, embeddings, tmp_path / "plain.parquet", config, log_dir=None)
