"""Run the frozen backbone over a dataset split and store its tokens as Parquet shards, resumably.

The plan: the split's rows are cut into shards of `shard_size` contiguous rows, `shard-00000.parquet`, ... The
plan depends only on the row count, so every process and every rerun agrees on it without talking; shard i is
embedded by rank i % world_size.

Resuming: a shard is written under a temporary name and renamed once complete, and its metadata records all its
content depends on (backbone, its weights, image size, precision, the dataset file's fingerprint, the row range).
A rerun keeps a shard whose metadata is exactly what this run would write and re-embeds any other, which is what
makes `persist: true` on the stage's output safe: a crash costs only the shards in flight.

The blind baseline's blank image (`embed_blank`) goes through the same backbone, preprocessing and precision, into
a one-row file beside the splits.

Bad images: an image that is missing (null or empty bytes) or cannot be decoded stops the run with the split file
and image id, unless `skip_bad_images`; then it is left out of the shard and counted in the shard's metadata.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.parquet as pq
import torch
from PIL import Image
from tqdm import tqdm

from vlm import distributed
from vlm.data.dataset_io import DatasetError, decode_image, read_split
from vlm.data.embeddings import (EMBEDDING_FORMAT, EmbeddingStoreError, EmbeddingWriter, read_file_metadata,
                                 shard_name)
from vlm.precision import autocast, effective_precision

if TYPE_CHECKING:  # annotations only: callers bring the backbone, and importing it pulls in transformers (~10 s)
    from vlm.models.backbone import VisionBackbone

# Small enough that a crash loses little work and 8 ranks share a 5k-image split evenly; large enough that a
# 120k-image split is a few hundred files. Changing it re-embeds everything (every shard's range changes).
SHARD_SIZE = 512
BLANK_ID = "blank"


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first row of the split in this shard
    stop: int   # one past the last row

    @property
    def name(self) -> str:
        return shard_name(self.index)


@dataclass(frozen=True)
class SplitSummary:
    images: int   # embedded
    skipped: int  # unreadable and left out (only with skip_bad_images)


def plan_shards(num_rows: int, shard_size: int = SHARD_SIZE) -> list[Shard]:
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    return [Shard(i, i * shard_size, min((i + 1) * shard_size, num_rows))
            for i in range(math.ceil(num_rows / shard_size))]


def dataset_fingerprint(path: Path) -> str:
    """sha256 of the split file's size and Parquet footer.

    The footer holds the schema, key-value metadata and every column chunk's offset, compressed size and
    statistics, so rewriting the split with other rows or images changes it; yet it is a few KB to read where
    hashing the whole file would read every image (GBs for COCO) on each rerun.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as file:
        file.seek(size - 8)
        tail = file.read(8)
        if tail[4:] != b"PAR1":
            raise DatasetError(f"dataset split {path} is not a Parquet file (no footer)")
        footer_length = int.from_bytes(tail[:4], "little")
        file.seek(size - 8 - footer_length)
        footer = file.read(footer_length)
    return hashlib.sha256(size.to_bytes(8, "little") + footer).hexdigest()


def weights_fingerprint(backbone: VisionBackbone) -> str:
    """sha256 of the backbone's weights: a folder re-materialised from the same source name with other weights
    must not reuse old shards (~0.2 s for DINOv2-S)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(backbone.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def made_with(backbone: VisionBackbone, precision: str) -> dict[str, str]:
    """The metadata that says which backbone, weights, preprocessing and precision made some embeddings, and how
    they are stored (the writer records that too; here, so that a shard of another layout is not kept)."""
    return {**backbone.metadata(), "precision": effective_precision(precision),
            "backbone_weights": weights_fingerprint(backbone), "embedding_format": EMBEDDING_FORMAT}


def blank_image(backbone: VisionBackbone) -> Image.Image:
    """A constant image of the backbone's mean pixel color: after normalisation, all zeros. It shows nothing, so
    its tokens stand in for the image in the blind baseline (what the model answers from the text alone)."""
    color = tuple(round(255 * value) for value in backbone.image_mean)
    return Image.new("RGB", (backbone.image_size, backbone.image_size), color)


def embed_blank(backbone: VisionBackbone, out_path: Path, precision: str) -> None:
    """Write the tokens of `blank_image` as a one-row embeddings file (id BLANK_ID), made like the splits'."""
    image = blank_image(backbone)
    metadata = {**made_with(backbone, precision), "blank_color": json.dumps(list(image.getpixel((0, 0))))}
    with EmbeddingWriter(out_path, backbone.num_tokens, backbone.hidden_size, metadata) as writer:
        _embed_batch(backbone, writer, [BLANK_ID], [image], precision)


