"""Resumable training: everything a run needs to continue exactly where it stopped, in one file.

A checkpoint holds the trainable weights, the optimizer and scheduler state, the RNG states (torch's global one
and any generator the stage passes, e.g. ITM's negative sampler), the step reached (the batch iterator is
deterministic from the seed, so the loop fast-forwards it to that step) and the per-step values logged so far
(replayed into DVCLive, so the curves of a resumed run equal those of an uninterrupted one).

It lives outside the stage's DVC outputs (`checkpoints/<stage>/`), because DVC deletes a stage's outputs before
running it again. A fingerprint of everything that shapes the run (params, step count, world size) guards against
resuming the wrong run: a checkpoint whose fingerprint differs is ignored and replaced. A finished run deletes its
checkpoint. Files are written to a temporary name and renamed, so a crash mid-write leaves the previous one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from vlm import distributed

CHECKPOINT_FILE = "last.pt"


@dataclass
class TrainingState:
    """What `train` restores from a checkpoint."""

    step: int
    history: list[dict[str, float]] = field(default_factory=list)


class Checkpointer:
    def __init__(self, directory: Path, every: int, module: nn.Module, fingerprint: dict,
                 generators: dict[str, torch.Generator] | None = None) -> None:
        if every < 0:
            raise ValueError(f"checkpoint_every must be >= 0 (0 = never), got {every}")
        self.directory = Path(directory)
        self.every = every
        self.module = module
        self.fingerprint = json.dumps({**fingerprint, "world_size": distributed.world_size()}, sort_keys=True,
                                      default=str)
        self.generators = generators or {}

    @property
    def path(self) -> Path:
        return self.directory / CHECKPOINT_FILE

    def _rng_path(self) -> Path:  # each rank draws its own dropout masks, so each keeps its own RNG state
        return self.directory / f"rng-rank{distributed.rank()}.pt"

    def _trainable(self) -> dict[str, nn.Parameter]:
        return {name: p for name, p in self.module.named_parameters() if p.requires_grad}

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int, optimizer: torch.optim.Optimizer, scheduler, history: list[dict[str, float]]) -> None:
        rng = {"torch": torch.get_rng_state(), **{name: g.get_state() for name, g in self.generators.items()}}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        _atomic_save({"step": step, "rng": rng}, self._rng_path())
        if distributed.is_main():  # weights and optimizer are identical on every rank
            state = {
                "fingerprint": self.fingerprint,
                "step": step,
                "model": {name: p.detach().clone() for name, p in self._trainable().items()},
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
            }
            _atomic_save(state, self.path)
        distributed.barrier()

    def restore(self, optimizer: torch.optim.Optimizer, scheduler) -> TrainingState | None:
        """Load the checkpoint into the module/optimizer/scheduler/RNGs if it belongs to this run."""
        if not self.path.is_file():
            return None
        state = torch.load(self.path, weights_only=True)
        if state.get("fingerprint") != self.fingerprint:
            if distributed.is_main():
                print(f"{self.path}: checkpoint of a different run (params or world size changed); starting afresh")
            return None
        trainable = self._trainable()
        if set(state["model"]) != set(trainable):
            raise RuntimeError(f"{self.path}: its weights do not match the model's trainable parameters; delete "
                               f"{self.directory} to start afresh")
        with torch.no_grad():
            for name, value in state["model"].items():
                trainable[name].copy_(value)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng_path = self._rng_path()
        if rng_path.is_file():
            rng = torch.load(rng_path, weights_only=True)
            if rng["step"] == state["step"]:
                torch.set_rng_state(rng["rng"]["torch"])
                for name, generator in self.generators.items():
                    generator.set_state(rng["rng"][name])
                if "cuda" in rng["rng"] and torch.cuda.is_available():
                    torch.cuda.set_rng_state(rng["rng"]["cuda"])
        if distributed.is_main():
            print(f"resuming from {self.path} at step {state['step']}")
        return TrainingState(step=state["step"], history=state["history"])

    def clear(self) -> None:
        """Delete this run's checkpoint files (the run finished; its outputs now hold the result)."""
        distributed.barrier()
        for path in (self._rng_path(), self.path if distributed.is_main() else None):
            if path is not None and path.exists():
                path.unlink()
        distributed.barrier()
        if distributed.is_main() and self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()


def _atomic_save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
