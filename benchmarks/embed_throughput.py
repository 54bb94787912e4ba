"""1. Embedding: does the `embed` stage run at the backbone's speed?

images/s of the stage's path, `vlm.embed.embed_split` (Parquet read, PNG decode, resize and normalise,
forward, fp16 Parquet write, shard bookkeeping) ÷ images/s of the bare backbone forward over the same images,
preprocessed beforehand into the same batches. Goal ≥ 0.9: all that surrounds the forward costs at most a tenth.

Beside it, the share of the stage's own time spent inside the backbone's forward (hooks, same runs): on a VM
whose speed drifts by tens of percent between runs, a ratio taken within one run is the steadier of the two.
"""

from __future__ import annotations

import time

import torch

from benchmarks.harness import Figure, ForwardClock, rate_ratio, side_by_side
from benchmarks.workspace import Workspace
from vlm.data.dataset_io import decode_image, read_split
from vlm.precision import autocast, effective_precision

GOAL = ">= 0.9"


def run(ws: Workspace, repeats: int) -> Figure:
    config = ws.params.backbone
    backbone = ws.backbone
    table = read_split(ws.dataset, columns=["image_id", "image"])
    images = [decode_image(data, image_id) for image_id, data in
              zip(table.column("image_id").to_pylist(), table.column("image").to_pylist())]
    batches = [backbone.preprocess(images[start:start + config.batch_size])
               for start in range(0, len(images), config.batch_size)]

    clock = ForwardClock(backbone)  # on both sides, so both pay its (tiny) cost
    in_stage = {"forward": 0.0, "wall": 0.0}  # over all stage runs

    def stage() -> None:
        forward_before, start = clock.seconds["forward"], time.perf_counter()
        ws.embed(ws.scratch("embed-run"))  # a fresh folder each time: a finished shard would be kept, not redone
        in_stage["wall"] += time.perf_counter() - start
        in_stage["forward"] += clock.seconds["forward"] - forward_before

    def forward() -> None:
        with torch.inference_mode(), autocast(config.precision):
            for pixels in batches:
                backbone(pixels)

    try:
        with torch.inference_mode():
            backbone(batches[0])  # warm-up: first-call allocations belong to neither side
        stage_s, forward_s = side_by_side(stage, forward, repeats)
    finally:
        clock.remove()
    count = len(images)
    value = rate_ratio(count, stage_s, count, forward_s)
    share = in_stage["forward"] / in_stage["wall"]
    return Figure(
        key="embed", title="1 embed stage / bare backbone forward (img/s)", value=value, goal=GOAL,
        details={"images": count, "image_size": config.image_size, "batch_size": config.batch_size,
                 "precision": effective_precision(config.precision),
                 "stage_s": stage_s, "forward_s": forward_s,
                 "stage_images_per_s": count / stage_s, "forward_images_per_s": count / forward_s,
                 "forward_share_in_stage": share},
        note=f"{count / stage_s:.1f} vs {count / forward_s:.1f} img/s ({count} images, "
             f"{config.image_size} px, batch {config.batch_size}); forward is {share:.0%} of the stage's time")
