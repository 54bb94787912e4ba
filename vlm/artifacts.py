"""Where stages put things, and how files and folders are written (atomically, so a crash leaves no half one)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DATASET_DIR = Path("data/dataset")          # data stage: {split}.parquet (images + captions + QA)
EMBEDDINGS_DIR = Path("data/embeddings")    # embed stage: {split}/shard-NNNNN.parquet (patch embeddings)
BLANK_EMBEDDING = Path("data/blank_embedding.parquet")  # embed stage: one blank image's tokens (blind baseline)
BASE_MODELS_DIR = Path("models/base")       # weights stage: vision/, bert/, llm/ (standard HF folders)
QFORMER_DIR = Path("models/qformer")        # train_qformer stage
VLM_DIR = Path("models/vlm")                # train_vlm stage: qformer/, projector, LoRA adapter
METRICS_DIR = Path("metrics")
PREDICTIONS_DIR = Path("predictions")
GALLERY_DIR = Path("plots/gallery")         # evaluate stage: test images with their predictions, as PNG files
CHECKPOINTS_DIR = Path("checkpoints")       # resumable training state of an unfinished run (git- and DVC-ignored)
SPLITS = ("train", "val", "test")


def write_json(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes it owner-only; a metrics file should read like any other
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_directory(out_dir: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder next to `out_dir`; on success it replaces `out_dir` by renaming."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    staging.chmod(0o755)  # mkdtemp makes it private; the published folder should look like any other
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out_dir.exists():
        retired = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex}")
        os.rename(out_dir, retired)
        os.rename(staging, out_dir)
        shutil.rmtree(retired)
    else:
        os.rename(staging, out_dir)
