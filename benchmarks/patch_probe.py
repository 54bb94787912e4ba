"""Does each cached patch token know the color of the object under it? A linear probe on single patch tokens.

    .venv/bin/python -m benchmarks.patch_probe [IMAGES]     # after `dvc repro embed` (default params)

For synthetic scenes: every image of the training split is redrawn from its own pixels into a label map (each
pixel -> the nearest of the background and the six object colors), cut into the backbone's patch grid, and each
patch labelled with the color covering most of it (background when objects cover under a quarter of it). A
logistic regression on the cached tokens of single patches (`data/embeddings/train`, i.e. `backbone.layer`) is fit
on the patches of the first 75% of the images and scored on the rest: all patches, and the object patches alone.

This is the upper end of the chain that the pooled probes of `benchmarks.layer_probe` start: what a Q-Former's
cross-attention could read if it attended to the right patch. Measured on the default features (blocks 4 + 8,
112 px, 800 images): 0.973 of the held-out object patches, 0.994 of all patches. What the visual tokens make of
it is in docs/experiments/spatial-queries.md ("Where the color is lost").
"""

from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.layer_probe import held_out_right
from vlm.data.dataset_io import read_split
from vlm.data.embeddings import gather, load_embeddings
from vlm.data.synthetic import BACKGROUND, COLORS

REPO_ROOT = Path(__file__).resolve().parents[1]
PALETTE = np.array([BACKGROUND, *COLORS.values()], dtype=np.float32)  # label 0 = background, 1.. = COLORS order
OBJECT_SHARE = 0.25  # a patch is labelled with an object's color when that color covers at least this share


def patch_labels(image: Image.Image, grid: int, image_size: int) -> np.ndarray:
    """[grid * grid] color label of each patch (row-major, as the backbone orders its patch tokens)."""
    pixels = np.asarray(image.convert("RGB").resize((image_size, image_size), Image.Resampling.NEAREST),
                        dtype=np.float32)
    labels = ((pixels[:, :, None, :] - PALETTE) ** 2).sum(-1).argmin(-1)  # nearest palette color per pixel
    patch = image_size // grid
    patches = labels.reshape(grid, patch, grid, patch).transpose(0, 2, 1, 3).reshape(grid * grid, -1)
    result = np.zeros(grid * grid, dtype=np.int64)
    for index, values in enumerate(patches):
        counts = np.bincount(values, minlength=len(PALETTE))
        counts[0] = 0
        if counts.max() >= OBJECT_SHARE * values.size:
            result[index] = counts.argmax()
    return result


def probe(dataset: Path, embeddings_dir: Path, images: int) -> dict[str, float]:
    rows = read_split(dataset, columns=["image_id", "image"]).slice(0, images).to_pylist()
    store = load_embeddings(embeddings_dir)
    tokens = gather(store, [row["image_id"] for row in rows]).float()  # [N, T, D]
    grid = math.isqrt(tokens.shape[1] - 1)
    if grid * grid != tokens.shape[1] - 1:
        raise ValueError(f"{embeddings_dir}: {tokens.shape[1]} tokens per image is not a CLS token and a square "
                         "grid of patches; this probe needs a ViT with a single prefix token")
    image_size = int(store.metadata.get("image_size", grid * 14))
    labels = torch.tensor(np.stack([patch_labels(Image.open(io.BytesIO(row["image"])), grid, image_size)
                                    for row in rows]))
    features = tokens[:, 1:].reshape(-1, tokens.shape[-1])  # one row per patch, images in order
    train = int(0.75 * len(rows)) * grid * grid
    flat = labels.reshape(-1)
    right = held_out_right(features, flat, train, multilabel=False)  # one fit, on every training patch
    on_object = flat[train:] > 0
    return {"patches": len(flat) - train, "object_share": round(float(on_object.float().mean()), 3),
            "all_patches": round(float(right.float().mean()), 3),
            "object_patches": round(float(right[on_object].float().mean()), 3)}


def main(argv: list[str]) -> None:
    images = int(argv[0]) if argv else 800
    torch.manual_seed(0)
    result = probe(REPO_ROOT / "data" / "dataset" / "train.parquet", REPO_ROOT / "data" / "embeddings" / "train",
                   images)
    print(f"patch color probe on {images} training images (75% fit, 25% scored): {json.dumps(result)}")


if __name__ == "__main__":
    main(sys.argv[1:])
