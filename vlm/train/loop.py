"""The training loop both training stages share.

A stage supplies a `step_losses(batch) -> dict[str, Tensor]` (with a "loss" entry to minimise) and an iterator
of batches; this module owns everything else: AdamW, warmup + cosine schedule, bf16 autocast (with the attention
kernels that suit it, `vlm.precision.attention_kernels`), gradient clipping, gradient averaging across ranks, a
NaN guard, checkpoints and resume, the progress bar and per-step DVCLive logging.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm import tqdm

from vlm import distributed
from vlm.config import TrainConfig
from vlm.precision import attention_kernels, autocast
from vlm.train.checkpoint import Checkpointer

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
          total_steps: int, config: TrainConfig, log_dir: Path | None = None, description: str = "train",
          checkpointer: Checkpointer | None = None) -> dict[str, float]:
    """Run `total_steps` optimisation steps; returns the last logged value of each loss (smoothed).

    `parameters` is a list of parameters or of AdamW parameter groups (dicts with "params" and optionally "lr").
    Under torchrun every rank runs this with its share of each batch: gradients are averaged after backward (so
    every rank applies the same update) and the logged losses are means over ranks. With a `checkpointer`, the
    run resumes from its last checkpoint and saves one every `checkpointer.every` steps.
    """
    # fused: one kernel over all parameters instead of a loop of small ops per parameter, several times faster
    # on a CPU (docs/experiments/speed.md)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]  # flat, for clipping
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.warmup_steps, total_steps))
    torch.manual_seed(config.seed + 1 + distributed.rank())  # dropout: reproducible, yet different on each rank
    resumed = checkpointer.restore(optimizer, schedule) if checkpointer is not None else None
    step = resumed.step if resumed else 0
    history: list[dict[str, float]] = list(resumed.history) if resumed else []  # logged values, one dict per step
    main = distributed.is_main()
    with _live_log(log_dir if main else None) as live:
        smoothed: dict[str, float] = {}
        for values in history:  # replay: curves and smoothed values as if the run had never stopped
            _log(live, values, smoothed)
        progress = tqdm(total=total_steps, initial=step, desc=description, unit="step", disable=not main)
        batches = iter(batches)
        for _ in range(step):  # fast-forward the (deterministic) data to where the checkpoint stopped
            next(batches, None)
        for batch in batches:
            if step >= total_steps:
                break
            with autocast(config.precision), attention_kernels(config.precision):
                losses = step_losses(batch)
            # Means over ranks, reduced once: they are both what gets logged and what the NaN guard checks.
            values = {f"train/{name}": float(distributed.all_reduce_mean(value)) for name, value in losses.items()}
            if not math.isfinite(values["train/loss"]):
                saved = checkpointer is not None and checkpointer.path.exists()
                kept = f"; the last good checkpoint is {checkpointer.path}" if saved else ""
                raise NonFiniteLossError(f"{description}: loss is not finite at step {step}; lower the learning rate "
                                         f"or check the inputs (no update was applied for this step{kept})")
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            distributed.average_gradients(parameters)
            torch.nn.utils.clip_grad_norm_(parameters, max_norm=1.0)
            optimizer.step()
            schedule.step()
            values["train/lr"] = schedule.get_last_lr()[0]
            history.append(values)
            _log(live, values, smoothed)
            step += 1
            progress.update()
            if step % config.log_every == 0:
                progress.set_postfix({k.removeprefix("train/"): f"{v:.3f}" for k, v in smoothed.items()
                                      if k != "train/lr"})
            if checkpointer is not None and checkpointer.due(step) and step < total_steps:
                checkpointer.save(step, optimizer, schedule, history)
        progress.close()
        if live is not None:
            live.end()
    if step < total_steps:
        raise RuntimeError(f"{description}: the data ran out after {step} of {total_steps} steps")
    if checkpointer is not None:
        checkpointer.clear()
    return {k.removeprefix("train/"): v for k, v in smoothed.items() if k != "train/lr"}


def _log(live, values: dict[str, float], smoothed: dict[str, float]) -> None:
    """One step's values: into DVCLive (if open) and the exponential moving averages (readable, honest last value)."""
    for name, value in values.items():
        smoothed[name] = value if name not in smoothed else 0.9 * smoothed[name] + 0.1 * value
    if live is not None:
        for name, value in values.items():
            live.log_metric(name, value)
        live.next_step()


@contextmanager
def _live_log(log_dir: Path | None) -> Iterator:
    """A DVCLive logger writing to `log_dir` (None: no logging), and the DVC repository it opened closed after,
    however training ends.

    DVCLive opens the project's DVC repository, whose git backend (dulwich, through scmrepo) keeps the pack files
    open, and neither `Live.end()` nor anything else closes it. When a stage then fails, the traceback keeps the
    repository alive until the interpreter shuts down, and dulwich's `__del__` warnings about unclosed packs fail
    there ("Exception ignored ... ImportError: sys.meta_path is None"), a screen of tracebacks after the stage's
    own error. Closing it here releases the packs while Python still runs.
    """
    if log_dir is None:
        yield None
        return
    from dvclive import Live  # imported lazily: it is slow to import and unit tests do not need it

    # dvcyaml=False: dvc.yaml is ours and declares the plots; save_dvc_exp=False: `dvc exp run` tracks the run.
    live = Live(str(log_dir), dvcyaml=False, save_dvc_exp=False, report=None)
    try:
        yield live
    finally:
        repo = getattr(live, "_dvc_repo", None)  # None outside a DVC repository
        if repo is not None:
            repo.close()
