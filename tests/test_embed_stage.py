"""The `embed` stage: sharded, resumable, strict about bad images, and the same on 1 or 2 processes.

Shard sizes of a few rows (instead of 512) let a 7-image split exercise several shards with a tiny random backbone.
"""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from pixel_backbone import PixelBackbone
from tiny_models import VISION_IMAGE_SIZE, tiny_vision
from tiny_qformer import single_torch_thread  # noqa: F401 (autouse fixture)

from vlm.config import BackboneConfig
from vlm.data.dataset_io import DATASET_SCHEMA, DatasetError, write_split
from vlm.embed import embed_split, plan_shards
from vlm.data.embeddings import (
    EmbeddingStoreError,
    expected_metadata,
    gather,
    load_embeddings,
    made_like,
    read_file_metadata,
    shard_name,
)
from vlm.data.synthetic import generate_records
from vlm.models.backbone import VisionBackbone
from vlm.weights.sources import materialise

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARD = 3  # 7 images -> shards of rows 0-2, 3-5, 6


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("vision")
    materialise("vision", str(tiny_vision(root / "source")), root / "vision")
    return root / "vision"


@pytest.fixture(scope="module")
def backbone(vision_folder: Path) -> VisionBackbone:
    return VisionBackbone.from_folder(vision_folder, image_size=VISION_IMAGE_SIZE)


def records(count: int = 7, seed: int = 3, prefix: str = "train") -> list[dict]:
    return list(generate_records(seed=seed, num_images=count, image_size=48, id_prefix=prefix))


def write_raw_split(rows: list[dict], path: Path) -> Path:
    """Write rows as they are, without write_split's validation: how a split with a null image could arrive."""
    nullable = pa.schema([field.with_nullable(True) for field in DATASET_SCHEMA])
    pq.write_table(pa.Table.from_pylist(rows, schema=nullable), path)
    return path


def rewrite_metadata(path: Path, **changes: str) -> None:
    """Rewrite a shard file with all its metadata, changed by `changes`."""
    metadata = {**read_file_metadata(path), **changes}
    pq.write_table(pq.read_table(path).replace_schema_metadata(metadata), path)


def embed(backbone: VisionBackbone, dataset: Path, out: Path, **kwargs):
    return embed_split(backbone, dataset, out, batch_size=2, precision="fp32", **{"shard_size": SHARD, **kwargs})


