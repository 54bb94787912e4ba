"""The Parquet store of frozen-backbone patch embeddings.

One row per image: `image_id` and `embedding`, all output tokens of the backbone (CLS + patches) as one
fixed-size binary value: the [num_tokens, hidden_size] float16 array's little-endian bytes, row-major (read one
with `np.frombuffer(value, "<f2").reshape(num_tokens, hidden_size)`). A fixed-size column lets the reader hand
the whole column to numpy as one contiguous buffer (no per-row Python), so training reads thousands of images in
milliseconds; as bytes rather than a list of float16, Parquet stores each image as one value instead of
~50,000, each with its own list levels, and writes an order of magnitude faster (docs/experiments/speed.md).
The values are not compressed: zstd saved little space and slowed the write several times. The
file's key-value metadata records which backbone, size and preprocessing made it, so a later stage can refuse
embeddings that do not match its params.

A split is stored either as one such file or, as the `embed` stage writes it, as a directory of shards
(`shard-00000.parquet`, ...), each holding a contiguous range of the split's rows. Each shard's metadata adds
its row range (`shard_start`/`shard_stop`) and how many images of that range were skipped as unreadable, so the
loader can check that the shards agree and cover the whole split, and a rerun can tell which shards are done.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from vlm.config import layer_label

if TYPE_CHECKING:
    from vlm.config import BackboneConfig

SHARD_GLOB = "shard-*.parquet"
# How `embedding` values are laid out; in every file's metadata, so a store of another layout (e.g. the float16
# lists of before) is refused with a message, and the `embed` stage re-embeds its shards instead of keeping them.
EMBEDDING_FORMAT = "float16-le-bytes"
# Metadata that differs from shard to shard by design; every other key must be the same in all shards of a split.
SHARD_KEYS = ("shard_start", "shard_stop", "skipped")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


class EmbeddingStoreError(ValueError):
    """An embeddings file is missing, malformed or made with another backbone than expected."""


class MissingEmbeddingError(EmbeddingStoreError, KeyError):
    """An image has no cached embedding. A KeyError (a failed lookup by id) that is also an EmbeddingStoreError."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


@dataclass(frozen=True)
class Embeddings:
    image_ids: list[str]
    tokens: torch.Tensor  # [N, num_tokens, hidden_size], float16
    metadata: dict[str, str]

    def index_of(self) -> dict[str, int]:
        return {image_id: i for i, image_id in enumerate(self.image_ids)}


class EmbeddingWriter:
    """Streams batches of embeddings into one Parquet file, one row group per `row_group_size` images.

    Writes to `<path>.tmp` and renames on `close()`, so a crash never leaves a half-written file under the real
    name. Use as a context manager: on an exception the temporary file is removed. `allow_empty` permits a file
    with no rows: a shard whose every image was skipped as unreadable is still a finished shard.
    """

    def __init__(self, path: Path, num_tokens: int, hidden_size: int, metadata: dict[str, str],
                 row_group_size: int = 256, allow_empty: bool = False):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.width = num_tokens * hidden_size
        self.schema = pa.schema(
            [("image_id", pa.string()), ("embedding", pa.binary(self.width * 2))],  # 2 bytes a float16
            metadata={**metadata, "num_tokens": str(num_tokens), "hidden_size": str(hidden_size),
                      "embedding_format": EMBEDDING_FORMAT},
        )
        self.row_group_size = row_group_size
        self.allow_empty = allow_empty
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Dictionary encoding, min/max statistics and compression only for the ids: the embedding bytes never
        # repeat, a min/max of them means nothing, and zstd saved 7% of their size for 5x the write time.
        self._writer = pq.ParquetWriter(self.tmp_path, self.schema, compression={"image_id": "zstd", "embedding": "none"},
                                        use_dictionary=["image_id"], write_statistics=["image_id"])
        self._pending_ids: list[str] = []
        self._pending: list[np.ndarray] = []
        self.rows = 0

    def write(self, image_ids: list[str], tokens: torch.Tensor) -> None:
        """Append a batch: `tokens` is [B, num_tokens, hidden_size]."""
        flat = tokens.detach().to(torch.float16).cpu().reshape(len(image_ids), -1).numpy()
        if flat.shape[1] != self.width:
            raise EmbeddingStoreError(f"{self.path}: batch has {flat.shape[1]} values per image, expected {self.width}")
        self._pending_ids.extend(image_ids)
        self._pending.append(flat)
        if len(self._pending_ids) >= self.row_group_size:
            self._flush()

    def add_metadata(self, metadata: dict[str, str]) -> None:
        """Add key-value metadata known only at the end (e.g. how many images were skipped); before close()."""
        self._writer.add_key_value_metadata(metadata)

    def _flush(self) -> None:
        if not self._pending_ids:
            return
        values = np.concatenate(self._pending).astype("<f2", copy=False)  # little-endian on any machine
        column = pa.FixedSizeBinaryArray.from_buffers(self.schema.field("embedding").type, len(values),
                                                      [None, pa.py_buffer(values)])
        self._writer.write_table(pa.table([pa.array(self._pending_ids), column], schema=self.schema))
        self.rows += len(self._pending_ids)
        self._pending_ids, self._pending = [], []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        if self.rows == 0 and not self.allow_empty:
            self.tmp_path.unlink(missing_ok=True)
            raise EmbeddingStoreError(f"{self.path}: no embeddings were written (empty split?)")
        os.replace(self.tmp_path, self.path)

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._writer.close()
            self.tmp_path.unlink(missing_ok=True)


