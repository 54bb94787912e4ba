"""2. Cache payoff: how much faster is Q-Former training from cached embeddings than with the backbone in the loop?

Both sides run the same `train_qformer` steps (`vlm.train.loop.train` with `stage1_losses`, params.yaml's
losses, batch size and precision, the same captions in the same order from `caption_batches`, the same initial
weights). They differ only in where a batch's image embeddings come from:

* cached: gathered from the Parquet embeddings the `embed` stage wrote (what `train_qformer` does);
* backbone in the loop: each step decodes the batch's PNGs, preprocesses them and runs the frozen backbone
  forward, the way LAVIS trains BLIP-2 (there in DataLoader workers and fp16 on a GPU; here on the same cores).

The figure is (seconds of the in-loop steps) ÷ (seconds of the cached steps). Goal ≥ 5. The share of the
in-loop step spent making image embeddings is measured too: it bounds the payoff at 1 / (1 - share).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator

import torch

from benchmarks.harness import Figure, ratio, side_by_side
from benchmarks.workspace import Workspace
from vlm.data.dataset_io import decode_image, read_split
from vlm.data.embeddings import Embeddings
from vlm.losses import stage1_losses
from vlm.models.qformer import QFormer
from vlm.precision import autocast
from vlm.train.loop import train
from vlm.train.stage1 import caption_batches, image_texts, new_qformer

GOAL = ">= 5"


class BackboneInTheLoop:
    """Batches like `caption_batches`, whose image embeddings are computed from the PNGs at every step."""

    def __init__(self, ws: Workspace):
        self.backbone = ws.backbone
        self.precision = ws.params.backbone.precision
        table = read_split(ws.dataset, columns=["image_id", "image"])
        self.ids = table.column("image_id").to_pylist()
        self.png = table.column("image").to_pylist()  # encoded bytes in memory, as a warm page cache would hold them
        self.seconds = 0.0  # spent making image embeddings

    def embed(self, rows: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        images = [decode_image(self.png[row], self.ids[row]) for row in rows.tolist()]
        with torch.no_grad(), autocast(self.precision):
            tokens = self.backbone(self.backbone.preprocess(images)).float()
        self.seconds += time.perf_counter() - start
        return tokens

    def batches(self, captions: list[list[str]], qformer: QFormer, batch_size: int, seed: int) -> Iterator:
        # Only the captions, their order and the rows are taken from caption_batches; its images are placeholders.
        placeholder = Embeddings(self.ids, torch.zeros(len(self.ids), 1, 1, dtype=torch.float16), {})
        for _, input_ids, mask, rows in caption_batches(placeholder, self.ids, captions, qformer, batch_size, seed):
            yield self.embed(rows), input_ids, mask, rows


def run(ws: Workspace, steps: int, repeats: int) -> Figure:
    params = ws.params
    config, train_config = params.qformer, params.train_qformer
    image_ids, captions, _ = image_texts(ws.dataset)
    embeddings = ws.embeddings
    assert embeddings.image_ids == image_ids, "the benchmark's embeddings are of its own dataset, in order"
    batch_size = min(train_config.batch_size, len(image_ids))
    torch.manual_seed(train_config.seed)
    qformer = new_qformer(ws.models / "bert", config, image_hidden_size=embeddings.tokens.shape[-1])
    initial = copy.deepcopy(qformer.state_dict())
    weights = {"itc": config.losses.itc, "itm": config.losses.itm, "itg": config.losses.itg}
    in_loop = BackboneInTheLoop(ws)

    def train_steps(batches: Iterator, count: int) -> None:
        qformer.load_state_dict(initial)
        qformer.train()
        generator = torch.Generator().manual_seed(train_config.seed + 1)

        def step_losses(batch):
            images, input_ids, mask, rows = batch
            return stage1_losses(qformer, images, input_ids, mask, rows, weights, generator=generator)

        train([p for p in qformer.parameters() if p.requires_grad], step_losses, batches, count, train_config,
              description="train_qformer")

    def cached() -> None:
        train_steps(caption_batches(embeddings, image_ids, captions, qformer, batch_size, train_config.seed), steps)

    shares: list[float] = []

    def backbone() -> None:
        in_loop.seconds, start = 0.0, time.perf_counter()
        train_steps(in_loop.batches(captions, qformer, batch_size, train_config.seed), steps)
        shares.append(in_loop.seconds / (time.perf_counter() - start))

    train_steps(caption_batches(embeddings, image_ids, captions, qformer, batch_size, train_config.seed), 1)
    train_steps(in_loop.batches(captions, qformer, batch_size, train_config.seed), 1)  # warm-up, both paths
    cached_s, in_loop_s = side_by_side(cached, backbone, repeats)
    share = sum(shares) / len(shares)
    value = ratio(in_loop_s, cached_s)
    return Figure(
        key="cache_payoff", title="2 Q-Former steps: backbone in loop / cached (s)", value=value, goal=GOAL,
        details={"steps": steps, "batch_size": batch_size, "cached_s": cached_s, "in_loop_s": in_loop_s,
                 "cached_s_per_step": cached_s / steps, "in_loop_s_per_step": in_loop_s / steps,
                 "backbone_share_in_loop": share, "payoff_bound": 1 / (1 - share) if share < 1 else float("inf")},
        note=f"{in_loop_s / steps:.2f} vs {cached_s / steps:.2f} s/step ({steps} steps of {batch_size}); "
             f"image embedding is {share:.0%} of an in-loop step")
