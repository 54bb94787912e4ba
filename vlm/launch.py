"""Run a stage script in one process, or under torchrun with `VLM_NPROC` processes.

    python -m vlm.launch stages/train_qformer.py

dvc.yaml calls stages through this, so the number of processes comes from the environment
(`VLM_NPROC=2 dvc repro`) and is not part of the stage's command, hence not part of its hash: the same
experiment run on 1 or 4 processes is the same DVC stage. A stage reports its own failure (vlm/stage_main.py);
under torchrun this adds one last line naming the processes that failed.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        raise SystemExit("usage: python -m vlm.launch SCRIPT [ARGS...]  (VLM_NPROC=N runs it under torchrun)")
    raw = os.environ.get("VLM_NPROC", "1")
    try:
        nproc = int(raw)
    except ValueError:
        raise SystemExit(f"VLM_NPROC must be a whole number of processes, got {raw!r}") from None
    if nproc < 1:
        raise SystemExit(f"VLM_NPROC must be at least 1, got {nproc}")
    if nproc == 1 or "RANK" in os.environ:  # a single process, or already inside torchrun
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")
        return
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", *argv])
    except ChildFailedError as exc:  # each process printed its own `stage ... failed:` line (vlm/stage_main.py)
        # The first process to fail stops the others (SIGTERM, a negative exit code): name the ones that failed.
        failed = {rank: f for rank, f in exc.failures.items() if f.exitcode > 0} or exc.failures
        ranks = ", ".join(f"{rank} (exit code {failure.exitcode})" for rank, failure in sorted(failed.items()))
        raise SystemExit(f"stage {Path(argv[0]).stem} failed in process {ranks} of {nproc}; "
                         "its message is above") from None


if __name__ == "__main__":
    main()
