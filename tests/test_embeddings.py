"""The Parquet embedding store, and embedding a dataset split with a (tiny) frozen backbone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny_models import VISION_IMAGE_SIZE, VISION_WIDTH, tiny_vision
from tiny_qformer import single_torch_thread  # noqa: F401 (autouse fixture)

from vlm.data.dataset_io import decode_image, write_split
from vlm.embed import embed_split
from vlm.data.embeddings import (
    EmbeddingStoreError,
    EmbeddingWriter,
    available,
    gather,
    load_embeddings,
    read_metadata,
    shard_name,
)
from vlm.data.synthetic import generate_records
from vlm.models.backbone import VisionBackbone
from vlm.weights.sources import materialise

TOKENS, HIDDEN = 5, 3
METADATA = {"backbone_name": "hf:Test", "image_size": "56"}


def write_store(path: Path, batches: list[tuple[list[str], torch.Tensor]], row_group_size: int = 4) -> None:
    with EmbeddingWriter(path, TOKENS, HIDDEN, METADATA, row_group_size=row_group_size) as writer:
        for ids, tokens in batches:
            writer.write(ids, tokens)


def random_batches(sizes: list[int]) -> list[tuple[list[str], torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches, start = [], 0
    for size in sizes:
        ids = [f"img-{i:03d}" for i in range(start, start + size)]
        batches.append((ids, torch.randn(size, TOKENS, HIDDEN, generator=generator)))
        start += size
    return batches


def test_round_trip_keeps_ids_in_order_and_values_in_fp16(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    batches = random_batches([3, 5, 2, 1])  # 11 rows with row groups of 4 -> several row groups
    write_store(path, batches)

    assert pq.ParquetFile(path).num_row_groups > 1
    loaded = load_embeddings(path)
    assert loaded.image_ids == [i for ids, _ in batches for i in ids]
    expected = torch.cat([tokens for _, tokens in batches]).to(torch.float16)
    assert loaded.tokens.dtype == torch.float16
    assert loaded.tokens.shape == (11, TOKENS, HIDDEN)
    assert torch.equal(loaded.tokens, expected)
    assert loaded.metadata["backbone_name"] == "hf:Test"
    assert (loaded.metadata["num_tokens"], loaded.metadata["hidden_size"]) == (str(TOKENS), str(HIDDEN))
    assert not (tmp_path / "train.parquet.tmp").exists()


def test_each_value_is_the_float16_bytes_of_one_image(tmp_path: Path) -> None:
    """The documented layout, read without the loader: little-endian float16, [num_tokens, hidden_size] row-major."""
    path = tmp_path / "train.parquet"
    batches = random_batches([3])
    write_store(path, batches)
    column = pq.read_table(path).column("embedding")
    assert column.type.byte_width == TOKENS * HIDDEN * 2
    first = np.frombuffer(column[1].as_py(), "<f2").reshape(TOKENS, HIDDEN)
    assert np.array_equal(first, batches[0][1][1].to(torch.float16).numpy())


def test_a_store_in_another_layout_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"  # the float16 lists of earlier versions, without the format key
    schema = pa.schema([("image_id", pa.string()), ("embedding", pa.list_(pa.float16(), TOKENS * HIDDEN))],
                       metadata={**METADATA, "num_tokens": str(TOKENS), "hidden_size": str(HIDDEN)})
    values = pa.array(np.zeros(TOKENS * HIDDEN, np.float16), type=pa.float16())
    pq.write_table(pa.table([pa.array(["a"]), pa.FixedSizeListArray.from_arrays(values, TOKENS * HIDDEN)],
                            schema=schema), path)
    with pytest.raises(EmbeddingStoreError, match=r"train.parquet: stores its embeddings as float16 lists.*dvc repro embed"):
        load_embeddings(path)


def test_expected_metadata_mismatch_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    write_store(path, random_batches([2]))
    assert load_embeddings(path, expect={"image_size": 56}).image_ids  # str(56) matches the stored "56"
    with pytest.raises(EmbeddingStoreError, match=r"image_size='56'.*'112'"):
        load_embeddings(path, expect={"image_size": "112"})
    with pytest.raises(EmbeddingStoreError, match="backbone_name"):
        load_embeddings(path, expect={"backbone_name": "open_clip:ViT-B-16"})


def test_exception_inside_the_writer_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    with pytest.raises(RuntimeError, match="backbone crashed"):
        with EmbeddingWriter(path, TOKENS, HIDDEN, METADATA, row_group_size=2) as writer:
            ids, tokens = random_batches([3])[0]
            writer.write(ids, tokens)  # already flushed one row group into the temporary file
            raise RuntimeError("backbone crashed")
    assert list(tmp_path.iterdir()) == []


def test_exception_keeps_a_previous_complete_file(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    write_store(path, random_batches([2]))
    with pytest.raises(RuntimeError):
        with EmbeddingWriter(path, TOKENS, HIDDEN, METADATA) as writer:
            writer.write(*random_batches([4])[0])
            raise RuntimeError("interrupted")
    assert load_embeddings(path).image_ids == ["img-000", "img-001"]


def test_empty_writer_raises_and_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    with pytest.raises(EmbeddingStoreError, match="no embeddings"):
        with EmbeddingWriter(path, TOKENS, HIDDEN, METADATA):
            pass
    assert list(tmp_path.iterdir()) == []


def test_batch_of_the_wrong_width_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingStoreError, match="expected 15"):
        with EmbeddingWriter(tmp_path / "x.parquet", TOKENS, HIDDEN, METADATA) as writer:
            writer.write(["a"], torch.zeros(1, TOKENS + 1, HIDDEN))


def test_missing_file_points_at_the_embed_stage(tmp_path: Path) -> None:
    with pytest.raises(EmbeddingStoreError, match="dvc repro embed"):
        load_embeddings(tmp_path / "absent.parquet")


def test_gather_follows_the_requested_order_and_names_unknown_ids(tmp_path: Path) -> None:
    path = tmp_path / "train.parquet"
    batches = random_batches([6])
    write_store(path, batches)
    loaded = load_embeddings(path)
    wanted = ["img-004", "img-000", "img-004", "img-002"]
    rows = [int(i[-3:]) for i in wanted]
    assert torch.equal(gather(loaded, wanted), batches[0][1][rows].to(torch.float16))
    with pytest.raises(KeyError, match="'img-999'"):
        gather(loaded, ["img-001", "img-999"])
    with pytest.raises(EmbeddingStoreError, match="skip_bad_images"):  # still an EmbeddingStoreError too
        gather(loaded, ["img-999"])
    assert available(loaded, ["img-999", "img-003", "img-x", "img-001"]) == ["img-003", "img-001"]


def test_embed_split_writes_one_row_per_image_with_backbone_metadata(tmp_path: Path) -> None:
    source = tiny_vision(tmp_path / "tiny_vision")
    materialise("vision", str(source), tmp_path / "models" / "vision")
    backbone = VisionBackbone.from_folder(tmp_path / "models" / "vision", image_size=VISION_IMAGE_SIZE)
    records = list(generate_records(seed=3, num_images=5, image_size=48, id_prefix="test"))
    dataset = tmp_path / "test.parquet"
    write_split(records, dataset)

    out = tmp_path / "embeddings" / "test"
    summary = embed_split(backbone, dataset, out, batch_size=2, precision="fp32")  # 2 + 2 + 1: a partial batch

    loaded = load_embeddings(out, expect={"image_size": VISION_IMAGE_SIZE, "backbone_source": str(source)})
    assert (summary.images, summary.skipped) == (5, 0)
    assert [p.name for p in out.iterdir()] == ["shard-00000.parquet"]
    assert loaded.image_ids == [r["image_id"] for r in records]
    assert loaded.tokens.shape == (5, backbone.num_tokens, VISION_WIDTH)
    assert backbone.num_tokens == (VISION_IMAGE_SIZE // 14) ** 2 + 1
    metadata = read_metadata(out)
    for key, value in backbone.metadata().items():
        assert metadata[key] == value
    assert metadata["precision"] == "fp32"
    # The stored rows are the backbone's output for those very images (in fp16), not e.g. a shifted batch.
    images = [decode_image(r["image"]) for r in records[3:5]]
    expected = backbone(backbone.preprocess(images)).to(torch.float16)
    torch.testing.assert_close(loaded.tokens[3:5], expected, atol=1e-3, rtol=1e-3)
    # Distinct images give distinct embeddings (a backbone fed the same batch twice would not).
    assert not torch.equal(loaded.tokens[0], loaded.tokens[1])


def write_shards(directory: Path, batches: list[tuple[list[str], torch.Tensor]], split_rows: int | None = None,
                 **overrides: str) -> None:
    """One shard per batch, with the row ranges (and skip counts) the embed stage writes."""
    start = 0
    for index, (ids, tokens) in enumerate(batches):
        metadata = {**METADATA, "split_rows": str(split_rows or sum(len(i) for i, _ in batches)),
                    "shard_start": str(start), "shard_stop": str(start + len(ids)), "skipped": "0"}
        with EmbeddingWriter(directory / shard_name(index), TOKENS, HIDDEN, {**metadata, **overrides}) as writer:
            writer.write(ids, tokens)
        start += len(ids)


def test_a_shard_directory_loads_like_one_file(tmp_path: Path) -> None:
    batches = random_batches([4, 4, 3])
    write_store(tmp_path / "one.parquet", batches)
    write_shards(tmp_path / "sharded", batches)

    single, sharded = load_embeddings(tmp_path / "one.parquet"), load_embeddings(tmp_path / "sharded", expect=METADATA)
    assert sharded.image_ids == single.image_ids
    assert torch.equal(sharded.tokens, single.tokens)
    assert "shard_start" not in sharded.metadata and sharded.metadata["backbone_name"] == "hf:Test"
    assert read_metadata(tmp_path / "sharded") == sharded.metadata


def test_shard_directory_with_a_gap_or_a_missing_tail_is_refused(tmp_path: Path) -> None:
    write_shards(tmp_path / "emb", random_batches([2, 2, 2]))
    (tmp_path / "emb" / shard_name(1)).unlink()
    with pytest.raises(EmbeddingStoreError, match=r"rows 2\.\.3 .*dvc repro embed"):
        load_embeddings(tmp_path / "emb")
    write_shards(tmp_path / "tail", random_batches([2, 2]), split_rows=6)
    with pytest.raises(EmbeddingStoreError, match="end at row 4 of 6"):
        load_embeddings(tmp_path / "tail")


def test_shards_from_different_runs_are_refused_naming_the_key(tmp_path: Path) -> None:
    write_shards(tmp_path / "emb", random_batches([2, 2]))
    ids, tokens = random_batches([2, 2])[1]
    with EmbeddingWriter(tmp_path / "emb" / shard_name(1), TOKENS, HIDDEN,
                         {**METADATA, "image_size": "112", "split_rows": "4", "shard_start": "2", "shard_stop": "4",
                          "skipped": "0"}) as writer:
        writer.write(ids, tokens)
    with pytest.raises(EmbeddingStoreError, match=r"shard-00001\.parquet: image_size='112'.*'56'"):
        load_embeddings(tmp_path / "emb")


def test_params_mismatch_on_shards_names_the_file_key_and_fix(tmp_path: Path) -> None:
    write_shards(tmp_path / "emb", random_batches([2, 2]))
    with pytest.raises(EmbeddingStoreError,
                       match=r"shard-00000\.parquet: made with image_size='56' but params say '224'.*dvc repro embed"):
        load_embeddings(tmp_path / "emb", expect={"image_size": 224})


def test_missing_shard_directory_points_at_the_embed_stage(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "absent", tmp_path / "empty"):
        with pytest.raises(EmbeddingStoreError, match="dvc repro embed"):
            load_embeddings(path)
