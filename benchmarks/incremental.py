"""6. Incremental experiments: what a Q-Former or LoRA experiment costs next to a full reproduction.

On the tiny pipeline of the end-to-end test (`tests/pipeline_repo.py`: this repository's sources copied into a
fresh git + DVC repository, tiny random models, tiny params), three commands run one after the other:

* `dvc repro` from scratch (every stage);
* `dvc exp run -S qformer.num_queries=2` from that committed baseline;
* `dvc exp run -S lora.r=2` from the same baseline (the workspace is reset between the two).

Reported: each experiment's wall time ÷ the full reproduction's, the stages each ran, and the backbone
forward passes each made, counted in every process the command started (`count_backbone/sitecustomize.py`
wraps `VisionBackbone.forward`). Goal: 0 forward passes in both experiments (the embeddings are cached).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import Figure, ratio

REPO_ROOT = Path(__file__).resolve().parents[1]
COUNTER = Path(__file__).resolve().parent / "count_backbone"
EXPERIMENTS = (("num_queries", "qformer.num_queries=2"), ("lora_r", "lora.r=2"))


def _pipeline_repo():
    """tests/pipeline_repo.py, the helpers the end-to-end test uses to build and drive the tiny repository."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import pipeline_repo

    return pipeline_repo


def run() -> list[Figure]:
    pipeline = _pipeline_repo()
    with tempfile.TemporaryDirectory(prefix="vlm-bench-incremental-") as tmp:
        repo = pipeline.make_tiny_repo(Path(tmp) / "repo")
        log = Path(tmp) / "backbone.log"
        env = {"PYTHONPATH": str(COUNTER), "VLM_BENCH_BACKBONE_LOG": str(log)}

        def measure(command: list[str]) -> dict:
            log.write_text("")
            start = time.perf_counter()
            result = pipeline.run(command, repo, env)
            seconds = time.perf_counter() - start
            batches = [int(line) for line in log.read_text().split()]
            return {"s": seconds, "stages": pipeline.stages_run(result), "forwards": len(batches),
                    "images": sum(batches)}

        full = measure(["dvc", "repro"])
        pipeline.commit_all(repo, "first reproduction")
        experiments = {}
        for name, assignment in EXPERIMENTS:
            experiments[name] = measure(["dvc", "exp", "run", "-S", assignment])
            pipeline.git(repo, "reset", "-q", "--hard")  # back to the baseline: params, dvc.lock, metrics ...
            pipeline.run(["dvc", "checkout", "--force"], repo)  # ... and the outputs they describe

    figures = []
    for name, assignment in EXPERIMENTS:
        exp = experiments[name]
        figures.append(Figure(
            key=f"incremental_{name}", title=f"6 exp run -S {assignment} / full repro (s)",
            value=ratio(exp["s"], full["s"]), goal=None,
            details={"exp_s": exp["s"], "full_s": full["s"], "stages_run": len(exp["stages"]),
                     "backbone_forwards": exp["forwards"], "backbone_images": exp["images"]},
            note=f"{exp['s']:.0f} vs {full['s']:.0f} s; ran {', '.join(exp['stages'])}"))
    forwards = sum(experiments[name]["forwards"] for name, _ in EXPERIMENTS)
    figures.append(Figure(
        key="incremental_backbone", title="6 backbone forward passes in both exp runs", value=forwards,
        goal="== 0", details={"full_repro_forwards": full["forwards"], "full_repro_images": full["images"],
                              "full_repro_stages_run": len(full["stages"])},
        note=f"full repro: {full['forwards']} passes over {full['images']} images, stages {', '.join(full['stages'])}"))
    return figures
