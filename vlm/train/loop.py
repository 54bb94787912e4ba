"""The training loop both training stages share.

A stage supplies a `step_losses(batch) -> dict[str, Tensor]` (with a "loss" entry to minimise) and an iterator
of batches; this module owns everything else: AdamW, warmup + cosine schedule, bf16 autocast, gradient
clipping, a NaN guard, the progress bar and per-step DVCLive logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tqdm import tqdm

from vlm.config import TrainConfig
from vlm.precision import autocast

StepLosses = Callable[[object], dict[str, torch.Tensor]]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped before the bad update was applied."""


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup, then cosine decay to 10% of the peak."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def train(parameters: list[torch.nn.Parameter] | list[dict], step_losses: StepLosses, batches: Iterable,
          total_steps: int, config: TrainConfig, log_dir: Path | None = None, description: str = "train"
          ) -> dict[str, float]:
    """Run `total_steps` optimisation steps; returns the last logged value of each loss (smoothed).

    `parameters` is a list of parameters or of AdamW parameter groups (dicts with "params" and optionally "lr").
    """
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]  # flat, for clipping
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, total_steps))
    live = _open_live(log_dir)
    smoothed: dict[str, float] = {}
    progress = tqdm(total=total_steps, desc=description, unit="step")
    step = 0
    for batch in batches:
        if step >= total_steps:
            break
        with autocast(config.precision):
            losses = step_losses(batch)
        loss = losses["loss"]
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"{description}: loss is {loss.item()} at step {step}; lower the learning "
                                     f"rate or check the inputs (no update was applied for this step)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, max_norm=1.0)
        optimizer.step()
        schedule.step()
        for name, value in losses.items():  # exponential moving average: readable curves, honest last value
            value = float(value.detach())
            smoothed[name] = value if name not in smoothed else 0.9 * smoothed[name] + 0.1 * value
        if live is not None:
            for name, value in losses.items():
                live.log_metric(f"train/{name}", float(value.detach()))
            live.log_metric("train/lr", schedule.get_last_lr()[0])
            live.next_step()
        step += 1
        progress.update()
        if step % config.log_every == 0:
            progress.set_postfix({k: f"{v:.3f}" for k, v in smoothed.items()})
    progress.close()
    if live is not None:
        live.end()
    if step < total_steps:
        raise RuntimeError(f"{description}: the data ran out after {step} of {total_steps} steps")
    return smoothed


def _open_live(log_dir: Path | None):
    if log_dir is None:
        return None
    from dvclive import Live  # imported lazily: it is slow to import and unit tests do not need it

    # dvcyaml=False: dvc.yaml is ours and declares the plots; save_dvc_exp=False: `dvc exp run` tracks the run.
    return Live(str(log_dir), dvcyaml=False, save_dvc_exp=False, report=None)
