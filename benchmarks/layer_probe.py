"""Which backbone block carries what the questions ask about: linear probes on the tokens of each block.

    .venv/bin/python -m benchmarks.layer_probe [IMAGES] [LAYER ...]     # after `dvc repro` has run data + weights

A LAYER is one block (-5) or several joined by commas (-9,-5: their tokens concatenated, as a list does in
`backbone.layer`).

For synthetic scenes, each image's labels are read from its captions: which colors and which shapes it shows
(multi-label) and how many objects (from the count question). Features are an image's CLS token and its mean
patch token, from block `layer` through the model's final norm (what `embed` caches for `backbone.layer`). A
logistic-regression probe trains on the first 75% of the images and is scored on the rest: exact-set accuracy
for colors and shapes, accuracy for the count. The probe is a lower bound on what a Q-Former can read (it sees
pooled tokens, not where they are), but it ranks the blocks: DINOv2 learns invariance to color jitter, so its
last block forgets color that its middle blocks still hold. This chose `backbone.layer`'s default.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from vlm.config import layer_label
from vlm.data.dataset_io import read_split
from vlm.data.synthetic import COLORS, SHAPES

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_LAYERS = (-9, -5, -1, (-9, -5))  # blocks 4, 8 and 12 of DINOv2-S, and 4 + 8 concatenated
Layer = int | tuple[int, ...]
IMAGE_SIZE = 112  # params.yaml's backbone.image_size


def scene_labels(row: dict) -> tuple[list[float], list[float], int]:
    """(color presence, shape presence, object count or -1) of a synthetic scene, read from its text."""
    text = " ".join(row["captions"]).lower()
    colors = [float(re.search(rf"\b{name}\b", text) is not None) for name in COLORS]
    shapes = [float(re.search(rf"\b{name}s?\b", text) is not None) for name in SHAPES]
    count = next((int(answers[0]) for question, answers in zip(row["questions"], row["answers"])
                  if question.startswith("how many objects")), -1)
    return colors, shapes, count


def pooled_features(backbone, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
    """[N, 2D]: CLS token and mean patch token of each image."""
    parts = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            tokens = backbone(backbone.preprocess(images[start:start + batch_size])).float()
            parts.append(torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1))
    return torch.cat(parts)


def probe_accuracy(features: torch.Tensor, labels: torch.Tensor, train: int, multilabel: bool) -> float:
    """Held-out accuracy of an L2-regularised logistic regression (LBFGS) on standardised features."""
    return round(float(held_out_right(features, labels, train, multilabel).float().mean()), 3)


def held_out_right(features: torch.Tensor, labels: torch.Tensor, train: int, multilabel: bool) -> torch.Tensor:
    """[N - train] bool: whether the probe fit on the first `train` rows gets each later row right."""
    mean, std = features[:train].mean(0), features[:train].std(0) + 1e-5
    x = (features - mean) / std
    outputs = labels.shape[1] if multilabel else int(labels.max()) + 1
    weight = torch.zeros(x.shape[1], outputs, requires_grad=True)
    bias = torch.zeros(outputs, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200)

    def closure():
        optimizer.zero_grad()
        logits = x[:train] @ weight + bias
        loss = (F.binary_cross_entropy_with_logits(logits, labels[:train]) if multilabel
                else F.cross_entropy(logits, labels[:train])) + 1e-3 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        logits = x[train:] @ weight + bias
        return ((logits > 0).float() == labels[train:]).all(1) if multilabel else logits.argmax(1) == labels[train:]


def probe(vision_folder: Path, dataset: Path, layers: list[Layer], images: int, image_size: int = IMAGE_SIZE
          ) -> dict[Layer, dict[str, float]]:
    """layer -> {"color_set", "shape_set", "count"} held-out probe accuracies."""
    from vlm.models.backbone import VisionBackbone

    rows = read_split(dataset, columns=["image", "captions", "questions", "answers"]).slice(0, images).to_pylist()
    pictures = [Image.open(io.BytesIO(row["image"])).convert("RGB") for row in rows]
    labels = [scene_labels(row) for row in rows]
    colors = torch.tensor([label[0] for label in labels])
    shapes = torch.tensor([label[1] for label in labels])
    counts = torch.tensor([max(label[2], 0) for label in labels])
    train = int(0.75 * len(rows))
    results = {}
    for layer in layers:
        backbone = VisionBackbone.from_folder(vision_folder, image_size=image_size, layer=layer)
        features = pooled_features(backbone, pictures)
        results[layer] = {"color_set": probe_accuracy(features, colors, train, multilabel=True),
                          "shape_set": probe_accuracy(features, shapes, train, multilabel=True),
                          "count": probe_accuracy(features, counts, train, multilabel=False)}
    return results


def main(argv: list[str]) -> None:
    images = int(argv[0]) if argv else 800
    layers = [parse_layer(value) for value in argv[1:]] or list(DEFAULT_LAYERS)
    torch.manual_seed(0)
    results = probe(REPO_ROOT / "models" / "base" / "vision", REPO_ROOT / "data" / "dataset" / "train.parquet",
                    layers, images)
    print(f"linear probes on {images} training images (75% fit, 25% scored), {IMAGE_SIZE} px")
    print("| backbone.layer | colors (exact set) | shapes (exact set) | object count |")
    print("|---|---|---|---|")
    for layer, scores in results.items():
        print(f"| {layer_label(layer)} | {scores['color_set']} | {scores['shape_set']} | {scores['count']} |")
    print(json.dumps({layer_label(layer): scores for layer, scores in results.items()}))


def parse_layer(text: str) -> Layer:
    """"-5" -> -5, "-9,-5" -> (-9, -5)."""
    values = tuple(int(value) for value in text.split(","))
    return values[0] if len(values) == 1 else values


if __name__ == "__main__":
    main(sys.argv[1:])