def count_forward_images(backbone: VisionBackbone, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on the backbone: the batch size of every forward call."""
    calls: list[int] = []
    original = backbone.forward

    def spy(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(len(pixels))
        return original(pixels)

    monkeypatch.setattr(backbone, "forward", spy)
    return calls


def test_plan_is_contiguous_fixed_ranges() -> None:
    assert [(s.index, s.start, s.stop) for s in plan_shards(7, 3)] == [(0, 0, 3), (1, 3, 6), (2, 6, 7)]
    assert [s.name for s in plan_shards(512, 512)] == ["shard-00000.parquet"]


def test_shards_load_equal_to_one_unsharded_pass(backbone: VisionBackbone, tmp_path: Path) -> None:
    dataset = tmp_path / "train.parquet"
    write_split(records(), dataset)
    summary = embed(backbone, dataset, tmp_path / "sharded")
    embed(backbone, dataset, tmp_path / "whole", shard_size=1000)

    assert (summary.images, summary.skipped) == (7, 0)
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == [shard_name(i) for i in range(3)]
    last = read_file_metadata(tmp_path / "sharded" / shard_name(2))
    assert (last["shard_start"], last["shard_stop"], last["split_rows"], last["skipped"]) == ("6", "7", "7", "0")
    assert len(last["dataset_fingerprint"]) == 64 and len(last["backbone_weights"]) == 64
    sharded, whole = load_embeddings(tmp_path / "sharded"), load_embeddings(tmp_path / "whole")
    assert sharded.image_ids == whole.image_ids == [r["image_id"] for r in records()]
    # Batches differ at shard edges ([2] vs [2, 3]); a ViT embeds each image independently of its batch-mates.
    torch.testing.assert_close(sharded.tokens, whole.tokens, atol=1e-3, rtol=1e-3)
    assert sharded.metadata == whole.metadata


def test_rerun_skips_complete_shards_and_redoes_deleted_stale_and_foreign_ones(
        backbone: VisionBackbone, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dataset, out = tmp_path / "train.parquet", tmp_path / "emb"
    write_split(records(), dataset)
    embed(backbone, dataset, out)
    first = load_embeddings(out)
    calls = count_forward_images(backbone, monkeypatch)

    rewrite_metadata(out / shard_name(2))  # the same file, rewritten: still a match
    embed(backbone, dataset, out)
    assert calls == []  # nothing re-embedded

    # A deleted shard, a stale one (another backbone name in its metadata), a leftover of a crash and a shard
    # beyond the plan: only the first two are embedded again, the last two are removed.
    (out / shard_name(1)).unlink()
    rewrite_metadata(out / shard_name(2), backbone_name="hf:SomethingElse")
    (out / "shard-00000.parquet.tmp").write_bytes(b"half a shard")
    (out / shard_name(7)).write_bytes(b"an old split's shard")
    embed(backbone, dataset, out)
    assert sum(calls) == 3 + 1  # shard 1 (rows 3-5) and shard 2 (row 6)
    assert sorted(p.name for p in out.iterdir()) == [shard_name(i) for i in range(3)]
    again = load_embeddings(out)
    assert again.image_ids == first.image_ids and torch.equal(again.tokens, first.tokens)

    # Another dataset file (here: other images under the same ids) invalidates every shard.
    calls.clear()
    write_split(records(seed=4), dataset)
    embed(backbone, dataset, out)
    assert sum(calls) == 7


def test_a_crashed_run_resumes_at_the_first_unfinished_shard(backbone: VisionBackbone, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    dataset, out = tmp_path / "train.parquet", tmp_path / "emb"
    write_split(records(), dataset)
    original = backbone.forward

    def crash_in_shard_1(pixels: torch.Tensor) -> torch.Tensor:
        crash_in_shard_1.batches += 1
        if crash_in_shard_1.batches == 4:  # shard 0 is batches 1-2; batch 3 is the first of shard 1
            raise RuntimeError("killed")
        return original(pixels)

    crash_in_shard_1.batches = 0
    monkeypatch.setattr(backbone, "forward", crash_in_shard_1)
    with pytest.raises(RuntimeError, match="killed"):
        embed(backbone, dataset, out)
    assert sorted(p.name for p in out.iterdir()) == [shard_name(0)]  # no half shard under any name

    calls = count_forward_images(backbone, monkeypatch)
    embed(backbone, dataset, out)
    assert sum(calls) == 4  # rows 3-6: shards 1 and 2 only
    assert load_embeddings(out).image_ids == [r["image_id"] for r in records()]


@pytest.mark.parametrize("bad_image", [b"\x89PNG\r\n\x1a\n not really a png", b"", None],
                         ids=["corrupt", "empty", "null"])
def test_bad_image_stops_the_run_naming_file_and_id(backbone: VisionBackbone, tmp_path: Path, bad_image) -> None:
    rows = records()
    rows[4]["image"] = bad_image
    dataset = write_raw_split(rows, tmp_path / "train.parquet")
    with pytest.raises(DatasetError, match=rf"{dataset}.*'train-000004'.*skip_bad_images"):
        embed(backbone, dataset, tmp_path / "emb")
    assert not (tmp_path / "emb" / shard_name(1)).exists()  # the shard holding it is not written, not even half


def test_skipping_bad_images_counts_them_and_leaves_them_out(backbone: VisionBackbone, tmp_path: Path) -> None:
    rows = records()
    rows[1]["image"], rows[4]["image"] = b"", b"\xff\xd8\xff truncated jpeg"
    dataset, out = write_raw_split(rows, tmp_path / "train.parquet"), tmp_path / "emb"
    summary = embed(backbone, dataset, out, skip_bad_images=True)

    assert (summary.images, summary.skipped) == (5, 2)
    loaded = load_embeddings(out)
    good = [r["image_id"] for i, r in enumerate(rows) if i not in (1, 4)]
    assert loaded.image_ids == good and loaded.tokens.shape[0] == 5
    with pytest.raises(KeyError, match="'train-000001'"):
        gather(loaded, ["train-000000", "train-000001"])
    # Shards that left images out are not reused once skipping is switched off: the run stops as a fresh one would.
    with pytest.raises(DatasetError, match="'train-000001'"):
        embed(backbone, dataset, out)


def test_a_split_of_only_bad_images_is_an_error(backbone: VisionBackbone, tmp_path: Path) -> None:
    rows = [{**r, "image": b""} for r in records(count=2)]
    dataset = write_raw_split(rows, tmp_path / "train.parquet")
    with pytest.raises(DatasetError, match=rf"{dataset}: all 2 images are unreadable"):
        embed(backbone, dataset, tmp_path / "emb", skip_bad_images=True)


def test_empty_split_is_an_error_naming_the_file(backbone: VisionBackbone, tmp_path: Path) -> None:
    dataset = tmp_path / "val.parquet"
    pq.write_table(DATASET_SCHEMA.empty_table(), dataset)
    with pytest.raises(DatasetError, match=rf"{dataset} has no rows"):
        embed(backbone, dataset, tmp_path / "emb")


def test_embeddings_from_another_backbone_or_size_are_refused(backbone: VisionBackbone, tmp_path: Path) -> None:
    dataset, out = tmp_path / "train.parquet", tmp_path / "emb"
    write_split(records(count=2), dataset)
    embed(backbone, dataset, out)
    params = BackboneConfig(source=backbone.source, image_size=VISION_IMAGE_SIZE, layer=-1)  # what embed() made
    assert load_embeddings(out, expect=expected_metadata(params)).image_ids
    with pytest.raises(EmbeddingStoreError, match=r"shard-00000\.parquet: made with image_size='56' but params "
                                                  r"say '112'.*dvc repro embed"):
        load_embeddings(out, expect=expected_metadata(replace(params, image_size=112)))
    with pytest.raises(EmbeddingStoreError, match="backbone_source=.* but params say 'bundled'"):
        load_embeddings(out, expect=expected_metadata(replace(params, source="bundled")))
    with pytest.raises(EmbeddingStoreError, match="made with layer='-1' but params say '-9,-5'"):
        load_embeddings(out, expect=expected_metadata(replace(params, layer=(-9, -5))))


WORKER = """
import sys
from pathlib import Path

from pixel_backbone import PixelBackbone

from vlm import distributed
from vlm.embed import embed_split

distributed.init()
summary = embed_split(PixelBackbone(), Path(sys.argv[1]), Path(sys.argv[2]), batch_size=2, precision="fp32",
                      shard_size=3)
print(f"rank {distributed.rank()} of {distributed.world_size()}: {summary}")
distributed.shutdown()
"""


def test_two_processes_write_the_same_shards_as_one(tmp_path: Path) -> None:
    dataset = tmp_path / "train.parquet"
    write_split(records(), dataset)
    embed(PixelBackbone(), dataset, tmp_path / "one")
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    # Through vlm.launch, as dvc.yaml runs the stage: VLM_NPROC=2 starts torchrun with two ranks (gloo on CPU).
    env = {**os.environ, "VLM_NPROC": "2", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "vlm.launch", str(worker), str(dataset), str(tmp_path / "two")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "rank 0 of 2" in result.stdout and "rank 1 of 2" in result.stdout

    names = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == names == [shard_name(i) for i in range(3)]
    for name in names:
        assert read_file_metadata(tmp_path / "two" / name) == read_file_metadata(tmp_path / "one" / name)
    one, two = load_embeddings(tmp_path / "one"), load_embeddings(tmp_path / "two")
    assert two.image_ids == one.image_ids
    assert torch.equal(two.tokens, one.tokens)  # the same batches through the same weights, one thread each


def test_stage_writes_shard_directories_and_counts(vision_folder: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage script itself: each split a shard directory, leftovers of the old layout removed, counts in
    metrics/embed.json."""
    materialise("vision", str(vision_folder), tmp_path / "models" / "base" / "vision")
    (tmp_path / "data" / "dataset").mkdir(parents=True)
    for split, count in {"train": 3, "val": 1, "test": 2}.items():
        rows = records(count=count, prefix=split)
        if split == "train":
            rows[0]["image"] = b""
        write_raw_split(rows, tmp_path / "data" / "dataset" / f"{split}.parquet")
    (tmp_path / "data" / "embeddings").mkdir()
    (tmp_path / "data" / "embeddings" / "train.parquet").write_bytes(b"a single-file store of an older run")
    params = {"data": {"skip_bad_images": True},
              "backbone": {"source": str(vision_folder), "image_size": VISION_IMAGE_SIZE, "batch_size": 2,
                           "precision": "fp32", "layer": -1}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)

    runpy.run_path(str(REPO_ROOT / "stages" / "embed.py"), run_name="__main__")

    metrics = json.loads((tmp_path / "metrics" / "embed.json").read_text())
    assert metrics == {"train_images": 2, "train_skipped": 1, "val_images": 1, "val_skipped": 0,
                       "test_images": 2, "test_skipped": 0}
    assert sorted(p.name for p in (tmp_path / "data" / "embeddings").iterdir()) == ["test", "train", "val"]
    train = load_embeddings(tmp_path / "data" / "embeddings" / "train",
                            expect=expected_metadata(BackboneConfig(**params["backbone"])))
    assert train.image_ids == ["train-000001", "train-000002"]
    # The blind baseline's blank image: one row, beside the splits, made exactly as they were.
    blank = load_embeddings(tmp_path / "data" / "blank_embedding.parquet", expect=made_like(train))
    assert blank.image_ids == ["blank"] and blank.tokens.shape == (1, *train.tokens.shape[1:])
    assert json.loads(blank.metadata["blank_color"]) == [124, 116, 104]  # the ImageNet mean: zeros once normalised