def shard_files(path: Path) -> list[Path]:
    """The files that make up the embeddings at `path`: the file itself, or a shard directory's shards in order."""
    path = Path(path)
    if path.is_file():
        return [path]
    files = sorted(path.glob(SHARD_GLOB)) if path.is_dir() else []
    if not files:
        raise EmbeddingStoreError(f"{path}: no embeddings file or shards found; run `dvc repro embed` first")
    return files


def read_file_metadata(path: Path) -> dict[str, str]:
    """The key-value metadata of one embeddings file (a whole split or one shard); reads only the footer."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingStoreError(f"{path}: embeddings file not found; run `dvc repro embed` first")
    # The file's key-value metadata (not the Arrow schema's), so keys added at close (`add_metadata`) are seen too.
    raw = pq.read_metadata(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items() if not k.startswith(b"ARROW:")}


def read_metadata(path: Path) -> dict[str, str]:
    """The metadata shared by the embeddings at `path` (a file, or a shard directory without per-shard keys)."""
    files = shard_files(path)
    metadata = read_file_metadata(files[0])
    return metadata if files == [Path(path)] else _common(metadata)


def _common(metadata: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in metadata.items() if key not in SHARD_KEYS}


def expected_metadata(backbone: BackboneConfig) -> dict[str, object]:
    """What params say cached embeddings must have been made with: pass as `load_embeddings(..., expect=)`."""
    return {"backbone_source": backbone.source, "image_size": backbone.image_size,
            "layer": layer_label(backbone.layer)}


# Metadata that says which backbone made embeddings, and how: the blank image's must agree with a split's on these.
MADE_WITH_KEYS = ("backbone_name", "backbone_source", "backbone_weights", "hidden_size", "num_tokens", "image_size",
                  "layer", "image_mean", "image_std", "resize", "precision")


def made_like(embeddings: Embeddings) -> dict[str, object]:
    """`load_embeddings(..., expect=)` for embeddings made by the same backbone, weights, preprocessing and
    precision as `embeddings` (e.g. the blank image beside a split)."""
    return {key: embeddings.metadata[key] for key in MADE_WITH_KEYS if key in embeddings.metadata}


def check_expected(path: Path, metadata: dict[str, str], expect: dict[str, object] | None) -> None:
    """Refuse embeddings whose metadata differs from `expect` (what params say), naming the file, key and fix."""
    for key, wanted in (expect or {}).items():
        if metadata.get(key) != str(wanted):
            raise EmbeddingStoreError(
                f"{path}: made with {key}={metadata.get(key)!r} but params say {str(wanted)!r}; "
                "rerun the embed stage (`dvc repro embed`)"
            )


def _check_shards(directory: Path, files: list[Path], metadatas: list[dict[str, str]]) -> None:
    """All shards agree on everything but their range, and their ranges tile [0, split_rows) without gaps."""
    common = _common(metadatas[0])
    expected_start = 0
    for file, metadata in zip(files, metadatas, strict=True):
        for key in sorted(set(common) | set(_common(metadata))):
            if metadata.get(key) != common.get(key):
                raise EmbeddingStoreError(
                    f"{file}: {key}={metadata.get(key)!r} but {files[0].name} has {common.get(key)!r}; the shards "
                    "come from different runs, rerun the embed stage (`dvc repro embed`)")
        try:
            start, stop = int(metadata["shard_start"]), int(metadata["shard_stop"])
        except (KeyError, ValueError):
            raise EmbeddingStoreError(f"{file}: not an embeddings shard (no row range in its metadata); "
                                      "rerun the embed stage (`dvc repro embed`)") from None
        if start != expected_start:
            raise EmbeddingStoreError(f"{directory}: rows {expected_start}..{start - 1} of the split have no shard "
                                      f"(next is {file.name}); rerun the embed stage (`dvc repro embed`)")
        expected_start = stop
    total = int(common.get("split_rows", expected_start))
    if expected_start != total:
        raise EmbeddingStoreError(f"{directory}: the shards end at row {expected_start} of {total}; "
                                  "rerun the embed stage (`dvc repro embed`)")


def load_embeddings(path: Path, expect: dict[str, object] | None = None) -> Embeddings:
    """Read a whole split's embeddings (one file, or a directory of shards) into one float16 tensor.

    `expect` holds metadata values that must match (e.g. the backbone and image size in params), so embeddings
    cached by another backbone are refused with a message instead of silently training on the wrong features.
    Shards are copied straight from Arrow's buffers into one preallocated array, so the peak is the result plus
    one shard, not twice the split.
    """
    path = Path(path)
    files = shard_files(path)
    metadatas = [read_file_metadata(file) for file in files]
    is_directory = files != [path]
    if is_directory:
        _check_shards(path, files, metadatas)
    for file, metadata in zip(files, metadatas, strict=True):
        if metadata.get("embedding_format") != EMBEDDING_FORMAT:
            raise EmbeddingStoreError(f"{file}: stores its embeddings as {metadata.get('embedding_format', 'float16 lists')}"
                                      f", this version reads {EMBEDDING_FORMAT}; rerun the embed stage (`dvc repro embed`)")
        check_expected(file, metadata, expect)
    metadata = _common(metadatas[0]) if is_directory else metadatas[0]

    num_tokens, hidden = int(metadata["num_tokens"]), int(metadata["hidden_size"])
    rows = sum(pq.ParquetFile(file).metadata.num_rows for file in files)
    if rows == 0:
        raise EmbeddingStoreError(f"{path}: holds no embeddings")
    flat = np.empty((rows, num_tokens * hidden), dtype=np.float16)
    image_ids: list[str] = []
    offset = 0
    for file in files:
        table = pq.read_table(file)
        for chunk in table.column("embedding").chunks:
            flat[offset:offset + len(chunk)] = _float16_rows(chunk)
            offset += len(chunk)
        image_ids.extend(table.column("image_id").to_pylist())
    return Embeddings(image_ids, torch.from_numpy(flat).view(rows, num_tokens, hidden), metadata)


def _float16_rows(chunk: pa.FixedSizeBinaryArray) -> np.ndarray:
    """[rows, values] float16, a view of the chunk's data buffer (no copy, no per-row Python)."""
    width = chunk.type.byte_width
    data = chunk.buffers()[1]
    values = np.frombuffer(data, dtype="<f2", count=len(chunk) * width // 2, offset=chunk.offset * width)
    return values.reshape(len(chunk), -1)


def available(embeddings: Embeddings, image_ids: Iterable[str]) -> list[str]:
    """The ids among `image_ids` that have an embedding, in their order: the `embed` stage leaves out images it
    skipped as unreadable (`data.skip_bad_images`), so training can drop their captions and questions with this
    instead of failing in `gather`."""
    index = embeddings.index_of()
    return [image_id for image_id in image_ids if image_id in index]


def gather(embeddings: Embeddings, image_ids: Iterable[str]) -> torch.Tensor:
    """The embeddings of `image_ids`, in that order; an id without one raises MissingEmbeddingError (a KeyError)."""
    index = embeddings.index_of()
    rows = []
    for image_id in image_ids:
        if image_id not in index:
            raise MissingEmbeddingError(
                f"image {image_id!r} has no cached embedding: it is not in this split, or `embed` skipped it as "
                "unreadable (data.skip_bad_images); filter ids with vlm.data.embeddings.available, or rerun the "
                "embed stage (`dvc repro embed`)")
        rows.append(index[image_id])
    return embeddings.tokens[rows]
