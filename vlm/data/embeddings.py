"""The Parquet store of frozen-backbone patch embeddings.

One row per image: `image_id` and `embedding`, all output tokens of the backbone (CLS + patches) flattened into
a fixed-size list of float16. A fixed-size list lets the reader hand the whole column to numpy as one contiguous
buffer (no per-row Python), so training reads thousands of images in milliseconds. The file's key-value
metadata records which backbone, size and preprocessing made it, so a later stage can refuse embeddings that do
not match its params.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


class EmbeddingStoreError(ValueError):
    """An embeddings file is missing, malformed or made with another backbone than expected."""


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
    name. Use as a context manager: on an exception the temporary file is removed.
    """

    def __init__(self, path: Path, num_tokens: int, hidden_size: int, metadata: dict[str, str],
                 row_group_size: int = 256):
        self.path = Path(path)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.width = num_tokens * hidden_size
        self.schema = pa.schema(
            [("image_id", pa.string()), ("embedding", pa.list_(pa.float16(), self.width))],
            metadata={**metadata, "num_tokens": str(num_tokens), "hidden_size": str(hidden_size)},
        )
        self.row_group_size = row_group_size
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = pq.ParquetWriter(self.tmp_path, self.schema, compression="zstd")
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

    def _flush(self) -> None:
        if not self._pending_ids:
            return
        values = np.concatenate(self._pending).reshape(-1)
        column = pa.FixedSizeListArray.from_arrays(pa.array(values, type=pa.float16()), self.width)
        self._writer.write_table(pa.table([pa.array(self._pending_ids), column], schema=self.schema))
        self.rows += len(self._pending_ids)
        self._pending_ids, self._pending = [], []

    def close(self) -> None:
        self._flush()
        self._writer.close()
        if self.rows == 0:
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


def read_metadata(path: Path) -> dict[str, str]:
    path = Path(path)
    if not path.is_file():
        raise EmbeddingStoreError(f"{path}: embeddings file not found; run `dvc repro embed` first")
    raw = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in raw.items()}


def load_embeddings(path: Path, expect: dict[str, str] | None = None) -> Embeddings:
    """Read a whole embeddings file into one float16 tensor.

    `expect` holds metadata values that must match (e.g. the backbone and image size in params), so embeddings
    cached by another backbone are refused with a message instead of silently training on the wrong features.
    """
    path = Path(path)
    metadata = read_metadata(path)
    for key, wanted in (expect or {}).items():
        if metadata.get(key) != str(wanted):
            raise EmbeddingStoreError(
                f"{path}: made with {key}={metadata.get(key)!r} but params say {wanted!r}; "
                "rerun the embed stage (`dvc repro embed`)"
            )
    table = pq.read_table(path)
    if table.num_rows == 0:
        raise EmbeddingStoreError(f"{path}: holds no embeddings")
    num_tokens, hidden = int(metadata["num_tokens"]), int(metadata["hidden_size"])
    flat = table.column("embedding").combine_chunks().values.to_numpy(zero_copy_only=False)
    tokens = torch.from_numpy(flat).view(table.num_rows, num_tokens, hidden)
    return Embeddings(table.column("image_id").to_pylist(), tokens, metadata)


def gather(embeddings: Embeddings, image_ids: Iterable[str]) -> torch.Tensor:
    """The embeddings of `image_ids`, in that order."""
    index = embeddings.index_of()
    try:
        rows = [index[i] for i in image_ids]
    except KeyError as err:
        raise EmbeddingStoreError(f"image {err.args[0]!r} has no cached embedding; rerun the embed stage") from None
    return embeddings.tokens[rows]
