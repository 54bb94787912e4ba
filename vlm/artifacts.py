"""Where stages put things, and how small files are written (atomically, so a crash leaves no half file)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

DATASET_DIR = Path("data/dataset")          # data stage: {split}.parquet (images + captions + QA)
EMBEDDINGS_DIR = Path("data/embeddings")    # embed stage: {split}/shard-NNNNN.parquet (patch embeddings)
BASE_MODELS_DIR = Path("models/base")       # weights stage: vision/, bert/, llm/ (standard HF folders)
QFORMER_DIR = Path("models/qformer")        # train_qformer stage
VLM_DIR = Path("models/vlm")                # train_vlm stage: qformer/, projector, LoRA adapter
METRICS_DIR = Path("metrics")
PREDICTIONS_DIR = Path("predictions")
CHECKPOINTS_DIR = Path("checkpoints")       # resumable training state of an unfinished run (git- and DVC-ignored)
SPLITS = ("train", "val", "test")


def write_json(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