def embed_split(backbone: VisionBackbone, dataset_path: Path, out_dir: Path, batch_size: int, precision: str,
                skip_bad_images: bool = False, shard_size: int = SHARD_SIZE) -> SplitSummary:
    """Embed every image of `dataset_path` into shards in `out_dir`, skipping shards already done.

    Under torchrun every rank embeds its own shards, then all meet at a barrier, so the summary (read back from
    all shards' metadata) and the cleanup see the finished split. Memory is bounded by one batch of images.
    """
    dataset_path, out_dir = Path(dataset_path), Path(out_dir)
    # Reads only the ids; also checks the split's format, and an empty split raises naming the file.
    num_rows = read_split(dataset_path, columns=["image_id"]).num_rows
    shards = plan_shards(num_rows, shard_size)
    metadata = {
        **made_with(backbone, precision),
        "dataset_fingerprint": dataset_fingerprint(dataset_path),
        "split_rows": str(num_rows),
    }
    mine = [shard for shard in shards if shard.index % distributed.world_size() == distributed.rank()]
    todo = [shard for shard in mine if not _is_done(out_dir / shard.name, shard, metadata, skip_bad_images)]
    if distributed.is_main():
        print(f"embed {dataset_path.stem}: {len(shards)} shards of up to {shard_size} rows; rank 0 has "
              f"{len(mine) - len(todo)} of its {len(mine)} already done", file=sys.stderr)

    if todo:
        parquet_file = pq.ParquetFile(dataset_path)
        with tqdm(total=sum(s.stop - s.start for s in todo), desc=f"embed {dataset_path.stem}", unit="img",
                  disable=not distributed.is_main()) as progress:
            for shard in todo:
                _embed_shard(backbone, parquet_file, dataset_path, shard, out_dir / shard.name, metadata,
                             batch_size, precision, skip_bad_images, progress)

    distributed.barrier()  # every rank's shards are written
    summary = _summarise(dataset_path, out_dir, shards, metadata, skip_bad_images)
    if distributed.is_main():
        remove_all_but(out_dir, {shard.name for shard in shards})  # shards of a longer old split, stray .tmp files
    return summary


def remove_all_but(directory: Path, keep: set[str]) -> None:
    """Delete every entry of `directory` not named in `keep`: with `persist: true` DVC no longer clears the
    stage's output before a run, so leftovers of an older layout would otherwise ship with the new one."""
    for entry in Path(directory).iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _shard_metadata(shard: Shard, metadata: dict[str, str]) -> dict[str, str]:
    """What a shard's file says about itself, but for its skip count (known only once it is written)."""
    return {**metadata, "shard_start": str(shard.start), "shard_stop": str(shard.stop)}


def _skipped_in(path: Path, shard: Shard, metadata: dict[str, str]) -> int | None:
    """The skip count of a finished shard made exactly as this run would make it; None for any other file."""
    try:
        found = read_file_metadata(path)
        rows = pq.read_metadata(path).num_rows
    except (EmbeddingStoreError, OSError, ValueError):  # absent, or not a readable Parquet file
        return None
    skipped = found.pop("skipped", None)
    if found != _shard_metadata(shard, metadata) or skipped is None or not skipped.isdigit():
        return None
    if rows != shard.stop - shard.start - int(skipped):
        return None
    return int(skipped)


def _done(skipped: int | None, skip_bad_images: bool) -> bool:
    """Whether a shard with this skip count (None: absent or stale) is finished for this run. A shard that left
    images out is only acceptable while skipping is allowed: with skip_bad_images off, it is re-embedded so that
    the bad image stops the run as it would have on a fresh one."""
    return skipped is not None and (skipped == 0 or skip_bad_images)


def _is_done(path: Path, shard: Shard, metadata: dict[str, str], skip_bad_images: bool) -> bool:
    return _done(_skipped_in(path, shard, metadata), skip_bad_images)


def _summarise(dataset_path: Path, out_dir: Path, shards: list[Shard], metadata: dict[str, str],
               skip_bad_images: bool) -> SplitSummary:
    """Count from the shards on disk, so the numbers include shards reused from an earlier run or other ranks."""
    skipped = 0
    for shard in shards:
        path = out_dir / shard.name
        in_shard = _skipped_in(path, shard, metadata)  # one footer read per shard
        if not _done(in_shard, skip_bad_images):
            raise EmbeddingStoreError(f"{path}: missing or stale right after embedding; was {out_dir} changed "
                                      "while `embed` ran? Rerun `dvc repro embed`")
        skipped += in_shard
    total = shards[-1].stop
    if skipped == total:
        raise DatasetError(f"{dataset_path}: all {total} images are unreadable (skipped); nothing to embed")
    return SplitSummary(images=total - skipped, skipped=skipped)


def _embed_shard(backbone: VisionBackbone, parquet_file: pq.ParquetFile, dataset_path: Path, shard: Shard,
                 out_path: Path, metadata: dict[str, str], batch_size: int, precision: str,
                 skip_bad_images: bool, progress: tqdm) -> None:
    skipped = 0
    # One row group per batch, so the writer never holds more than the batch just embedded (its default buffers
    # 256 images: ~50 MB for DINOv2-S at 224 px).
    with EmbeddingWriter(out_path, backbone.num_tokens, backbone.hidden_size, _shard_metadata(shard, metadata),
                         row_group_size=batch_size, allow_empty=True) as writer:
        ids: list[str] = []
        images: list[Image.Image] = []
        for record in _iter_rows(parquet_file, shard.start, shard.stop, batch_size):
            image = _read_image(record, dataset_path, skip_bad_images)
            progress.update(1)
            if image is None:
                skipped += 1
                continue
            ids.append(record["image_id"])
            images.append(image)
            if len(ids) == batch_size:
                _embed_batch(backbone, writer, ids, images, precision)
                ids, images = [], []
        if ids:
            _embed_batch(backbone, writer, ids, images, precision)
        writer.add_metadata({"skipped": str(skipped)})


def _iter_rows(parquet_file: pq.ParquetFile, start: int, stop: int, batch_size: int) -> Iterator[dict[str, Any]]:
    """Rows [start, stop) of the split, reading only the row groups that hold them (a rank skips the others')."""
    groups, first_row, row = [], None, 0
    for group in range(parquet_file.num_row_groups):
        size = parquet_file.metadata.row_group(group).num_rows
        if row < stop and row + size > start:
            groups.append(group)
            first_row = row if first_row is None else first_row
        row += size
    row = first_row or 0
    for batch in parquet_file.iter_batches(batch_size=batch_size, row_groups=groups, columns=["image_id", "image"]):
        low, high = max(start - row, 0), min(stop - row, batch.num_rows)
        if high > low:
            yield from batch.slice(low, high - low).to_pylist()
        row += batch.num_rows
        if row >= stop:
            return


def _read_image(record: dict[str, Any], dataset_path: Path, skip_bad_images: bool) -> Image.Image | None:
    """The decoded image; None for a bad one when skipping, else DatasetError naming the split and image."""
    image_id, data = record["image_id"], record["image"]
    try:
        if not data:
            raise DatasetError(f"image {image_id!r}: no image bytes stored (null or empty)")
        return decode_image(data, image_id)
    except DatasetError as error:
        if not skip_bad_images:
            raise DatasetError(f"{dataset_path}: {error}. To embed the split without it, set "
                               "data.skip_bad_images: true in params.yaml") from error
        print(f"embed {dataset_path}: skipping {error}", file=sys.stderr)
        return None


def _embed_batch(backbone: VisionBackbone, writer: EmbeddingWriter, ids: list[str], images: list,
                 precision: str) -> None:
    with torch.inference_mode(), autocast(precision):
        tokens = backbone(backbone.preprocess(images))
    writer.write(ids, tokens)  # the writer stores float16 (bf16 -> fp16 rounds once, as through fp32)
